"""What the LoHa and LoKr runtimes share: PEFT's LycorisLayer, as one abstract base.

Both methods keep per-adapter tensors in `nn.ParameterDict`s named as PEFT names them (so
state_dict and checkpoint keys match), create them empty and initialise them in PEFT's order
(so a seeded RNG draws the same numbers), scale by `alpha / r` (`Site.scaling`), and add
`delta(x)` to the base output. In training, as PEFT's `LycorisLayer.forward`, each adapter
first draws `torch.rand(1)` and is skipped when it is not above `module_dropout`, then (with
`rank_dropout`) draws one keep/drop value per output channel. The draws happen in PEFT's order
so a seeded training step takes the same path in both.

A method subclasses `LycorisRuntime` with its parameter shapes, its initialisation, its full
delta weight (PEFT's `get_delta_weight`, used to merge) and its graph function (the forward,
which may avoid building the delta weight). PEFT runs no mixed-adapter batches for either.

In training a method may instead fold its delta into the weight the base call reads
(`F.linear(x, W + delta)`, a weight part): the forward and the input gradient then ride the
base GEMM, and the extra cost is one weight-gradient GEMM (`tokens * in * out`), where the
separate delta path costs three and a factored path `3 * tokens * r^2 * (in + out)` (LoHa)
(`fold_cheaper` decides). Gradients are PEFT's to float rounding. The fold is used only on an
inlined float32/64 base call of the adapters' dtype, and only when it cannot change the order
of dropout draws (one adapter on the layer, or no module/rank dropout).

On a Linear without rank dropout whose base output no other adapter has touched, a method may
split the fold (`split_call`): the weight part adds the delta without autograd (so the base
call's backward computes only the input gradient) and an output-part node, an identity in the
forward, computes the factors' gradients from the output gradient and the input directly
(`SplitGrads`), without the `(out, in)` weight gradient: LoKr's Kronecker factors in two small
GEMMs over permuted activations, LoHa's in four rank-r^2 GEMMs where `2 r^2 (in + out) <= in*out`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.graph import META, tag
from surgeon.runtime.method import remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

Shapes = dict[str, tuple[int, ...]]  # container name -> parameter shape, in PEFT's creation order


class MixedBatchError(UserError, ValueError):
    """PEFT's LoHa and LoKr layers take no `adapter_names` (one adapter per batch row)."""


def conv_args(base: nn.Module) -> tuple:
    """`(stride, padding, dilation, groups)` of a base convolution, as graph constants."""
    return (tuple(base.stride), base.padding if isinstance(base.padding, str) else tuple(base.padding),
            tuple(base.dilation), base.groups)


