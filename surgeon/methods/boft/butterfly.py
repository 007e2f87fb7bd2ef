"""BOFT's rotation: PEFT 0.21's butterfly sizes, permutations and Cayley blocks, applied blockwise.

PEFT builds each adapter's `(n, n)` rotation `M = P_{N-1} B_{N-1} P_{N-1}^T ... P_0 B_0 P_0^T`
densely (block-diagonal `B_i` of Cayley blocks, permutation matrices `P_i`) and multiplies by it.
Here `h @ M` is computed factor by factor as a gather, a batched `(blocks, b, b)` product and a
gather back: `n * b` multiply-adds per row and factor instead of `n * n`, no `n x n` tensor.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import nn

from surgeon.errors import UserError


class SizeError(UserError, ValueError):
    """A block size / block number / butterfly factor PEFT refuses on this layer."""


class Static(NamedTuple):
    """One adapter's rotation shape on one layer (graph constants)."""

    factors: int  # butterfly factors N (boft_n_butterfly_factor)
    blocks: int  # D, blocks per factor (boft_block_num)
    block_size: int  # b (boft_block_size)
    perms: tuple[tuple[int, ...], ...]  # P_i as index tuples; () when every P_i is the identity


def sizes(n: int, size: int, num: int, factor: int, what: str = "in_features") -> tuple[int, int]:
    """`(boft_block_size, boft_block_num)` on a layer of `n` features, with PEFT's refusals
    (`update_layer`, in its order and words); `factor` counts from 1 as the config does."""
    f = factor - 1
    if size == 0:
        if n % num != 0:
            raise SizeError(f"{what} ({n}) must be divisible by boft_block_num ({num})!")
        if f and f > int(math.log2(num)):
            raise SizeError(f"Invalid combination of boft_n_butterfly_factor ({factor}) and "
                            f"boft_block_num ({num})!")
        if f and num % (2**f) != 0:
            raise SizeError(f"boft_block_num ({num}) must be a multiple of 2 raised to the power of "
                            f"boft_n_butterfly_factor ({factor})!")
        size = n // num
    else:
        if n % size != 0:
            raise SizeError(f"{what} ({n}) must be divisible by boft_block_size ({size})!")
        if f and (n < size * 2**f or n % (size * 2**f) != 0):
            raise SizeError(f"Invalid combination of {what} ({n}), boft_n_butterfly_factor ({factor}) "
                            f"and boft_block_size ({size})!")
        num = n // size
    if f and num % 2 != 0:
        raise SizeError(f"boft_block_num ({num}) must be an even number!")
    if f and size % 2 != 0:
        raise SizeError(f"boft_block_size ({size}) must be an even number!")
    return size, num


def butterfly_perm(n: int, b: int, r: int, f: int) -> list[int]:
    """PEFT's `block_butterfly_perm`: the index permutation of one butterfly factor."""
    if f == 0:
        return list(range(n))
    if b * r * 2 > n:
        raise SizeError("Invalid number of blocks!")
    width = n // b
    step = width / r
    seq = [*range(0, math.ceil(step), 2), *range(1, math.ceil(step), 2)]
    order = [j for pos in seq for j in range(pos * r, pos * r + r)]
    return [start + order[k] for start in range(0, n, width) for k in range(width)]


def static(n: int, size: int, num: int, factor: int, what: str = "in_features") -> Static:
    """The rotation shape and permutations of one adapter on a layer of `n` features."""
    size, num = sizes(n, size, num, factor, what)
    perms = tuple(tuple(butterfly_perm(n, int(num / 2**i), int(size / 2), factor - 1))
                  for i in range(factor))
    if all(p == tuple(range(n)) for p in perms):
        perms = ()
    return Static(factor, num, size, perms)


def cayley(weight: torch.Tensor) -> torch.Tensor:
    """PEFT's `cayley_batch` over `boft_R` `(N, D, b, b)`: `(I - S)(I + S)^-1`, S its skew part."""
    n, d, b, _ = weight.shape
    data = weight.view(n * d, b, b)
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(b, device=data.device).unsqueeze(0).expand(n * d, b, b)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(data.dtype).view(n, d, b, b)


@functools.lru_cache(maxsize=256)
def _index(perm: tuple[int, ...], inverse: bool, device: torch.device) -> torch.Tensor:
    index = torch.tensor(perm, device=device)
    return torch.argsort(index) if inverse else index


def _factor(h: torch.Tensor, blocks: torch.Tensor, perm: tuple[int, ...] | None) -> torch.Tensor:
    """`h @ P B P^T` for one factor (`blocks` `(D, b, b)`)."""
    if perm is not None:
        h = h.index_select(-1, _index(perm, True, h.device))
    d, b = blocks.shape[0], blocks.shape[1]
    out = torch.einsum("...dk,dkc->...dc", h.reshape(*h.shape[:-1], d, b), blocks).reshape(h.shape)
    return out if perm is None else out.index_select(-1, _index(perm, False, h.device))


def rotate(h: torch.Tensor, blocks: torch.Tensor, perms: tuple, transpose: bool = False) -> torch.Tensor:
    """`h @ M` (`transpose`: `h @ M^T`) for the rotation of `blocks` `(N, D, b, b)`."""
    order = range(blocks.shape[0]) if transpose else range(blocks.shape[0] - 1, -1, -1)
    for i in order:
        factor = blocks[i].transpose(1, 2) if transpose else blocks[i]
        h = _factor(h, factor, perms[i] if perms else None)
    return h


class ButterflyDropout(nn.Module):
    """PEFT's `MultiplicativeDropoutLayer` (same RNG draws): in training, `p` of the blocks of
    one random factor become the identity. Also holds the adapter's `Static` for the graph."""

    def __init__(self, p: float, shape: Static) -> None:
        super().__init__()
        self.p, self.static = p, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        n, d, h, _ = x.shape
        chosen = torch.randint(0, n, (1,)).item()
        keep = int(self.p * d)
        mask = torch.cat([torch.ones(keep, device=x.device), torch.zeros(d - keep, device=x.device)])
        mask = mask[torch.randperm(d)].view(1, d, 1, 1)
        full = torch.zeros(n, d, 1, 1, device=x.device)
        full[chosen] = mask
        eye = torch.eye(h, device=x.device).repeat(n, d, 1, 1)
        return (1 - full) * x + full * eye
