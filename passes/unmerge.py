"""unmerge: re-insert the branches of a layer whose merged adapters were taken out of its weight.

Run after the fold step (`surgeon.runtime.fold.unmerge_weights`) has restored the base weight and
emptied `layer.merged_adapters`; this pass touches no weight.

Preconditions: `gm.graph` is empty, or was built by `insert-adapters` for `layer` (possibly
edited since by `merge` / `unmerge`).

Postconditions: the graph runs the layer's lowered adapters (active and enabled) in their active
order, as PEFT's forward loop does: when its branches differ from those, all are removed and
re-inserted in that order. An empty graph is left empty. `modified` is True iff the branches
were rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from surgeon.passes.insert_adapters import insert_branches
from surgeon.passes.merge import remove_branches
from surgeon.passes.pipeline import PassResult
from torch import fx

from surgeon.runtime.graph import branch_adapters

if TYPE_CHECKING:
    from surgeon.runtime.method import MethodLayer


@dataclass(frozen=True, slots=True)
class UnmergePass:
    """Rebuild the branches for the layer's lowered adapters, in active order."""

    name: ClassVar[str] = "unmerge"

    def __call__(self, gm: fx.GraphModule, layer: MethodLayer) -> PassResult:
        graph = gm.graph
        lowered = layer.lowered_adapters()
        present = branch_adapters(graph)
        if not graph.nodes or list(present) == lowered:
            return PassResult(gm, False)
        remove_branches(graph, set(present))
        insert_branches(graph, layer, lowered, self.name)
        return PassResult(gm, True)
