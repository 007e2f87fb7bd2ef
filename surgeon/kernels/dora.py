"""Triton kernel for DoRA's weight norm: `||W + s * B @ A||` per output row, never building `W'`.

PEFT materialises `W + s * B @ A` (a weight-sized temporary) on every forward to take its row
norms. Here each program owns a block of output rows and walks the input axis in tiles: it
loads a tile of `W`, forms the same tile of `B @ A` with one `tl.dot` (the rank padded to 16),
and accumulates the squared sum in fp32. Memory traffic is one read of `W`; nothing is written
but the norms. The norm is detached in DoRA (the paper's gradient choice), so no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_norms(w_ptr, a_ptr, b_ptr, out_ptr, N, K, R, scaling, swn, swk, sar, sak, sbn, sbr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    bt = tl.load(b_ptr + rn[:, None] * sbn + rr[None, :] * sbr,
                 mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        at = tl.load(a_ptr + rr[:, None] * sar + ks[None, :] * sak,
                     mask=(rr[:, None] < R) & (ks[None, :] < K), other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + rn[:, None] * swn + ks[None, :] * swk,
                     mask=(rn[:, None] < N) & (ks[None, :] < K), other=0.0).to(tl.float32)
        full = wt + scaling * tl.dot(bt, at)
        acc += tl.sum(full * full, axis=1)
    tl.store(out_ptr + rn, tl.sqrt(acc), mask=rn < N)


def weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of `weight + scaling * b @ a` (`weight` `(out, in)`, `a` `(r, in)`, `b`
    `(out, r)`), fp32."""
    n, k = weight.shape
    r = a.shape[0]
    out = torch.empty(n, device=weight.device, dtype=torch.float32)
    bn = max(16, min(64, triton.next_power_of_2(n)))
    bk = max(16, min(128, triton.next_power_of_2(k)))
    br = max(16, triton.next_power_of_2(r))
    _row_norms[(triton.cdiv(n, bn),)](weight, a, b, out, n, k, r, float(scaling), *weight.stride(),
                                      *a.stride(), *b.stride(), BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br)
    return out
