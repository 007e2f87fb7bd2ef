"""LoRA, rsLoRA and DoRA on Linear, transformers Conv1D, Conv1d/2d/3d and Embedding.

The math is PEFT 0.21's `peft.tuners.lora` (layer.py, dora.py, variants.py), so an adapted layer
and PEFT's `LoraLayer` agree on parameter names, initialisation, forward and merge. Where PEFT
differs per base class, this file uses one out-major view of the base weight (see
`surgeon.runtime.base_kinds`): the delta is `scaling * B @ A` with `B` as `(out, r)` and `A` as
`(r, in*k)` for every kind.

rsLoRA is only a different `Site.scaling` (alpha / sqrt(r)), computed by the planner. DoRA's
forward math lives in `surgeon.methods.lora.dora`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon import kernels
from surgeon.methods.lora import dora as lora_dora
from surgeon.methods.lora import mha
from surgeon.methods.lora import param as lora_param
from surgeon.runtime import graph
from surgeon.runtime.base_kinds import (
    CONV_KINDS,
    conv_fn,
    embedding_args,
    from_out_major,
    in_out_features,
    main_weight,
)
from surgeon.runtime.method import remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

# PEFT initialisations that need data, an SVD of the base weight or a quantiser: not lowered yet.
UNSUPPORTED_INITS = ("pissa", "corda", "olora", "mica", "loftq", "eva", "orthogonal", "lora_ga")
_CONV = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}


@dataclass(frozen=True, slots=True)
class LoraOptions:
    """The per-site LoRA options the lowering reads (PEFT field names in `Site.options`)."""

    dropout: float  # lora_dropout
    init: bool | str  # init_lora_weights: True, False or "gaussian"
    use_dora: bool  # use_dora
    lora_bias: bool  # lora_bias: a trainable bias on lora_B
    inference_mode: bool  # inference_mode: new adapters start frozen

    @classmethod
    def of(cls, site: Site) -> LoraOptions:
        init = site.option("init_lora_weights", True)
        if isinstance(init, str):
            if init.lower() != "gaussian":
                name = init.lower()
                if name.startswith(UNSUPPORTED_INITS):
                    raise NotImplementedError(
                        f"init_lora_weights={init!r} is not supported by surgeon's LoRA lowering "
                        f"(site `{site.path}`); use True, False or 'gaussian'.")
                raise ValueError(f"Unknown initialization init_lora_weights={init!r}.")
            init = "gaussian"
        opts = cls(float(site.option("lora_dropout", 0.0) or 0.0), init,
                   bool(site.option("use_dora", False)), bool(site.option("lora_bias", False)),
                   bool(site.option("inference_mode", False)))
        if opts.lora_bias and opts.use_dora:  # PEFT's LoraConfig rejects these pairs too
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass "
                             "use_dora=False")
        if opts.lora_bias and init not in (True, False):
            raise ValueError("The argument lora_bias=True is only supported with "
                             f"init_lora_weights=True or False, got init_lora_weights={init}.")
        return opts


def _check(layer: LayerView, site: Site, opts: LoraOptions) -> None:
    base, kind = layer.base_layer, site.kind
    if site.r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {site.r}")
    if kind == "Embedding" and opts.lora_bias:
        raise ValueError("lora_bias=True is not supported for Embedding.")
    if kind in CONV_KINDS and site.r % base.groups != 0:
        raise ValueError(
            f"Targeting a {type(base).__name__} with groups={base.groups} and rank {site.r}. "
            "Currently, support is limited to conv layers where the rank is divisible by groups.")
    if opts.lora_bias and kind != "Embedding" and base.bias is None:
        warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type "
                      f"{type(base).__name__} has no bias. This means that merging LoRA weights "
                      "won't be possible.", stacklevel=3)


def _create(layer: LayerView, site: Site, opts: LoraOptions) -> None:
    """Create the modules in PEFT's order, so a seeded RNG draws the same numbers."""
    base, kind, a, r = layer.base_layer, site.kind, site.adapter, site.r
    n_in, n_out = in_out_features(base, kind)
    layer.lora_dropout[a] = nn.Dropout(p=opts.dropout) if opts.dropout > 0 else nn.Identity()
    if kind == "Embedding":
        layer.lora_embedding_A[a] = nn.Parameter(torch.randn((r, n_in)))
        layer.lora_embedding_B[a] = nn.Parameter(torch.randn((n_out, r)))
    elif kind in CONV_KINDS:
        ones = (1,) * (base.weight.dim() - 2)
        conv = _CONV[kind]
        layer.lora_A[a] = conv(n_in, r, base.kernel_size, base.stride, base.padding, bias=False)
        layer.lora_B[a] = conv(r, n_out, ones, ones, groups=base.groups, bias=opts.lora_bias)
    else:
        layer.lora_A[a] = nn.Linear(n_in, r, bias=False)
        layer.lora_B[a] = nn.Linear(r, n_out, bias=opts.lora_bias)


