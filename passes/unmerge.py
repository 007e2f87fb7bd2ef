"""unmerge: take every merged adapter out of the base weight and re-insert its branch.

Preconditions: `layer.merged_adapters` lists the adapters folded into the base weight by
`merge`, in merge order.

Postconditions: the adapters are unfolded newest first (PEFT unmerges all of them, popping),
each in at least fp32 and cast once, written in place; `layer.merged_adapters` is empty. If
anything was unfolded, the branches are rebuilt so the graph runs the layer's lowered adapters
(active and enabled) in their active order; the branches are also rebuilt when nothing is
merged but the graph's branches differ from those (the graph half of an unmerge whose weights
were unfolded with `edit_graph=False`). `modified` is True iff a weight was written or the
branches were rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import fx

from surgeon.modules_base import from_out_major, to_out_major
from surgeon.modules_graph import result_nodes
from surgeon.passes.insert_adapters import insert_branches
from surgeon.passes.merge import accumulation_dtype, remove_branches
from surgeon.passes.pipeline import PassResult

if TYPE_CHECKING:
    from surgeon.modules import AdaptedLayer


@dataclass(frozen=True, slots=True)
class UnmergePass:
    """Unmerge all merged adapters of the layer."""

    name: ClassVar[str] = "unmerge"
    edit_graph: bool = True  # False: unfold the weights only, leave the graph as it is

    def __call__(self, gm: fx.GraphModule, layer: AdaptedLayer) -> PassResult:
        unfolded = bool(layer.merged_adapters)
        while layer.merged_adapters:
            unfold_adapter(layer, layer.merged_adapters[-1])
            layer.merged_adapters.pop()
        if not self.edit_graph:
            return PassResult(gm, unfolded)
        graph = gm.graph
        if not unfolded and (not graph.nodes or list(result_nodes(graph)) == layer.lowered_adapters()):
            return PassResult(gm, False)
        # re-insert all branches so they run in active order, as PEFT's forward loop does
        remove_branches(graph, set(result_nodes(graph)))
        insert_branches(graph, layer, layer.lowered_adapters(), self.name)
        return PassResult(gm, True)


def unfold_adapter(layer: AdaptedLayer, adapter: str) -> None:
    """Subtract `adapter` (the newest merged one) from the base weight and bias."""
    base, kind = layer.base_layer, layer.kind
    weight = base.weight
    current = to_out_major(weight.detach(), kind).to(accumulation_dtype(weight))
    restored = layer.method.unfold(layer, adapter, current)
    bias_delta = layer.method.bias_delta(layer, adapter)
    with torch.no_grad():
        weight.copy_(from_out_major(restored, kind, weight.shape).to(weight.dtype))
        if bias_delta is not None:
            acc = accumulation_dtype(base.bias)
            base.bias.copy_((base.bias.detach().to(acc) - bias_delta.to(acc)).to(base.bias.dtype))
