"""merge: fold adapters into the base weight, then remove their branches from the graph.

Preconditions: the adapters to merge exist on `layer`; the base weight is a plain floating-point
tensor (not quantised), and a convolution has `groups == 1` (as PEFT).

Postconditions: for each adapter not merged yet, in the given order, the base weight (and bias,
with `lora_bias`) holds the adapter's delta, computed and accumulated in at least fp32 and cast
once to the weight's dtype, written in place (so tied weights follow, as in PEFT); the adapter
is appended to `layer.merged_adapters`. No branch remains in the graph: like PEFT, a layer with
merged adapters runs its (merged) base layer alone, even if other adapters are active.
With `safe_merge`, a non-finite result raises ValueError before anything is written.
`modified` is True iff a weight was written or a node removed. With `edit_graph=False` only
the weights are written (the layer then takes the graph for its new state from its cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import fx

from surgeon.modules_base import CONV_KINDS, from_out_major, to_out_major
from surgeon.modules_graph import result_nodes, tag
from surgeon.passes.pipeline import PassResult

if TYPE_CHECKING:
    from surgeon.modules import AdaptedLayer


@dataclass(frozen=True, slots=True)
class MergePass:
    """Merge `adapters` (default: the active ones) into the base layer."""

    name: ClassVar[str] = "merge"
    adapters: tuple[str, ...] | None = None
    safe_merge: bool = False  # check the merged weights are finite before writing them
    edit_graph: bool = True  # False: fold the weights only, leave the graph as it is

    def __call__(self, gm: fx.GraphModule, layer: AdaptedLayer) -> PassResult:
        names = layer.active_adapters if self.adapters is None else self.adapters
        todo = [a for a in names if a in layer.sites and a not in layer.merged_adapters]
        for adapter in todo:
            fold_adapter(layer, adapter, self.safe_merge)
        if not self.edit_graph:
            return PassResult(gm, bool(todo))
        # PEFT runs the base layer alone while any adapter is merged: drop every other branch
        removed = remove_branches(gm.graph, set(layer.sites) - set(layer.lowered_adapters()))
        return PassResult(gm, bool(todo) or removed)


def accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def check_mergeable(layer: AdaptedLayer) -> None:
    base = layer.base_layer
    if layer.kind in CONV_KINDS and base.groups > 1:
        raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
    if type(base.weight) is not torch.nn.Parameter or not base.weight.dtype.is_floating_point:
        raise NotImplementedError(
            f"Cannot merge into a base weight of type {type(base.weight).__name__} and dtype "
            f"{base.weight.dtype}: only plain floating-point weights are supported.")


def unmerged_weight(layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
    """The out-major weight with every merged adapter taken out, newest first (for DoRA)."""
    for adapter in reversed(layer.merged_adapters):
        weight = layer.method.unfold(layer, adapter, weight)
    return weight


def fold_adapter(layer: AdaptedLayer, adapter: str, safe_merge: bool) -> None:
    """Write `adapter` into the base weight (and bias) and record it as merged."""
    check_mergeable(layer)
    base, kind = layer.base_layer, layer.kind
    weight = base.weight
    current = to_out_major(weight.detach(), kind).to(accumulation_dtype(weight))
    merged = layer.method.fold(layer, adapter, current, unmerged_weight(layer, current))
    new_weight = from_out_major(merged, kind, weight.shape).to(weight.dtype)
    new_bias = None
    bias_delta = layer.method.bias_delta(layer, adapter)
    if bias_delta is not None:
        if base.bias is None:
            raise RuntimeError(
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        acc = accumulation_dtype(base.bias)
        new_bias = (base.bias.detach().to(acc) + bias_delta.to(acc)).to(base.bias.dtype)
    if safe_merge and not (torch.isfinite(new_weight).all() and
                           (new_bias is None or torch.isfinite(new_bias).all())):
        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be "
                         "broken")
    with torch.no_grad():
        weight.copy_(new_weight)
        if new_bias is not None:
            base.bias.copy_(new_bias)
    layer.merged_adapters.append(adapter)


def remove_branches(graph: fx.Graph, adapters: set[str]) -> bool:
    """Bypass and erase the branches of `adapters`; True if any was removed."""
    doomed = {a: r for a, r in result_nodes(graph).items() if a in adapters}
    for adapter, result in doomed.items():
        result.replace_all_uses_with(result.args[0])
        for node in reversed(list(graph.nodes)):
            if tag(node).get("adapter") == adapter:
                graph.erase_node(node)
    return bool(doomed)
