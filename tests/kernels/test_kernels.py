"""The Triton kernels (surgeon/kernels/) against their torch references, under Triton's
interpreter on CPU tensors (tiny shapes: the interpreter runs each program in numpy).

On a GPU the same tests run the compiled kernels on CUDA tensors. The references are checked
against PEFT's math elsewhere (the LoRA, DoRA and mixed-batch oracle
suites run them on CPU); here each kernel must agree with its reference on odd sizes that leave
partial tiles on every axis, strided (transposed) inputs, half precision, and the dispatch must
route only inference calls to a kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before triton loaded (tests/conftest.py "
                "sets it)", allow_module_level=True)

# Triton's interpreter computes in numpy, which has no bfloat16 (it reads bf16 as garbage)
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16

from surgeon import kernels
from surgeon.kernels import dora, lora, reference

SHAPES = [(1, 7, 3, 5), (2, 33, 17, 70), (3, 5, 1, 9)]  # (batch, in, r, out): partial tiles


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("batch,n_in,r,n_out", SHAPES)
def test_lora_add_matches_reference(batch, n_in, r, n_out):
    x, a, b = randn(batch, 4, n_in), randn(r, n_in, seed=1), randn(n_out, r, seed=2)
    prev = randn(batch, 4, n_out, seed=3)
    got = lora.lora_add(prev, x, a, b, 0.5)
    torch.testing.assert_close(got, reference.lora_add(prev, x, a, b, 0.5), atol=1e-5, rtol=1e-5)
    # and the math itself: prev + s * x A^T B^T
    torch.testing.assert_close(got, prev + 0.5 * x @ a.T @ b.T, atol=1e-5, rtol=1e-5)


def test_strided_factors_and_half_precision():
    """Transposed (non-contiguous) factors, half adapters on an fp32 input (PEFT's cast)."""
    x = randn(6, 20)
    a = randn(20, 4, seed=1).to(HALF).T  # (4, 20), strides (1, 4)
    b = randn(4, 9, seed=2).to(HALF).T
    prev = randn(6, 9, seed=3).to(HALF)
    got = lora.lora_add(prev, x, a, b, 2.0)
    expected = reference.lora_add(prev, x, a, b, 2.0)
    assert got.dtype == HALF
    torch.testing.assert_close(got.float(), expected.float(), atol=0.1, rtol=0.02)


def test_shrink_over_concatenated_factors_is_each_shrink():
    """One GEMM over `cat(A_q, A_k, A_v)` gives each adapter's `x A^T` as a column block."""
    x = randn(2, 5, 24)
    parts = [randn(r, 24, seed=s) for s, r in enumerate((4, 8, 2), start=1)]
    joint = lora.shrink(x, torch.cat(parts))
    for part, block in zip(parts, joint.split([4, 8, 2], dim=-1)):
        torch.testing.assert_close(block, x @ part.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 5])
def test_gathered_add_matches_a_loop_over_rows(tokens):
    """Each row through its own adapter (stacks with a trailing zero slot, as gathered.py builds)."""
    n_in, n_out, r, adapters = 12, 10, 4, 3
    a_t = torch.cat([randn(adapters, n_in, r, seed=1), torch.zeros(1, n_in, r, device=DEVICE)])
    b_t = torch.cat([randn(adapters, r, n_out, seed=2), torch.zeros(1, r, n_out, device=DEVICE)])
    slots = torch.tensor([2, 0, 3, 1, 2], device=DEVICE)
    x, prev = randn(5, tokens, n_in, seed=3), randn(5, tokens, n_out, seed=4)
    got = lora.gathered_add(prev, x, slots, a_t, b_t)
    for i, s in enumerate(slots.tolist()):
        torch.testing.assert_close(got[i], prev[i] + x[i] @ a_t[s] @ b_t[s], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], prev[2])  # the zero slot: base output only
    torch.testing.assert_close(got, reference.gathered_add(prev, x, slots, a_t, b_t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_out,n_in,r", [(5, 7, 3), (70, 200, 16), (16, 16, 1)])
def test_dora_norm_matches_reference(n_out, n_in, r):
    w, a, b = randn(n_out, n_in), randn(r, n_in, seed=1), randn(n_out, r, seed=2)
    got = dora.weight_norm(w, a, b, 0.25)
    torch.testing.assert_close(got, reference.dora_norm(w, a, b, 0.25), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, (w + 0.25 * b @ a).norm(dim=1), atol=1e-4, rtol=1e-5)


def test_dispatch_takes_kernels_only_for_inference():
    """CPU tensors take the reference unless a test routes them; autograd always does."""
    x, a = randn(3, 8).cpu(), randn(2, 8, seed=1).cpu()
    assert not kernels.usable(x, a)  # CPU: the torch path
    with kernels.interpreted_on_cpu():
        assert kernels.usable(x, a)
        a.requires_grad_(True)
        assert not kernels.usable(x, a)  # a kernel has no backward
        with torch.no_grad():
            assert kernels.usable(x, a)
        torch.testing.assert_close(kernels.shrink(x, a), x @ a.T)
        kernels.shrink(x, a).sum().backward()  # the reference path: differentiable
        torch.testing.assert_close(a.grad, x.sum(0).expand(2, 8))
    assert not kernels.usable(x.detach(), a.detach())
