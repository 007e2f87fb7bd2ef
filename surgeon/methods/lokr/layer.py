"""LoKr on Linear, Conv1d and Conv2d: PEFT 0.21's `peft.tuners.lokr` math, names and init.

The delta weight is `scale * kron(w1, w2)`: the output and input sizes are each split into two
factors (`factorization`, PEFT's rule), `w1` is `(a, c)` and `w2` is `(b, d)` with `out = a*b`
and `in = c*d`. Either factor may itself be a rank-r product (`w1_a @ w1_b` with
`decompose_both`, `w2_a @ w2_b` when r is small against the factor), and a convolution's `w2`
carries the kernel (a CP decomposition `t2` with `use_effective_conv2d`).

On a Linear the forward never builds the `(out, in)` delta: with `x` viewed as a `(c, d)`
matrix per token, `kron(w1, w2) @ vec(x) = vec(w1 @ x @ w2.T)`, two small matmuls (four when
factored). A convolution builds PEFT's delta kernel (its size is that of the base kernel) and
convolves once, exactly as PEFT does, including PEFT's layout for a full-rank Conv1d `w2`.

In training a convolution, and a Linear where it is cheaper (`Lokr.fold_cheaper`), folds the
delta into the base call instead (`surgeon.methods.lycoris_layer`): one weight-gradient GEMM in
place of the delta kernel's three convolutions or the Kronecker path's reshapes and transposes.
A folded Linear (always, without rank dropout) splits the fold
(`surgeon.methods.lycoris_layer.SplitGrads`): the factors' gradients come from the output
gradient and the input as `sum_t G_t w2 X_t.T` and `sum_t G_t.T w1 X_t` (four small GEMMs over
two permuted copies of the activations), not from the `(out, in)` weight gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.methods.loha.layer import effective_cp
from surgeon.methods.lycoris_layer import (
    LycorisRuntime,
    Shapes,
    conv_args,
    detached_weight,
    gated_result,
    gated_weight,
    kaiming,
    split_result,
)

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import LayerView

_CONV = {3: F.conv1d, 4: F.conv2d}
_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into `(m, n)`, `m * n == dimension`, as LyCORIS and PEFT do.

    A positive `factor` that divides `dimension` is taken as `m` as it is. Otherwise `m` walks
    up the divisors while `m < n` and `m <= factor` (any divisor with factor -1), and the pair
    is returned smaller first: `factorization(128) == (8, 16)`, `factorization(127) == (1, 127)`.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return min(m, n), max(m, n)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.kron(a, b)` (the smaller tensor gets leading 1s), written as one broadcast product:
    torch.kron views its inputs and fails on some strides (PEFT's CP Conv1d kernels)."""
    n = max(a.dim(), b.dim())
    a = a.reshape((1,) * (n - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (n - b.dim()) + tuple(b.shape))
    pairs = [s for pair in zip(a.shape, (1,) * n) for s in pair]
    product = a.reshape(pairs) * b.reshape([s for pair in zip((1,) * n, b.shape) for s in pair])
    return product.reshape([x * y for x, y in zip(a.shape, b.shape)])


def kron_weight(params: tuple, static: tuple) -> torch.Tensor:
    """PEFT's `get_delta_weight` (no rank dropout): `scale * kron(w1, w2)` in the base shape."""
    w1, w1a, w1b, w2, w2a, w2b, t2 = params
    _, scale, shape, _ = static
    w1 = w1 if w1 is not None else w1a @ w1b
    if w2 is None:
        w2 = torch.einsum("ijkl,ip,jr->prkl", t2, w2a, w2b) if t2 is not None else w2a @ w2b
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (kron(w1, w2) * scale).reshape(shape)


def kron_linear(x: torch.Tensor, params: tuple, scale: float) -> torch.Tensor:
    """`x @ (scale * kron(w1, w2)).T` through reshapes: `w1 @ X @ w2.T` per token.

    Both products are single GEMMs over all tokens (`(tokens * c, d) @ w2.T`, then the `(c, b)`
    blocks transposed against `w1`), not one tiny matmul per token, which is what `w1 @ X`
    broadcast over tokens runs (about 1.2x slower in training at hidden 256)."""
    w1, w1a, w1b, w2, w2a, w2b, _ = params
    w1 = w1 if w1 is not None else w1a @ w1b  # (a, c): small
    c = w1.shape[1]
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1] // c)  # (tokens * c, d)
    h = F.linear(h, w2) if w2 is not None else F.linear(F.linear(h, w2b), w2a)  # (tokens * c, b)
    h = h.view(-1, c, h.shape[-1]).transpose(1, 2)  # (tokens, b, c)
    h = F.linear(h, w1 * scale)  # (tokens, b, a)
    return h.transpose(1, 2).reshape(*lead, -1)


