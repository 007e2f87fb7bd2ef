"""The torch definition of every kernel in this package: the CPU path and the test oracle.

Each function computes in the adapter's dtype and returns in the result's (PEFT casts the input
to the adapter's dtype and the adapter's output back to the base output's), so a kernel that
accumulates in fp32 agrees within that dtype's rounding.
"""

from __future__ import annotations

import torch


def shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`x @ a.T` over the last axis of `x`."""
    return torch.nn.functional.linear(x.to(a.dtype), a)


def expand_add(prev: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`prev + scaling * h @ b.T`, in `prev`'s dtype."""
    return prev + (scaling * torch.nn.functional.linear(h, b)).to(prev.dtype)


def lora_add(prev: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             scaling: float) -> torch.Tensor:
    """`prev + scaling * (x @ a.T) @ b.T`."""
    return expand_add(prev, shrink(x, a), b, scaling)


def gathered_add(prev: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a_t: torch.Tensor,
                 b_t: torch.Tensor) -> torch.Tensor:
    """`prev[i] + x[i] @ a_t[slots[i]] @ b_t[slots[i]]` for each batch row `i` (any middle axes)."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_t.dtype)
    h = torch.bmm(rows, a_t.index_select(0, slots))
    delta = torch.bmm(h, b_t.index_select(0, slots))
    return prev + delta.reshape(prev.shape).to(prev.dtype)


def dora_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`||weight + scaling * b @ a||_2` along each row, in fp32, detached."""
    with torch.no_grad():
        full = weight.float() + scaling * (b.float() @ a.float())
        return torch.linalg.vector_norm(full, dim=1)
