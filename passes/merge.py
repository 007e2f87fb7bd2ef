"""merge: remove the branches a layer no longer runs once adapters are folded into its weight.

Run after the fold step (`surgeon.runtime.fold.merge_weights`) has written the adapters into the
base weight and listed them in `layer.merged_adapters`; this pass touches no weight.

Preconditions: `gm.graph` was built by `insert-adapters` for `layer` (possibly edited since by
`merge` / `unmerge`).

Postconditions: only branches of the layer's lowered adapters remain. Like PEFT, a layer with
any merged adapter runs its (merged) base layer alone, even if other adapters are active, so
after a merge no branch remains. `modified` is True iff a node was removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from surgeon.passes.pipeline import PassResult
from torch import fx

from surgeon.runtime.graph import branch_adapters, spine_source, tag

if TYPE_CHECKING:
    from surgeon.runtime.graph import LayerView


@dataclass(frozen=True, slots=True)
class MergePass:
    """Drop the branch of every adapter the layer does not lower (all, once one is merged)."""

    name: ClassVar[str] = "merge"

    def __call__(self, gm: fx.GraphModule, layer: LayerView) -> PassResult:
        removed = remove_branches(gm.graph, set(layer.sites) - set(layer.lowered_adapters()))
        return PassResult(gm, removed)


def remove_branches(graph: fx.Graph, adapters: set[str]) -> bool:
    """Bypass and erase the branches of `adapters`; True if any was removed."""
    doomed = [a for a in branch_adapters(graph) if a in adapters]
    for adapter in doomed:
        # each part's end transforms its source (prev, or the base call's input): route back
        for end in [n for n in graph.nodes if tag(n).get("adapter") == adapter
                    and tag(n).get("role") in ("result", "input_result", "weight_result")]:
            end.replace_all_uses_with(spine_source(end))
        for node in reversed(list(graph.nodes)):
            if tag(node).get("adapter") == adapter:
                graph.erase_node(node)
    return bool(doomed)
