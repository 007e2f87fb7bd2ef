"""LoHa on Linear, Conv1d and Conv2d: PEFT 0.21's `peft.tuners.loha` math, names and init.

The delta weight is `scale * (w1a @ w1b) * (w2a @ w2b)` (a Hadamard product of two rank-r
products), reshaped to the base weight; with `use_effective_conv2d` on a convolution with a
kernel larger than 1, each factor is a CP decomposition `einsum(t, w_b, w_a)` of the kernel.

The forward need not build the delta weight: a Hadamard product of two rank-r matrices is the
rank-r^2 matrix `(w1a (.) w2a) @ (w1b (.) w2b)`, where `(.)` pairs every column of one factor
with every column of the other (row-wise Khatri-Rao). Applied to the input it is two thin
matmuls (or a convolution and a 1x1 convolution), `r^2 (in + out)` multiply-adds per token
instead of `in * out`; this layer takes that path whenever it is the cheaper one, and otherwise
(tiny layers, CP kernels, grouped convolutions) builds the delta weight as PEFT does.

Training changes the balance: the factored path costs `3 r^2 (in + out)` per position
(forward, input gradient, factor gradients) and PEFT's separate delta GEMM three `in * out`,
while folding the delta into the base call (`F.linear(x, W + delta)`, see
`surgeon.methods.lycoris_layer`) costs one `in * out` weight-gradient GEMM and nothing in the
forward. A training graph folds unless the factored path is cheaper (`Loha.fold_cheaper`); at
r=8 on a hidden-256 llama every layer folds (the floor is then full fine-tuning's step plus the
delta's own cost), at hidden 1024 every layer stays factored. A folded Linear whose weight
gradient costs no less than the factored gradient (`2 r^2 (in + out) <= in * out`: every
layer of a hidden-256 llama at r=8) splits the fold (`surgeon.methods.lycoris_layer.SplitGrads`):
the factors' gradients come from `g.T @ (x @ down.T)` and `(g @ up).T @ x`, with no `(out, in)`
gradient or weight-sized temporaries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.methods.lycoris_layer import (
    LycorisRuntime,
    Shapes,
    conv_args,
    detached_weight,
    gated_result,
    gated_weight,
    kaiming,
    module_kept,
    split_result,
)

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import LayerView

_CONV = {3: F.conv1d, 4: F.conv2d}


def effective_cp(base: nn.Module, kind: str, use_effective_conv2d: bool) -> bool:
    """PEFT's rule: CP kernels only for convolutions whose kernel is not 1 (or 1x1)."""
    return bool(use_effective_conv2d) and kind != "Linear" and any(k != 1 for k in base.kernel_size)


def hadamard_weight(params: tuple, static: tuple) -> torch.Tensor:
    """PEFT's `make_weight` / `make_weight_cp` times the scale, in the base weight's shape."""
    w1a, w1b, w2a, w2b, t1, t2 = params
    _, scale, shape, _ = static
    if t1 is not None:
        one = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
        two = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
        return (one * two * scale).reshape(shape)
    return ((w1a @ w1b) * (w2a @ w2b) * scale).reshape(shape)