def kaiming(p: torch.Tensor) -> None:
    """PEFT's initialiser for LyCORIS factors (He uniform, as nn.Linear's default)."""
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def rank_drop(n_out: int, p: float, rescale: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """PEFT's rank dropout: one keep (1) / drop (0) per output channel, optionally divided by
    its mean (LoHa always does; LoKr when `rank_dropout_scale`)."""
    drop = (torch.rand(n_out) > p).to(dtype)
    if rescale:
        drop /= drop.mean()
    return drop.to(device)


def module_kept(p: float) -> bool:
    """PEFT's module-dropout draw, `bool(torch.rand(1) > p)`: the same draw, compared in Python.

    Torch compares the draw with `p` rounded to the draw's dtype, so `p` is rounded the same
    way (float32 through `struct`); in a training step this skips the comparison op, most of
    the draw's cost there (about 12 of 15 microseconds per layer on a CPU).
    """
    draw = torch.rand(1)
    if draw.dtype == torch.float32:
        return draw.item() > struct.unpack("f", struct.pack("f", p))[0]
    if draw.dtype == torch.float64:
        return draw.item() > p
    return bool(draw > p)


def gated_result(prev: torch.Tensor, dropouts: tuple | None, n_out: int, channel_dims: int,
                 delta: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`prev + delta()`, with PEFT's module and rank dropout when `dropouts` is
    `(module_dropout, rank_dropout, rescale)` (training).

    `channel_dims` is how many dimensions follow the output channel (0 for Linear, the spatial
    dimensions for a convolution), to broadcast the rank-dropout vector.
    """
    if dropouts is None:
        return prev + delta()
    module_p, rank_p, rescale = dropouts
    if not module_kept(module_p):
        return prev
    out = delta()
    if rank_p:
        drop = rank_drop(n_out, rank_p, rescale, out.dtype, out.device)
        out = out * drop.view(-1, *(1,) * channel_dims)
    return prev + out


def gated_weight(weight: torch.Tensor, dropouts: tuple | None,
                 delta: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`weight + delta()` (the delta in the weight's shape), with PEFT's module and rank dropout
    drawn as `gated_result` draws them: the folded form of `gated_result` for the base call."""
    if dropouts is None:
        return weight + delta()
    module_p, rank_p, rescale = dropouts
    if not module_kept(module_p):
        return weight
    out = delta()
    if rank_p:
        drop = rank_drop(weight.shape[0], rank_p, rescale, out.dtype, out.device)
        out = out * drop.view(-1, *(1,) * (weight.dim() - 1))
    return weight + out


def detached_weight(weight: torch.Tensor, dropouts: tuple | None,
                    delta: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The weight part of a split fold: `weight + delta()`, the delta outside autograd (its
    factors get their gradients from the output part, `SplitGrads`); PEFT's module-dropout
    draw as `gated_weight`, returning `weight` itself when the adapter is dropped."""
    if dropouts is not None and not module_kept(dropouts[0]):
        return weight
    with torch.no_grad():
        out = delta()
    # an unfrozen base weight still gets its gradient through the base call
    return weight + out if weight.requires_grad else out.add_(weight)


class SplitGrads(torch.autograd.Function):
    """The output part of a split fold: the base output unchanged, and in the backward the
    factors' gradients from the output gradient `g` and the layer input `x`, by
    `grads(g, x, tensors, static)`.

    The output is `prev` itself, marked dirty (autograd then treats it as modified in place,
    so later in-place ops on it stay legal; nothing saved it: it is the base call's fresh
    output), or a copy where `prev` is a view (a biased Linear on a 3-D input) or compiling.
    """

    @staticmethod
    def forward(ctx, prev, x, grads, static, *tensors):
        ctx.save_for_backward(x, *tensors)
        ctx.grads, ctx.static = grads, static
        if prev._base is not None or torch.compiler.is_compiling():
            return prev.clone()
        ctx.mark_dirty(prev)
        return prev

    @staticmethod
    def backward(ctx, g):
        x, *tensors = ctx.saved_tensors
        return (g, None, None, None, *ctx.grads(g, x, tuple(tensors), ctx.static))


def split_result(prev: torch.Tensor, x: torch.Tensor, grads: Callable[..., tuple],
                 static: tuple, tensors: tuple, folded: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """`prev` (the base output, already with the delta), carrying the factors' gradients
    unless the weight part dropped the adapter (`folded is weight`) or none is needed."""
    if folded is weight or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return prev
    return SplitGrads.apply(prev, x, grads, static, *tensors)


class LycorisRuntime:
    """The shared part of a LyCORIS method's `MethodRuntime` (see the module docstring)."""

    name: str
    containers: tuple[tuple[str, type[nn.Module]], ...]
    rescale_rank_dropout: bool | None = True  # None: the site's `rank_dropout_scale` decides

    # ------------------------------------------------------------------ per method
    def shapes(self, base: nn.Module, kind: str, site: Site) -> Shapes:
        """The adapter's parameter shapes on `base` (works on the meta device)."""
        raise NotImplementedError

    def initialise(self, layer: LayerView, adapter: str, init: bool | str) -> None:
        """PEFT's reset_adapter_parameters* for `init_weights`, in PEFT's order."""
        raise NotImplementedError

    def weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's `get_delta_weight` without rank dropout: scaled, in the base weight's shape."""
        raise NotImplementedError

    def graph_call(self, layer: LayerView, adapter: str) -> tuple[Callable[..., Any], tuple]:
        """The graph function `fn(prev, x, params, static, dropouts)` and its `static` constants."""
        raise NotImplementedError

    def fold_call(self, layer: LayerView, adapter: str) -> tuple[Callable[..., Any], tuple]:
        """The weight-part function `fn(weight, params, static, dropouts)` (`weight + delta`)."""
        raise NotImplementedError

    def fold_cheaper(self, layer: LayerView, adapter: str, split: bool) -> bool:
        """Whether a training step is cheaper with the delta folded into the base call (`split`:
        the fold would be split, see `split_call`)."""
        return False

    def split_call(self, layer: LayerView, adapter: str) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
        """Where a training graph folds: a split fold's `(weight_fn(weight, params, static,
        dropouts), result_fn(prev, x, params, static, folded, weight))` (see the module
        docstring), or None to fold whole."""
        return None

    # ------------------------------------------------------------------ MethodRuntime
    def add(self, layer: LayerView, site: Site) -> None:
        if site.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {site.r}")
        for name, shape in self.shapes(layer.base_layer, site.kind, site).items():
            layer._modules[name][site.adapter] = nn.Parameter(torch.empty(shape))
        self.initialise(layer, site.adapter, site.option("init_weights", True))
        weight = layer.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for name, _ in self.containers:
            table = layer._modules[name]
            if site.adapter in table:
                table[site.adapter] = nn.Parameter(table[site.adapter].detach().to(weight.device, dtype))

    def remove(self, layer: LayerView, adapter: str) -> None:
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        return sum(math.prod(s) for s in self.shapes(base, site.kind, site).values())

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise MixedBatchError(
            f"`adapter_names` (one adapter per batch row) is not supported by {self.name} adapters "
            f"(`{layer.path}`), as in PEFT; run one adapter per batch with `set_adapter`.")

    def params(self, b: Builder, adapter: str) -> tuple[fx.Node | None, ...]:
        """A get_attr per container (None where the adapter has no tensor), containers' order."""
        return tuple(b.attr(f"{name}.{adapter}") if adapter in b.layer._modules[name] else None
                     for name, _ in self.containers)

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        fn, static = self.graph_call(b.layer, adapter)
        dropouts = None
        if b.layer.training:
            site = b.layer.sites[adapter]
            rescale = self.rescale_rank_dropout
            if rescale is None:
                rescale = bool(site.option("rank_dropout_scale", False))
            dropouts = (float(site.option("module_dropout", 0.0) or 0.0),
                        float(site.option("rank_dropout", 0.0) or 0.0), rescale)
            split = self._split(b, adapter, dropouts, prev) if rows is None else None
            if rows is None and self._folds(b, adapter, split is not None):
                part = b.weight_part()
                fold_fn, fold_static = self.fold_call(b.layer, adapter)
                if split is None:
                    part.weight_result(part.call(fold_fn, part.x, self.params(part, adapter),
                                                 fold_static, dropouts))
                    return prev
                weight_fn, result_fn = split
                folded = part.weight_result(part.call(weight_fn, part.x, self.params(part, adapter),
                                                      fold_static, dropouts))
                base_x = prev.args[0]  # what the base call reads (an input part's result, or x)
                node = b.call(result_fn, prev, base_x, self.params(b, adapter), fold_static,
                              folded, part.x)
                node.meta[META]["role"] = "result"
                return node
        node = b.call(fn, prev, b.x, self.params(b, adapter), static, dropouts)
        node.meta[META]["role"] = "result"  # a function of `prev` (its args[0]), as `prev + delta`
        return node

    def _folds(self, b: Builder, adapter: str, split: bool) -> bool:
        """Fold this adapter into the base call (see the module docstring)?"""
        layer = b.layer
        base = next(n for n in b.graph.nodes if tag(n).get("role") == "base_out")
        weight = layer.base_layer.weight
        if base.op != "call_function" or weight.dtype not in (torch.float32, torch.float64):
            return False
        if any(p.dtype != weight.dtype for p in layer.adapter_parameters(adapter)):
            return False
        if len(layer.sites) > 1 and any(site.option("module_dropout", 0.0) or site.option("rank_dropout", 0.0)
                                        for site in layer.sites.values()):
            return False  # weight parts draw before the base call, output parts after it:
            # with several adapters the draws could come in another order than PEFT's
        return self.fold_cheaper(layer, adapter, split)

    def _split(self, b: Builder, adapter: str, dropouts: tuple, prev: fx.Node):
        """The split fold's functions when it applies: a Linear, no rank dropout, and `prev`
        the base call itself (so the output gradient is the base output's)."""
        if b.layer.kind != "Linear" or dropouts[1] or tag(prev).get("role") != "base_out" \
                or prev.target is not torch._C._nn.linear:
            return None
        return self.split_call(b.layer, adapter)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        with torch.no_grad():
            return self.weight(layer, adapter)

    def _out_major(self, layer: LayerView, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.delta_weight(layer, adapter)
        return delta.reshape(delta.shape[0], -1).to(torch.promote_types(dtype, delta.dtype))

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        return weight + self._out_major(layer, adapter, weight.dtype)

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self._out_major(layer, adapter, weight.dtype)

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None

    def clear_caches(self, layer: LayerView) -> None:
        pass

    # PEFT's LycorisLayer.merge adds the delta to grouped convolutions too (its shapes use
    # in_channels // groups), so the fold step may merge them (see surgeon.runtime.fold).
    merges_grouped_conv = True
