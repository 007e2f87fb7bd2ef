"""The fold step: write adapters into an adapted layer's base weight, and take them out again.

This is the only code that writes base weights; the merge and unmerge passes only rewrite the
graph afterwards (`AdaptedLayer.merge` / `unmerge` run this, then take the graph for the new
state). The delta math is the method's (`MethodRuntime.fold` / `unfold` / `bias_delta`) on the
out-major view of the weight (`surgeon.runtime.base_kinds`), so it is written once per method.

Preconditions: the base weight is a plain floating-point Parameter or a bitsandbytes one (then
dequantised, folded and quantised again as peft does, `runtime/quantized.py`), and a
convolution has `groups == 1` (as PEFT's LoRA) unless the method says it merges grouped ones
(`merges_grouped_conv`, IA3). A method whose merge scales the bias instead of adding to it
(IA3) implements `fold_bias` / `unfold_bias`; others give `bias_delta`.

Postconditions of `merge_weights`: for each adapter not merged yet, in the given order, the
base weight (and bias, with `lora_bias`) holds the adapter's delta, computed and accumulated in
at least fp32 and cast once to the weight's dtype, written in place (so tied weights follow, as
in PEFT); the adapter is appended to `layer.merged_adapters`. With `safe_merge`, a non-finite
result raises ValueError before that adapter is written. `unmerge_weights` undoes every merge,
newest first, and leaves `layer.merged_adapters` empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from surgeon import distributed
from surgeon.runtime import quantized
from surgeon.runtime.base_kinds import CONV_KINDS, from_out_major, to_out_major

if TYPE_CHECKING:
    from surgeon.runtime.method import MethodLayer


def merge_weights(layer: MethodLayer, adapters: Sequence[str], safe_merge: bool) -> bool:
    """Fold each of `adapters` on the layer that is not merged yet; True if any was written."""
    todo = [a for a in adapters if a in layer.sites and a not in layer.merged_adapters]
    for adapter in todo:
        fold_adapter(layer, adapter, safe_merge)
    return bool(todo)


def unmerge_weights(layer: MethodLayer) -> bool:
    """Unfold every merged adapter, newest first (PEFT pops them); True if any was."""
    unfolded = bool(layer.merged_adapters)
    while layer.merged_adapters:
        unfold_adapter(layer, layer.merged_adapters[-1])
        layer.merged_adapters.pop()
    return unfolded


def accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    """At least fp32: half-precision sums of deltas lose the low bits PEFT keeps."""
    return torch.promote_types(weight.dtype, torch.float32)


def check_mergeable(layer: MethodLayer) -> None:
    base = layer.base_layer
    grouped_ok = getattr(layer.method, "merges_grouped_conv", False)  # optional, see method.py
    if layer.kind in CONV_KINDS and base.groups > 1 and not grouped_ok:
        raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
    if quantized.quant_of(base) is not None:
        return  # dequantised, folded, quantised again (runtime/quantized.py), as peft
    # a DTensor (FSDP2's shard) folds through DTensor ops: each rank writes exactly its rows
    plain = type(base.weight) is torch.nn.Parameter or distributed.is_dtensor(base.weight)
    if not plain or not base.weight.dtype.is_floating_point:
        raise NotImplementedError(
            f"Cannot merge into a base weight of type {type(base.weight).__name__} and dtype "
            f"{base.weight.dtype}: only plain floating-point weights are supported.")


def unmerged_weight(layer: MethodLayer, weight: torch.Tensor) -> torch.Tensor:
    """The out-major weight with every merged adapter taken out, newest first (for DoRA)."""
    for adapter in reversed(layer.merged_adapters):
        weight = layer.method.unfold(layer, adapter, weight)
    return weight


def _low_rank(layer: MethodLayer, adapter: str, weight: torch.Tensor):
    """`(out-major view of the weight, b, a, scaling)` when the fold is `weight +/- scaling *
    b @ a` and may run as one in-place `addmm_`: the method gives its factors (optional part
    `additive_factors`) in the weight's own dtype, fp32 or wider (nothing to round once), and
    the weight is a plain tensor whose out-major form is a view of it. One kernel and no
    weight-sized temporaries, where the general path builds the delta, scales it, adds and
    copies back (PEFT: delta, scale, `weight.data += delta`); rounded as that (`_add_low_rank`)."""
    factors = getattr(layer.method, "additive_factors", None)
    if factors is None or weight.dtype != accumulation_dtype(weight) or distributed.is_dtensor(weight):
        return None
    view = to_out_major(weight.detach(), layer.kind)
    if view.data_ptr() != weight.data_ptr() or quantized.quant_of(layer.base_layer) is not None:
        return None  # a copy (a non-contiguous convolution kernel), or a packed weight
    found = factors(layer, adapter)
    if found is None or any(t.dtype != weight.dtype for t in found[:2]):
        return None
    return view, *found


def _add_low_rank(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float) -> None:
    """`weight += scaling * b @ a` in place, rounded as PEFT's merge: one `addmm_` when scaling
    by `scaling` is exact (a power of two, as `alpha = 2 r`); else the product rounded, then
    scaled, then added (so an unmerge subtracts the very same delta)."""
    if abs(math.frexp(scaling)[0]) == 0.5:
        weight.addmm_(b, a, alpha=scaling)
    elif scaling > 0:
        weight.add_(torch.mm(b, a).mul_(scaling))
    else:
        weight.sub_(torch.mm(b, a).mul_(-scaling))


def fold_adapter(layer: MethodLayer, adapter: str, safe_merge: bool) -> None:
    """Write `adapter` into the base weight (and bias) and record it as merged."""
    check_mergeable(layer)
    base, kind = layer.base_layer, layer.kind
    weight = _read(base)
    fast = None if safe_merge else _low_rank(layer, adapter, weight)
    if fast is not None:
        view, b, a, scaling = fast
        new_bias = _new_bias(layer, adapter, 1)
        with torch.no_grad():
            _add_low_rank(view, b, a, scaling)
            if new_bias is not None:
                base.bias.copy_(new_bias)
        layer.merged_adapters.append(adapter)
        return
    operand = distributed.fold_operand(weight.detach(), layer.adapter_parameters(adapter))
    current = to_out_major(operand, kind).to(accumulation_dtype(weight))
    merged = layer.method.fold(layer, adapter, current, unmerged_weight(layer, current))
    new_weight = from_out_major(merged, kind, weight.shape).to(weight.dtype)
    new_bias = _new_bias(layer, adapter, 1)
    if safe_merge and not (torch.isfinite(new_weight).all() and
                           (new_bias is None or torch.isfinite(new_bias).all())):
        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be "
                         "broken")
    with torch.no_grad():
        _write(base, weight, new_weight)
        if new_bias is not None:
            base.bias.copy_(new_bias)
    layer.merged_adapters.append(adapter)


def unfold_adapter(layer: MethodLayer, adapter: str) -> None:
    """Subtract `adapter` (the newest merged one) from the base weight and bias."""
    base, kind = layer.base_layer, layer.kind
    weight = _read(base)
    fast = _low_rank(layer, adapter, weight)
    if fast is not None:
        view, b, a, scaling = fast
        new_bias = _new_bias(layer, adapter, -1)
        with torch.no_grad():
            _add_low_rank(view, b, a, -scaling)
            if new_bias is not None:
                base.bias.copy_(new_bias)
        return
    operand = distributed.fold_operand(weight.detach(), layer.adapter_parameters(adapter))
    current = to_out_major(operand, kind).to(accumulation_dtype(weight))
    restored = layer.method.unfold(layer, adapter, current)
    new_bias = _new_bias(layer, adapter, -1)
    with torch.no_grad():
        _write(base, weight, from_out_major(restored, kind, weight.shape).to(weight.dtype))
        if new_bias is not None:
            base.bias.copy_(new_bias)


def _read(base: torch.nn.Module) -> torch.Tensor:
    """The base weight to fold into: itself, or a bitsandbytes weight dequantised."""
    return base.weight if quantized.quant_of(base) is None else quantized.float_weight(base)


def _write(base: torch.nn.Module, weight: torch.Tensor, new: torch.Tensor) -> None:
    """In place (tied weights follow; a shard takes this rank's rows), or quantised anew."""
    if quantized.quant_of(base) is None:
        weight.copy_(distributed.place(weight, new))
    else:
        quantized.write_weight(base, new)


def _new_bias(layer: MethodLayer, adapter: str, sign: int) -> torch.Tensor | None:
    """The base bias with `adapter` merged (`sign` 1) or taken out (-1), None if unchanged:
    the method's `fold_bias` / `unfold_bias` when it has them (optional hooks, method.py),
    else the bias plus or minus its `bias_delta`, in at least fp32, cast to the bias dtype."""
    base = layer.base_layer
    hook = getattr(layer.method, "fold_bias" if sign > 0 else "unfold_bias", None)
    if hook is not None:
        if base.bias is None:
            return None
        new = hook(layer, adapter, base.bias.detach().to(accumulation_dtype(base.bias)))
        return None if new is None else new.to(base.bias.dtype)
    delta = layer.method.bias_delta(layer, adapter)
    if delta is None:
        return None
    if base.bias is None:
        raise RuntimeError(
            "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
    acc = accumulation_dtype(base.bias)
    return (base.bias.detach().to(acc) + sign * delta.to(acc)).to(base.bias.dtype)