def lokr_delta(x: torch.Tensor, params: tuple, static: tuple) -> torch.Tensor:
    """The adapter's output for input `x` (no base output, no dropout)."""
    mode, scale, shape, conv = static
    dtype = next(p.dtype for p in params if p is not None)
    x = x if x.dtype == dtype else x.to(dtype)
    if mode == "linear":
        return kron_linear(x, params, scale)
    stride, padding, dilation, groups = conv
    return _CONV[len(shape)](x, kron_weight(params, static), None, stride, padding, dilation, groups)


def lokr_result(prev: torch.Tensor, x: torch.Tensor, params: tuple, static: tuple,
                dropouts: tuple | None) -> torch.Tensor:
    """The graph function: `prev + delta(x)`, with PEFT's dropouts in training."""
    shape = static[2]
    return gated_result(prev, dropouts, shape[0], len(shape) - 2,
                        lambda: lokr_delta(x, params, static))


def lokr_weight(weight: torch.Tensor, params: tuple, static: tuple,
                dropouts: tuple | None) -> torch.Tensor:
    """The weight-part function: `weight + delta`, with PEFT's dropouts (training)."""
    return gated_weight(weight, dropouts, lambda: kron_weight(params, static))


def lokr_weight_detached(weight: torch.Tensor, params: tuple, static: tuple,
                         dropouts: tuple | None) -> torch.Tensor:
    """The weight part of a split fold: `weight + delta`, the delta outside autograd."""
    return detached_weight(weight, dropouts, lambda: kron_weight(params, static))