def _initialise(layer: LayerView, site: Site, init: bool | str) -> None:
    """PEFT's `reset_lora_parameters`: A random, B zero (Embedding: A zero, B normal)."""
    a = site.adapter
    if init is False:
        return  # keep the default (random) init of both factors, as PEFT does
    if site.kind == "Embedding":
        nn.init.zeros_(layer.lora_embedding_A[a])
        nn.init.normal_(layer.lora_embedding_B[a])
        return
    lora_a, lora_b = layer.lora_A[a], layer.lora_B[a]
    if init is True:
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    else:
        nn.init.normal_(lora_a.weight, std=1 / site.r)
    nn.init.zeros_(lora_b.weight)
    if lora_b.bias is not None:
        nn.init.zeros_(lora_b.bias)


def _move_to_base(layer: LayerView, adapter: str) -> None:
    """PEFT's `_move_adapter_to_device_of_base_layer`: the base weight's device and float dtype."""
    weight = main_weight(layer.base_layer, layer.kind)
    dtype = weight.dtype if weight.dtype.is_floating_point else None
    for name in ("lora_A", "lora_B", "lora_dropout"):
        if adapter in layer._modules[name]:
            layer._modules[name][adapter].to(weight.device, dtype)
    for name in ("lora_embedding_A", "lora_embedding_B"):
        table = layer._modules[name]
        if adapter in table:
            table[adapter] = nn.Parameter(table[adapter].detach().to(weight.device, dtype))