def _khatri_rao(w1a, w1b, w2a, w2b, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(up, down)` with `up @ down == scale * (w1a @ w1b) * (w2a @ w2b)`: `(out, r^2)` and `(r^2, in)`."""
    n_out, n_in = w1a.shape[0], w1b.shape[1]
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(n_out, -1) * scale
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, n_in)
    return up, down


def loha_delta(x: torch.Tensor, params: tuple, static: tuple) -> torch.Tensor:
    """The adapter's output for input `x` (no base output, no dropout)."""
    mode, scale, shape, conv = static
    x = x if x.dtype == params[0].dtype else x.to(params[0].dtype)
    if mode == "linear-factored":
        up, down = _khatri_rao(*params[:4], scale)
        return F.linear(F.linear(x, down), up)
    if mode == "linear":
        return F.linear(x, hadamard_weight(params, static))
    stride, padding, dilation, groups = conv
    conv_fn = _CONV[len(shape)]
    if mode == "conv-factored":  # groups == 1: conv with `down` as r^2 kernels, then 1x1 `up`
        up, down = _khatri_rao(*params[:4], scale)
        h = conv_fn(x, down.reshape(-1, *shape[1:]), None, stride, padding, dilation)
        return conv_fn(h, up.reshape(*up.shape, *(1,) * (len(shape) - 2)))
    return conv_fn(x, hadamard_weight(params, static), None, stride, padding, dilation, groups)


def loha_result(prev: torch.Tensor, x: torch.Tensor, params: tuple, static: tuple,
                dropouts: tuple | None) -> torch.Tensor:
    """The graph function: `prev + delta(x)`, with PEFT's dropouts in training."""
    shape = static[2]
    return gated_result(prev, dropouts, shape[0], len(shape) - 2,
                        lambda: loha_delta(x, params, static))


def loha_weight(weight: torch.Tensor, params: tuple, static: tuple,
                dropouts: tuple | None) -> torch.Tensor:
    """The weight-part function: `weight + delta`, with PEFT's dropouts (training)."""
    w1a, w1b, w2a, w2b, t1, _ = params
    if t1 is not None or (dropouts is not None and dropouts[1]):  # CP, or rank dropout
        return gated_weight(weight, dropouts, lambda: hadamard_weight(params, static))
    if dropouts is not None and not module_kept(dropouts[0]):  # PEFT's module dropout
        return weight
    return _HadamardFold.apply(weight, w1a, w1b, w2a, w2b, static[1])


class _HadamardFold(torch.autograd.Function):
    """`weight + scale * (w1a @ w1b) * (w2a @ w2b)`: one pass over the weight forward (an
    addcmul) and two backward, where autograd's mul, mul, add take three and three. The
    backward is PEFT's `HadaWeight` backward, the scale applied to the factors' gradients."""

    @staticmethod
    def forward(ctx, weight, w1a, w1b, w2a, w2b, scale):
        one, two = w1a @ w1b, w2a @ w2b
        ctx.save_for_backward(w1a, w1b, w2a, w2b, one, two)
        ctx.scale = scale
        return torch.addcmul(weight, one.view(weight.shape), two.view(weight.shape), value=scale)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b, one, two = ctx.saved_tensors
        grad_weight = grad if ctx.needs_input_grad[0] else None
        flat, s = grad.reshape(one.shape), ctx.scale
        grad_one, grad_two = flat * two, flat * one  # the scale goes on the small products
        return (grad_weight, (grad_one @ w1b.t()).mul_(s), (w1a.t() @ grad_one).mul_(s),
                (grad_two @ w2b.t()).mul_(s), (w2a.t() @ grad_two).mul_(s), None)


def loha_weight_detached(weight: torch.Tensor, params: tuple, static: tuple,
                         dropouts: tuple | None) -> torch.Tensor:
    """The weight part of a split fold: `weight + delta`, the delta outside autograd (built in
    the first product's buffer: two weight-sized allocations, where the expression takes four)."""
    if weight.requires_grad:
        return detached_weight(weight, dropouts, lambda: hadamard_weight(params, static))
    if dropouts is not None and not module_kept(dropouts[0]):  # PEFT's module dropout
        return weight
    w1a, w1b, w2a, w2b = params[:4]
    with torch.no_grad():
        one = torch.mm(w1a, w1b)
        return torch.addcmul(weight, one, torch.mm(w2a, w2b), value=static[1], out=one)


def loha_split(prev: torch.Tensor, x: torch.Tensor, params: tuple, static: tuple,
               folded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The output part of a split fold: `prev`, carrying the four factors' gradients."""
    return split_result(prev, x, _factor_grads, static, params[:4], folded, weight)


def _factor_grads(g: torch.Tensor, x: torch.Tensor, factors: tuple, static: tuple) -> tuple:
    """The factors' gradients of `y = x @ (scale * (w1a @ w1b) * (w2a @ w2b)).T` from `g = dL/dy`,
    through the Khatri-Rao form `up @ down` (see `_khatri_rao`, here unscaled): `d up = g.T @
    (x @ down.T)` and `d down = (g @ up).T @ x`, each then contracted with the other factor of
    its pair.

    Four GEMMs carry the cost (each at the CPU's GEMM peak). The dozen small ops around them
    cost several times their isolated time inside a training step (cold caches), so they are
    written for fewest ops: the scale rides the second GEMMs (`addmm`'s alpha), `w1a`, `w2a`
    are transposed once (one copy) so every broadcast runs along a contiguous last dimension,
    the products come out as wide `(r^2, .)` results (5-10% faster GEMMs than `(., r^2)` ones),
    and the per-row contractions are a broadcast product and a sum (no layout copy for a bmm).
    """
    w1a, w1b, w2a, w2b = factors
    (n_out, r1), r2, n_in = w1a.shape, w2a.shape[1], w1b.shape[1]
    g, x = g.reshape(-1, n_out), x.reshape(-1, n_in)
    a_t = torch.stack((w1a.t(), w2a.t()))  # (2, r, out), contiguous
    w1a_t, w2a_t = a_t[0], a_t[1]
    up_t = (w1a_t.unsqueeze(1) * w2a_t).view(r1 * r2, n_out)
    down = (w1b.unsqueeze(1) * w2b).view(r1 * r2, n_in)
    # addmm's input is ignored at beta=0: a factor's row (a view, no op) has the shape it needs
    d_up_t = torch.addmm(w2a_t[0], torch.mm(down, x.t()), g, beta=0, alpha=static[1]).view(r1, r2, n_out)
    d_down = torch.addmm(w2b[0], torch.mm(up_t, g.t()), x, beta=0, alpha=static[1]).view(r1, r2, n_in)
    return ((d_up_t * w2a_t).sum(1).t(), (d_down * w2b).sum(1),
            (d_up_t * w1a_t.unsqueeze(1)).sum(0).t(), (d_down * w1b.unsqueeze(1)).sum(0))


class Loha(LycorisRuntime):
    """The `loha` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "loha"
    containers = tuple((n, nn.ParameterDict) for n in (
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"))

    def shapes(self, base: nn.Module, kind: str, site: Site) -> Shapes:
        r, weight = site.r, base.weight.shape
        n_out, n_in = weight[0], weight[1]  # a convolution's in is in_channels // groups
        if effective_cp(base, kind, site.option("use_effective_conv2d", False)):
            kernel = tuple(base.kernel_size) + (1,) * (3 - len(base.kernel_size))
            t = (r, r, *kernel[:2])
            return {"hada_t1": t, "hada_w1_a": (r, n_out), "hada_w1_b": (r, n_in),
                    "hada_t2": t, "hada_w2_a": (r, n_out), "hada_w2_b": (r, n_in)}
        flat = n_in * (1 if kind == "Linear" else int(torch.Size(weight[2:]).numel()))
        return {"hada_w1_a": (n_out, r), "hada_w1_b": (r, flat),
                "hada_w2_a": (n_out, r), "hada_w2_b": (r, flat)}

    def initialise(self, layer: LayerView, adapter: str, init: bool | str) -> None:
        # FedPara's He init for every factor; PEFT's default zeroes w2_b (a no-op at start)
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            p = layer._modules[name][adapter]
            if name == "hada_w2_b" and init:
                nn.init.zeros_(p)
            else:
                kaiming(p)
        if adapter in layer.hada_t1:
            kaiming(layer.hada_t1[adapter])
            kaiming(layer.hada_t2[adapter])

    def _static(self, layer: LayerView, adapter: str, mode: str) -> tuple:
        base = layer.base_layer
        conv = None if layer.kind == "Linear" else conv_args(base)
        return (mode, layer.sites[adapter].scaling, tuple(base.weight.shape), conv)

    def weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        params = tuple(layer._modules[n].get(adapter) for n, _ in self.containers)
        return hadamard_weight(params, self._static(layer, adapter, "weight"))

    def graph_call(self, layer: LayerView, adapter: str):
        return loha_result, self._static(layer, adapter, self._mode(layer, adapter))

    def fold_call(self, layer: LayerView, adapter: str):
        return loha_weight, self._static(layer, adapter, "weight")

    def fold_cheaper(self, layer: LayerView, adapter: str, split: bool) -> bool:
        """Training: folding costs one weight-gradient GEMM (`in * out` per position); the
        factored path `3 r^2 (in + out)`, the delta path three GEMMs."""
        if not self._mode(layer, adapter).endswith("factored"):
            return True
        shape, r = layer.base_layer.weight.shape, layer.sites[adapter].r
        n_out, n_in = shape[0], shape[1] * int(torch.Size(shape[2:]).numel())
        return n_out * n_in <= 3 * r * r * (n_in + n_out)

    def split_call(self, layer: LayerView, adapter: str):
        """Split the fold where the factored gradient (`2 r^2 (in + out)` per position) costs
        less than the weight gradient (`in * out`); plain (not CP) Linear factors only."""
        n_out, n_in = layer.base_layer.weight.shape
        r = layer.sites[adapter].r
        return (loha_weight_detached, loha_split) if 2 * r * r * (n_in + n_out) <= n_in * n_out else None

    def _mode(self, layer: LayerView, adapter: str) -> str:
        """The cheaper forward: factored (`r^2 (in + out)` per position) or the delta weight."""
        base, r = layer.base_layer, layer.sites[adapter].r
        shape = base.weight.shape
        n_out, n_in, k = shape[0], shape[1], int(torch.Size(shape[2:]).numel())
        factored = r * r * (n_in * k + n_out) < n_out * n_in * k
        if layer.kind == "Linear":
            return "linear-factored" if factored else "linear"
        plain = adapter not in layer.hada_t1 and base.groups == 1
        return "conv-factored" if factored and plain else "conv"


METHOD = Loha()