def lokr_split(prev: torch.Tensor, x: torch.Tensor, params: tuple, static: tuple,
               folded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The output part of a split fold: `prev`, carrying the factors' gradients (a factored
    `w1` or `w2` as its product, autograd taking the gradient on to its two factors)."""
    w1, w1a, w1b, w2, w2a, w2b, _ = params
    if folded is weight or not torch.is_grad_enabled():
        return prev
    w1 = w1 if w1 is not None else w1a @ w1b
    w2 = w2 if w2 is not None else w2a @ w2b
    return split_result(prev, x, _kron_grads, static, (w1, w2), folded, weight)


def _kron_grads(g: torch.Tensor, x: torch.Tensor, factors: tuple, static: tuple) -> tuple:
    """`(d w1, d w2)` of `y = x @ (scale * kron(w1, w2)).T` from `g = dL/dy`: with each token's
    output a `(a, b)` matrix `G_t` and input a `(c, d)` matrix `X_t`, `d w1 = s sum_t G_t w2 X_t.T`
    and `d w2 = s sum_t G_t.T w1 X_t`; both as GEMMs over `(a, tokens, .)` and `(c, tokens, d)`
    copies of G and X."""
    w1, w2 = factors
    (a, c), (b, d), scale = w1.shape, w2.shape, static[1]
    gp = g.reshape(-1, a, b).transpose(0, 1).reshape(a, -1)  # (a, tokens * b)
    xp = x.reshape(-1, c, d).transpose(0, 1).reshape(c, -1)  # (c, tokens * d)
    d_w1 = (gp.view(-1, b) @ w2).view(a, -1) @ xp.t()  # sum over tokens and d
    d_w2 = gp.view(-1, b).t() @ (w1 @ xp).view(-1, d)  # sum over a and tokens
    return d_w1.mul_(scale), d_w2.mul_(scale)


class Lokr(LycorisRuntime):
    """The `lokr` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "lokr"
    containers = tuple((n, nn.ParameterDict) for n in _NAMES)
    rescale_rank_dropout = None  # LoKr rescales only with rank_dropout_scale

    def shapes(self, base: nn.Module, kind: str, site: Site) -> Shapes:
        r, factor = site.r, int(site.option("decompose_factor", -1))
        n_out, n_in = base.weight.shape[0], base.weight.shape[1]  # in_channels // groups
        a, b = factorization(n_out, factor)
        c, d = factorization(n_in, factor)
        kernel = tuple(base.kernel_size) if kind != "Linear" else ()
        out: Shapes = {}
        if site.option("decompose_both", False) and r < max(a, c) / 2:
            out.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            out["lokr_w1"] = (a, c)
        if r >= max(b, d) / 2:
            out["lokr_w2"] = (b, d, *kernel)
        elif effective_cp(base, kind, site.option("use_effective_conv2d", False)):
            out.update(lokr_t2=(r, r, *(kernel + (1,))[:2]), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
        else:
            out.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * int(torch.Size(kernel).numel())))
        return out

    def initialise(self, layer: LayerView, adapter: str, init: bool | str) -> None:
        # PEFT's three schemes: the default zeroes w1 (or w1_a); "lycoris" zeroes w2 (or
        # w2_b); False draws every factor. He init otherwise, in PEFT's order.
        zero = {"lokr_w1", "lokr_w1_a"} if init is True else {"lokr_w2", "lokr_w2_b"} if init else set()
        order = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_b", "lokr_w2_a", "lokr_t2") \
            if init == "lycoris" else _NAMES
        for name in order:
            if adapter in layer._modules[name]:
                p = layer._modules[name][adapter]
                nn.init.zeros_(p) if name in zero else kaiming(p)

    def _static(self, layer: LayerView, adapter: str) -> tuple:
        base = layer.base_layer
        linear = layer.kind == "Linear"
        return ("linear" if linear else "conv", layer.sites[adapter].scaling,
                tuple(base.weight.shape), None if linear else conv_args(base))

    def weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        params = tuple(layer._modules[n].get(adapter) for n in _NAMES)
        return kron_weight(params, self._static(layer, adapter))

    def graph_call(self, layer: LayerView, adapter: str):
        return lokr_result, self._static(layer, adapter)

    def fold_call(self, layer: LayerView, adapter: str):
        return lokr_weight, self._static(layer, adapter)

    def split_call(self, layer: LayerView, adapter: str):
        """A folded Linear always splits (see the module docstring)."""
        return lokr_weight_detached, lokr_split

    def fold_cheaper(self, layer: LayerView, adapter: str, split: bool) -> bool:
        """Training. On a convolution the delta-kernel path costs three convolutions, the fold
        one. A split fold (a Linear) costs the delta weight once per step and small GEMMs per
        token: it wins at every size measured (hidden 256: 0.99x LoRA's training step; hidden
        1024: 1.00x, the Kronecker path 1.11x). A whole fold on a Linear (with rank dropout)
        costs `in * out` multiply-adds per token (the weight gradient); `kron_linear` three
        times its products plus about eight passes over the token's input and output (reshapes,
        transposes, the add), each pass costing about as much as 20 multiply-adds on a CPU."""
        if layer.kind != "Linear" or split:
            return True
        n_out, n_in = layer.base_layer.weight.shape
        if adapter in layer.lokr_w1:
            a, c = layer.lokr_w1[adapter].shape
        else:
            a, c = layer.lokr_w1_a[adapter].shape[0], layer.lokr_w1_b[adapter].shape[1]
        b, d = n_out // a, n_in // c
        if adapter in layer.lokr_w2:
            inner = c * d * b
        else:
            inner = c * layer.lokr_w2_b[adapter].shape[0] * (b + d)
        return n_out * n_in <= 3 * (inner + a * c * b) + 8 * 20 * (n_in + n_out)


METHOD = Lokr()