def factors(layer: LayerView, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, A)` as out-major matrices `(out, r)` and `(r, in*k)` (views of the parameters)."""
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_B[adapter], layer.lora_embedding_A[adapter]
    return layer.lora_B[adapter].weight.flatten(1), layer.lora_A[adapter].weight.flatten(1)


def delta_out_major(layer: LayerView, adapter: str) -> torch.Tensor:
    """`scaling * B @ A` in fp32 (at least), out-major."""
    b, a = factors(layer, adapter)
    dtype = torch.promote_types(b.dtype, torch.float32)
    return (b.detach().to(dtype) @ a.detach().to(dtype)).mul_(layer.sites[adapter].scaling)


class Lora:
    """The `lora` method's runtime (`surgeon.runtime.method.MethodRuntime`): LoRA, rsLoRA, DoRA."""

    name = "lora"
    containers = (
        ("lora_dropout", nn.ModuleDict), ("lora_A", nn.ModuleDict), ("lora_B", nn.ModuleDict),
        ("lora_embedding_A", nn.ParameterDict), ("lora_embedding_B", nn.ParameterDict),
        ("lora_magnitude_vector", nn.ModuleDict),
    )

    def add(self, layer: LayerView, site: Site) -> None:
        opts = LoraOptions.of(site)
        if site.kind == lora_param.KIND:
            return self._add_param(layer, site, opts)
        if site.kind == mha.KIND:
            mha.check(layer.base_layer, site, opts.use_dora, opts.lora_bias)
        _check(layer, site, opts)
        if site.kind == mha.KIND:  # PEFT's order: out_proj's adapter, in_proj's, out_proj's again
            mha.add_out_proj(layer, site)
        _create(layer, site, opts)
        _initialise(layer, site, opts.init)
        _move_to_base(layer, site.adapter)
        if site.kind == mha.KIND:
            mha.add_out_proj(layer, site)
        if opts.use_dora:
            lora_dora.add_magnitude(layer, site.adapter, *factors(layer, site.adapter))

    def _add_param(self, layer: LayerView, site: Site, opts: LoraOptions) -> None:
        """PEFT's `ParamWrapper.update_layer`: refusals, factors, init, device and dtype."""
        lora_param.check(site, opts.dropout, opts.use_dora, opts.lora_bias)
        lora_param.check_same_parameter(layer, site)
        if site.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {site.r}")
        lora_param.create(layer, site)
        _initialise(layer, site, opts.init)
        lora_param.move_to_param(layer, site.adapter)

    def remove(self, layer: LayerView, adapter: str) -> None:
        if layer.kind == mha.KIND:
            mha.remove_out_proj(layer, adapter)
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        if site.kind == lora_param.KIND:
            return lora_param.num_params(base, site)
        opts = LoraOptions.of(site)
        n_in, n_out = in_out_features(base, site.kind)
        r = site.r
        if site.kind == mha.KIND:  # in_proj (E -> 3E) and the nested out_proj (E -> E)
            return r * n_in + n_out * r + 2 * r * n_in
        if site.kind in CONV_KINDS:
            count = r * n_in * math.prod(base.kernel_size) + n_out * (r // base.groups)
        else:
            count = r * n_in + n_out * r
        return count + n_out * (int(opts.lora_bias) + int(opts.use_dora))

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        if adapter in layer.lora_magnitude_vector:
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        site = b.layer.sites[adapter]
        if site.kind in (mha.KIND, lora_param.KIND):
            return prev  # the module's call substitutes the deltas (`forward_module`)
        x = b.x if rows is None else b.call(torch.index_select, b.x, 0, rows)
        if site.kind == "Embedding":
            return _emit_embedding(b, adapter, x, prev, rows)
        x = _cast_input(b, adapter, x)
        dropped = _dropout(b, adapter, x)
        if rows is None and _fused(b, adapter):
            return b.as_result(b.call(kernels.lora_add, prev, dropped, b.attr(f"lora_A.{adapter}.weight"),
                                      b.attr(f"lora_B.{adapter}.weight"), site.scaling))
        expand_add = _expand_add(b, adapter, prev) if rows is None else None
        if expand_add is graph.expand_add_:  # eval, into the base output: one call
            return b.as_result(b.call(graph.lora_add_, prev, dropped, b.attr(f"lora_A.{adapter}.weight"),
                                      b.attr(f"lora_B.{adapter}.weight"), site.scaling))
        if expand_add is not None:
            h = b.call(torch._C._nn.linear, dropped, b.attr(f"lora_A.{adapter}.weight"))
            return b.as_result(b.call(expand_add, prev, h, b.attr(f"lora_B.{adapter}.weight"),
                                      site.scaling))
        delta = emit_lora(b, adapter, dropped)
        if adapter in b.layer.lora_magnitude_vector:
            return lora_dora.emit(b, adapter, delta, dropped if dropped is not x else None, prev)
        if rows is None:
            return b.result(prev, delta, site.scaling)
        return b.index_result(prev, rows, delta, site.scaling)

    # A MultiheadAttention or a bare parameter's module reads its own weights: called and
    # folded through `mha` or `param`.
    def forward_module(self, layer: LayerView, *args, **kwargs):
        return _whole(layer).forward(layer, *args, **kwargs)

    def merge_module(self, layer: LayerView, adapters: list[str], safe_merge: bool) -> bool:
        return _whole(layer).merge_weights(layer, adapters, safe_merge)

    def unmerge_module(self, layer: LayerView) -> bool:
        return _whole(layer).unmerge_weights(layer)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        if layer.kind == lora_param.KIND:
            return lora_param.delta(layer, adapter)
        if layer.kind == mha.KIND:
            return mha.delta(layer, adapter, layer.base_layer.in_proj_weight.dtype)
        delta = delta_out_major(layer, adapter)
        if layer.kind != "Linear":  # Linear is out-major; a bitsandbytes one's weight is packed
            delta = from_out_major(delta, layer.kind, layer.base_layer.weight.shape)
        return delta.to(factors(layer, adapter)[1].dtype)

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        delta = delta_out_major(layer, adapter)
        if adapter in layer.lora_magnitude_vector:
            return lora_dora.fold(layer, adapter, weight, unmerged, delta)
        # `delta` is ours: the sum goes into it (bitwise `weight + delta`, one buffer fewer)
        return delta.add_(weight) if delta.dtype == weight.dtype else weight + delta

    def additive_factors(self, layer: LayerView, adapter: str):
        """`(B, A, scaling)`: `fold` adds `scaling * B @ A` (out-major), except DoRA's (None);
        the fold step may then merge with one `addmm_` (see runtime/fold.py)."""
        if adapter in layer.lora_magnitude_vector:
            return None
        b, a = factors(layer, adapter)
        return b.detach(), a.detach(), layer.sites[adapter].scaling

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        delta = delta_out_major(layer, adapter)
        if adapter in layer.lora_magnitude_vector:
            return lora_dora.unfold(layer, adapter, weight, delta)
        return torch.sub(weight, delta, out=delta) if delta.dtype == weight.dtype else weight - delta

    def clear_caches(self, layer: LayerView) -> None:
        for magnitude in layer.lora_magnitude_vector.values():
            magnitude.norm_cache = None

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        if adapter not in layer.lora_B or layer.lora_B[adapter].bias is None:
            return None
        return layer.lora_B[adapter].bias.detach().float() * layer.sites[adapter].scaling


def _whole(layer: LayerView):
    """The module-level path of a whole-module kind."""
    return lora_param if layer.kind == lora_param.KIND else mha


def _fused(b: Builder, adapter: str) -> bool:
    """Whether the branch is one `kernels.lora_add` call (shrink, then expand with the add
    fused): plain LoRA on a matrix product, with adapters where the kernels run (a GPU)."""
    layer = b.layer
    if layer.kind not in ("Linear", "Conv1D") or adapter in layer.lora_magnitude_vector:
        return False
    return layer.lora_B[adapter].bias is None and kernels.wanted(layer.lora_A[adapter].weight.device)


def _expand_add(b: Builder, adapter: str, prev: fx.Node):
    """The branch's expand-and-add after the shrink (`surgeon.runtime.graph`), or None for the
    general `emit_lora` + `add`: plain LoRA on a matrix product, no lora_bias, the adapter in the
    base's dtype (a cast adapter's sum promotes, as PEFT's). Eval graphs write into a base output
    they own (`expand_add_`); train graphs add out of place; eval on a base output the graph does
    not own (a hooked base) keeps the general path."""
    layer = b.layer
    if layer.kind not in ("Linear", "Conv1D") or adapter in layer.lora_magnitude_vector:
        return None
    weight = layer.lora_B[adapter].weight
    if layer.lora_B[adapter].bias is not None or weight.dtype != layer.base_layer.weight.dtype:
        return None
    if layer.training:
        return graph.expand_add
    return graph.expand_add_ if graph.owned(b, prev) else None


def _cast_input(b: Builder, adapter: str, x: fx.Node) -> fx.Node:
    """PEFT casts the input to the adapter's dtype; only emitted when the dtypes differ."""
    dtype = b.layer.lora_A[adapter].weight.dtype
    return x if dtype == b.layer.base_layer.weight.dtype else b.method("to", x, dtype)


def _dropout(b: Builder, adapter: str, x: fx.Node) -> fx.Node:
    """The adapter's dropout module, only in training mode (it is the identity in eval)."""
    module = b.layer.lora_dropout[adapter]
    if type(module) is nn.Identity or not b.layer.training:
        return x
    return b.module(f"lora_dropout.{adapter}", x)


def emit_lora(b: Builder, adapter: str, x: fx.Node) -> fx.Node:
    """`lora_B(lora_A(x))` as functional calls on the parameters (no module `__call__`)."""
    lora_a, lora_b = b.layer.lora_A[adapter], b.layer.lora_B[adapter]
    wa, wb = b.attr(f"lora_A.{adapter}.weight"), b.attr(f"lora_B.{adapter}.weight")
    bias = (b.attr(f"lora_B.{adapter}.bias"),) if lora_b.bias is not None else ()
    kind = b.layer.kind
    if kind in CONV_KINDS:
        fn = conv_fn(kind)
        h = b.call(fn, x, wa, None, lora_a.stride, lora_a.padding, lora_a.dilation, lora_a.groups)
        return b.call(fn, h, wb, *(bias or (None,)), lora_b.stride, lora_b.padding,
                      lora_b.dilation, lora_b.groups)
    return b.call(torch._C._nn.linear, b.call(torch._C._nn.linear, x, wa), wb, *bias)


def emit_embedding_lora(b: Builder, adapter: str, x: fx.Node) -> fx.Node:
    """`embedding(x, A.T) @ B.T`, with the base layer's padding index and flags (PEFT's `_embed`)."""
    base = b.layer.base_layer
    table = b.call(torch.t, b.attr(f"lora_embedding_A.{adapter}"))
    if base.max_norm is None:
        h = b.call(torch.embedding, table, x, *embedding_args(base))
    else:
        h = b.call(torch.nn.functional.embedding, x, table, base.padding_idx, base.max_norm,
                   base.norm_type, base.scale_grad_by_freq, base.sparse)
    return b.call(torch.matmul, h, b.call(torch.t, b.attr(f"lora_embedding_B.{adapter}")))


def embed_scale(b: Builder, out: fx.Node) -> fx.Node:
    """Multiply by the base's `embed_scale` (Gemma-style scaled embeddings), as PEFT does."""
    base = b.layer.base_layer
    if "embed_scale" in base._buffers and base._buffers["embed_scale"].numel() == 1:
        scale = b.method("type_as", b.attr("base_layer.embed_scale"), out)
        return b.call(torch.mul, out, scale)
    if isinstance(base.__dict__.get("embed_scale"), (int, float)):
        return b.call(torch.mul, out, float(base.__dict__["embed_scale"]))
    return out


def _emit_embedding(b: Builder, adapter: str, x: fx.Node, prev: fx.Node,
                    rows: fx.Node | None) -> fx.Node:
    # PEFT's Embedding applies no dropout and no input cast.
    lora = emit_embedding_lora(b, adapter, x)
    if adapter in b.layer.lora_magnitude_vector:
        return lora_dora.emit_embedding(b, adapter, lora, prev, lambda out: embed_scale(b, out))
    delta = embed_scale(b, lora)
    scaling = b.layer.sites[adapter].scaling
    if rows is None:
        return b.result(prev, delta, scaling)
    return b.index_result(prev, rows, delta, scaling)


METHOD = Lora()
