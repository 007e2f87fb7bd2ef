"""Fused kernels for the adapter hot paths, each beside the torch code that defines it.

Every operation here has a torch reference (`reference.py`): the CPU path, the path on any
device without Triton, and the oracle the kernels are tested against. The Triton versions
(`lora.py`, `dora.py`) run on CUDA tensors, and on CPU tensors only under Triton's interpreter
inside `interpreted_on_cpu()` (how CI checks them: tests/kernels/). The public functions below
choose per call, so a graph lowered on a GPU that later moves to the CPU stays correct.

    prev + scaling * (x @ A.T) @ B.T           lora_add: shrink, then expand with the add fused
    x @ cat(A_q, A_k, A_v).T                   shrink: one GEMM for adapters sharing an input
    prev[i] + x[i] @ A[s[i]].T @ B[s[i]].T     gathered_add: a mixed-adapter batch (BGMV)
    ||W + scaling * B @ A|| per output row     dora_norm: DoRA's weight norm, never building W'

Triton kernels have no backward: the dispatch takes them only when autograd records nothing
that reaches an input (inference, or DoRA's norm, which is detached by definition).
`import surgeon.kernels` imports neither torch's compiler nor Triton; Triton loads on the first
call that can use it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from surgeon.kernels import reference

_route_cpu = False  # see `interpreted_on_cpu`


@functools.cache
def triton_installed() -> bool:
    """Whether the `triton` package can be imported (it is optional)."""
    return importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def interpreted_on_cpu() -> Iterator[None]:
    """Route CPU tensors through the kernels, under Triton's interpreter, for tests.

    `TRITON_INTERPRET=1` must have been set before anything imported triton (tests/conftest.py
    does on machines without a GPU). Graphs lowered inside the block call the kernels.
    """
    global _route_cpu
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is first imported")
    before, _route_cpu = _route_cpu, True
    try:
        yield
    finally:
        _route_cpu = before


def wanted(device: torch.device) -> bool:
    """Whether adapters on `device` should call the kernels: a CUDA device with Triton present
    (or CPU inside `interpreted_on_cpu`). Read when a forward graph is built."""
    return triton_installed() and (device.type == "cuda" or (_route_cpu and device.type == "cpu"))


def usable(*tensors: torch.Tensor) -> bool:
    """True when a kernel may serve this call: every tensor where `wanted` says, and none needing
    a gradient while autograd records (the kernels have no backward)."""
    if not all(wanted(t.device) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def lora_add(prev: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             scaling: float) -> torch.Tensor:
    """`prev + scaling * (x @ a.T) @ b.T` (`a`: `(r, in)`, `b`: `(out, r)`), in `prev`'s dtype."""
    if usable(prev, x, a, b):
        from surgeon.kernels import lora

        return lora.lora_add(prev, x, a, b, scaling)
    return reference.lora_add(prev, x, a, b, scaling)


def shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`x @ a.T`: for concatenated `A`s, one GEMM serves every adapter that reads `x`."""
    if usable(x, a):
        from surgeon.kernels import lora

        return lora.shrink(x, a)
    return reference.shrink(x, a)


def gathered_add(prev: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a_t: torch.Tensor,
                 b_t: torch.Tensor) -> torch.Tensor:
    """Row `i` of `prev` plus row `i` of `x` through adapter `slots[i]` (stacks transposed:
    `a_t` `(n, in, r)`, `b_t` `(n, r, out)`, scaling folded into `b_t`)."""
    if usable(prev, x, a_t, b_t):
        from surgeon.kernels import lora

        return lora.gathered_add(prev, x, slots, a_t, b_t)
    return reference.gathered_add(prev, x, slots, a_t, b_t)


def dora_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`||weight + scaling * b @ a||` per row of an out-major `weight`, in fp32, no autograd."""
    with torch.no_grad():
        if usable(weight, a, b):
            from surgeon.kernels import dora

            return dora.weight_norm(weight, a, b, scaling)
        return reference.dora_norm(weight, a, b, scaling)
