"""Run passes over an adapted layer's forward graph: re-root, lint and recompile after each.

Every graph rewrite goes through `run_passes`: lowering a layer from scratch
(`insert_adapters.lower_graph`) and the graph half of a merge or unmerge alike. Passes only
rewrite graphs; they read the layer (its sites, which adapters it lowers) but never write
weights, which is the runtime's fold step (`surgeon.runtime.fold`).

A pass is a frozen dataclass whose fields are its options, with `name: ClassVar[str]` and
`__call__(gm, layer) -> PassResult`. It may edit `gm.graph` in place (adding attribute targets
that `gm` does not hold yet); the pipeline then rebuilds the GraphModule rooted at the layer,
which copies the targets and recompiles, and lints the graph. A failure re-raises the original
exception with a note naming the pass and the pass history.

Example (`layer` an `AdaptedLayer`):
    >>> from surgeon.passes.insert_adapters import InsertAdaptersPass
    >>> result = run_passes(empty_graph_module(), layer, [InsertAdaptersPass()], verify=True)
    >>> result.modified, result.gm.graph is not None
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from torch import fx, nn

if TYPE_CHECKING:
    from surgeon.runtime.method import MethodLayer


@dataclass(frozen=True, slots=True)
class PassResult:
    """What a pass returns: the (possibly edited) graph module and whether anything changed."""

    gm: fx.GraphModule
    modified: bool


class Pass(Protocol):
    """A graph rewrite: its fields are its options, `name` its CLI name."""

    name: ClassVar[str]

    def __call__(self, gm: fx.GraphModule, layer: MethodLayer) -> PassResult: ...


@dataclass(frozen=True, slots=True)
class GraphHolder:
    """A bare graph in a GraphModule's place: passes only read `.graph`, and an adapted layer
    compiles its graph itself, so its own lowering skips GraphModule's codegen per pass."""

    graph: fx.Graph


def empty_graph_module() -> fx.GraphModule:
    """The starting point of a lowering: a graph module with no nodes."""
    return fx.GraphModule(nn.Module(), fx.Graph(), class_name="AdaptedForward")


def run_passes(gm: fx.GraphModule | GraphHolder, layer: MethodLayer, passes: Sequence[Pass], *,
               verify: bool = False) -> PassResult:
    """Run `passes` in order on `gm` for `layer`.

    Args:
        gm: the layer's current graph module (or `empty_graph_module()`); a `GraphHolder`
            is edited in place and only linted, never rebuilt into a GraphModule.
        layer: the adapted layer (`AdaptedLayer`); passes read it, never write its weights.
        passes: pass instances, run in order.
        verify: also check the graph invariants (`surgeon.passes.verify`) after each pass.

    Returns:
        The final graph module, and whether any pass changed anything.
    """
    history: list[str] = []
    modified = False
    for pass_ in passes:
        history.append(pass_.name)
        try:
            result = pass_(gm, layer)
            if result.modified:
                if not isinstance(gm, GraphHolder):
                    gm = fx.GraphModule(layer, result.gm.graph, class_name="AdaptedForward")
                result.gm.graph.lint()
            if verify:
                from surgeon.passes.verify import verify_graph

                verify_graph(gm, layer)
        except Exception as e:
            e.add_note(f"surgeon: pass `{pass_.name}` failed on layer `{layer.path}` "
                       f"(pass history: {' -> '.join(history)})")
            raise
        modified = modified or result.modified
    return PassResult(gm, modified)
