"""Triton kernels for LoRA: shrink, expand with the add fused, and the mixed-adapter gather.

One kernel serves all three. It computes, for each batch row `g` of `x` (`(G, M, K)`),

    out[g] = prev[g] + scaling * x[g] @ W[slot(g)].T          W: `(N, K)` seen through strides

where `slot(g)` is `slots[g]` for a mixed batch (BGMV/SGMV: every row's tokens share one adapter,
so each tile is one dense `tl.dot`) and 0 otherwise, and `prev` is optional (a shrink has none).
Tiles accumulate in fp32 and store in the output's dtype; the input is cast to the adapter's
dtype on load, as PEFT casts it. LoRA is then two launches (shrink to `(M, r)` in the adapter's
dtype, expand-add into a fresh output), the gathered batch the same two with `slots`.
Anchors: punica's BGMV/SGMV, vLLM's shrink/expand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _matmul_add(x_ptr, w_ptr, prev_ptr, out_ptr, slots_ptr, M, N, K, scaling,
                sxg, sxm, sxk, swg, swn, swk, spg, spm, spn, sog, som, son,
                GATHER: tl.constexpr, HAS_PREV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_base = w_ptr
    if GATHER:
        w_base = w_ptr + tl.load(slots_ptr + g).to(tl.int64) * swg
    x_base = x_ptr + g.to(tl.int64) * sxg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        xt = tl.load(x_base + rm[:, None] * sxm + ks[None, :] * sxk,
                     mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        wt = tl.load(w_base + rn[None, :] * swn + ks[:, None] * swk,
                     mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc += tl.dot(xt.to(wt.dtype), wt)
    acc = acc * scaling
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_PREV:
        prev = tl.load(prev_ptr + g.to(tl.int64) * spg + rm[:, None] * spm + rn[None, :] * spn,
                       mask=mask, other=0.0)
        acc += prev.to(tl.float32)
    out = out_ptr + g.to(tl.int64) * sog + rm[:, None] * som + rn[None, :] * son
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, cap: int) -> int:
    """A tile side: a power of two >= 16 (what `tl.dot` needs), at most `cap`."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _launch(x3: torch.Tensor, w: tuple[torch.Tensor, int, int, int], n: int, out3: torch.Tensor,
            prev3: torch.Tensor | None, slots: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """`out3 = prev3 + scaling * x3 @ W.T` batched over axis 0; `w` is (tensor, strides g, n, k)."""
    weight, swg, swn, swk = w
    groups, m, k = x3.shape
    bm, bn, bk = _block(m, 64), _block(n, 64), _block(k, 64)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), groups)
    p = prev3 if prev3 is not None else out3
    _matmul_add[grid](x3, weight, p, out3, slots if slots is not None else x3, m, n, k, float(scaling),
                      *x3.stride(), swg, swn, swk, *p.stride(), *out3.stride(),
                      GATHER=slots is not None, HAS_PREV=prev3 is not None,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out3


def shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`x @ a.T` in `a`'s dtype (`a`: `(r, in)`)."""
    x3 = x.reshape(1, -1, x.shape[-1])
    out = torch.empty(1, x3.shape[1], a.shape[0], device=x.device, dtype=a.dtype)
    _launch(x3, (a, 0, a.stride(0), a.stride(1)), a.shape[0], out, None, None, 1.0)
    return out.reshape(*x.shape[:-1], a.shape[0])


def expand_add(prev: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`prev + scaling * h @ b.T` in `prev`'s dtype (`b`: `(out, r)`)."""
    h3 = h.reshape(1, -1, h.shape[-1])
    prev3 = prev.reshape(1, -1, prev.shape[-1])
    out = torch.empty_like(prev3)
    _launch(h3, (b, 0, b.stride(0), b.stride(1)), b.shape[0], out, prev3, None, scaling)
    return out.reshape(prev.shape)


def lora_add(prev: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             scaling: float) -> torch.Tensor:
    """`prev + scaling * (x @ a.T) @ b.T`: shrink, then expand with the add fused."""
    return expand_add(prev, shrink(x, a), b, scaling)


def gathered_add(prev: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a_t: torch.Tensor,
                 b_t: torch.Tensor) -> torch.Tensor:
    """Row `i`: `prev[i] + x[i] @ a_t[slots[i]] @ b_t[slots[i]]` (`a_t` `(n, in, r)`, `b_t`
    `(n, r, out)`), every row's tokens one tile row of the same adapter."""
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    rank, n_out = a_t.shape[2], b_t.shape[2]
    h = torch.empty(x3.shape[0], x3.shape[1], rank, device=x.device, dtype=a_t.dtype)
    slots = slots.to(torch.int32).contiguous()
    _launch(x3, (a_t, a_t.stride(0), a_t.stride(2), a_t.stride(1)), rank, h, None, slots, 1.0)
    prev3 = prev.reshape(x3.shape[0], x3.shape[1], n_out)
    out = torch.empty_like(prev3)
    _launch(h, (b_t, b_t.stride(0), b_t.stride(2), b_t.stride(1)), n_out, out, prev3, slots, 1.0)
    return out.reshape(prev.shape)
