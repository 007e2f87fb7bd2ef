"""DoRA's fused Linear/Conv1D combination (`dora.dora_linear`, its custom backward) against PEFT.

Outputs and the gradients of every trainable tensor and of the input equal PEFT's, with and
without base bias and lora dropout, for one adapter and for two stacked adapters (the second
one's `prev` then holds the first one's output).
"""

from __future__ import annotations

import pytest
import torch

from surgeon.methods.lora import dora
from surgeon.runtime.graph import source_of
from tests.lowering.peft_oracle import Variant, add_peft_adapter, make_input, max_diff, pair, randomise

TOL = 1e-5


def _step(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    layer.train()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    out = layer(x)
    weights = torch.linspace(-1.0, 2.0, out.numel()).view(out.shape)  # an uneven output gradient
    (out * out * weights).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return out, grads | {"x": x.grad}


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_step_matches_peft(kind: str, bias: bool, dropout: float) -> None:
    theirs, ours = pair(kind, Variant(use_dora=True, lora_dropout=dropout), bias=bias)
    ours.base_layer.requires_grad_(False)
    theirs.base_layer.requires_grad_(False)
    x = make_input(kind)
    (out_p, grads_p), (out_s, grads_s) = _step(theirs, x), _step(ours, x)
    assert "dora_linear" in source_of(ours._forwards.by_state[ours._key()].run)  # the fused path ran
    assert max_diff(out_p, out_s) <= TOL
    assert set(grads_s) == set(grads_p)
    for name, grad in grads_p.items():
        assert max_diff(grad, grads_s[name]) <= 1e-4 * max(1.0, grad.abs().max().item()), name


@pytest.mark.parametrize("bias", [True, False])
def test_two_stacked_adapters_match_peft(bias: bool) -> None:
    """Two active DoRA adapters: the second one's `prev` is the first one's result."""
    variant = Variant(use_dora=True)
    theirs, ours = pair("Linear", variant, bias=bias)
    add_peft_adapter(theirs, variant, "other")
    randomise(theirs, "other", seed=11)
    ours.add_adapter(variant.site("Linear", "other"))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    for layer in (theirs, ours):
        layer.base_layer.requires_grad_(False)
    x = make_input("Linear")
    (out_p, grads_p), (out_s, grads_s) = _step(theirs, x), _step(ours, x)
    assert max_diff(out_p, out_s) <= TOL
    assert set(grads_s) == set(grads_p)
    for name, grad in grads_p.items():
        assert max_diff(grad, grads_s[name]) <= 1e-4 * max(1.0, grad.abs().max().item()), name


def test_inference_call_equals_the_training_call() -> None:
    """Without autograd `dora_linear` skips the custom Function: same numbers either way."""
    gen = torch.Generator().manual_seed(3)
    prev, base = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    bias, h, lora_b = torch.randn(6, generator=gen), torch.randn(2, 5, 3, generator=gen), torch.randn(6, 3, generator=gen)
    rescale, adapt = torch.randn(1, 6, generator=gen), torch.randn(1, 6, generator=gen)
    for args in ((prev, None, None), (prev, None, bias), (prev, base, None)):
        expected_base = args[1] if args[1] is not None else prev - (bias if args[2] is not None else 0)
        expected = prev + rescale * expected_base + adapt * (h @ lora_b.t())
        with torch.no_grad():
            plain = dora.dora_linear(*args, h, lora_b, rescale, adapt)
        graded = dora.dora_linear(*args, h, lora_b.requires_grad_(True), rescale, adapt)
        lora_b.requires_grad_(False)
        torch.testing.assert_close(plain, expected)
        torch.testing.assert_close(graded.detach(), expected)


@pytest.mark.parametrize("shape", [(512, 512), (1024, 640)])
def test_large_weight_norm_is_the_built_norm(shape: tuple[int, int]) -> None:
    """From 1 MiB weights the norm is expanded (`dora._expanded_norm`), never building W':
    equal to `||W + s*B@A||` built as PEFT builds it."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=gen)
    a, b = torch.randn(8, shape[1], generator=gen) * 0.3, torch.randn(shape[0], 8, generator=gen) * 0.3
    built = torch.linalg.vector_norm(w.double() + 0.7 * (b.double() @ a.double()), dim=1)
    assert w.numel() >= dora._EXPANDED_FROM
    torch.testing.assert_close(dora.weight_norm(w, a, b, 0.7, "Linear").double(), built, rtol=1e-5, atol=0)


@pytest.mark.parametrize("trainable", ["magnitude", "factors", "none", "base"])
def test_fused_magnitude_paths_match_peft(trainable: str) -> None:
    """`dora_linear_of` forms `m / norm` inside its Function where autograd needs fresh
    factors (any of m, A, B or the base weight trainable) and falls back to the cached factors
    otherwise (a frozen adapter, only the input's gradient wanted): PEFT's outputs and
    gradients either way, the Function's `m` gradient included."""
    theirs, ours = pair("Linear", Variant(use_dora=True), bias=True)
    for layer in (theirs, ours):
        for name, p in layer.named_parameters():
            wanted = {"magnitude": "magnitude" in name, "factors": "lora_" in name and "magnitude" not in name,
                      "none": False, "base": "base_layer.weight" in name}[trainable]
            p.requires_grad_(wanted)
    x = make_input("Linear")
    (out_p, grads_p), (out_s, grads_s) = _step(theirs, x), _step(ours, x)
    assert "dora_linear_of" in source_of(ours._forwards.by_state[ours._key()].run)
    assert max_diff(out_p, out_s) <= TOL
    assert set(grads_s) == set(grads_p) and "x" in grads_s
    for name, grad in grads_p.items():
        assert max_diff(grad, grads_s[name]) <= 1e-4 * max(1.0, grad.abs().max().item()), name


def test_small_weight_norm_is_the_built_norm() -> None:
    """Below 1 MiB the norm is one `addmm` (W + s*B@A) and a row norm: PEFT's built norm."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(96, 80, generator=gen)
    a, b = torch.randn(4, 80, generator=gen) * 0.3, torch.randn(96, 4, generator=gen) * 0.3
    built = torch.linalg.vector_norm(w.double() + 0.7 * (b.double() @ a.double()), dim=1)
    assert w.numel() < dora._EXPANDED_FROM
    torch.testing.assert_close(dora.weight_norm(w, a, b, 0.7, "Linear").double(), built, rtol=1e-6, atol=0)
