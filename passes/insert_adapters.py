"""insert-adapters: build an adapted layer's forward graph and add adapter branches.

Preconditions: `gm.graph` is empty, or was built by this pass for `layer` (possibly edited by
`merge` / `unmerge`); every requested adapter exists on `layer`.

Postconditions: the graph computes `base_layer(x)` (inlined as a functional call when exactly
equivalent, see `surgeon.runtime.base_kinds`), followed by one branch per requested adapter that was
not in the graph yet, appended in the requested order. A branch has an output part ending in a
"result" node (a function of the previous result, its `args[0]`: `add(prev, ...)`, `mul(prev,
s)`), an input part before the base call ending in an "input_result" node that the base call
then reads (a method's `emit` asks for it with `Builder.before_base`), or both; `emit` returns
`prev` itself when the branch has no output part. A final "epilogue" `type_as` restores the base
output dtype when an adapter's dtype differs from the base weight's. Every inserted node is tagged (`surgeon.runtime.graph`).
With `mixed=True`, each branch reads a `rows_<adapter>` placeholder (the batch rows using that
adapter) and adds its output at those rows only. `modified` is True iff a node was added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from surgeon.passes.pipeline import GraphHolder, PassResult, run_passes
from torch import fx

from surgeon.runtime import gathered
from surgeon.runtime.base_kinds import emit_base
from surgeon.runtime.graph import META, Builder, branch_adapters, tag

if TYPE_CHECKING:
    from surgeon.runtime.method import MethodLayer


@dataclass(frozen=True, slots=True)
class InsertAdaptersPass:
    """Insert the base call (if missing) and a branch for each adapter (if missing)."""

    name: ClassVar[str] = "insert-adapters"
    adapters: tuple[str, ...] | None = None  # default: the layer's lowered (active, unmerged) ones
    mixed: bool = False  # branches serve only their rows of a mixed-adapter batch
    gathered: bool = False  # with mixed: one gather-matmul branch for all (runtime/gathered.py)

    def __call__(self, gm: fx.GraphModule, layer: MethodLayer) -> PassResult:
        graph = gm.graph
        built = not graph.nodes
        if built:
            build_base(graph, layer, self.name)
        names = layer.lowered_adapters() if self.adapters is None else self.adapters
        if self.gathered:
            return PassResult(gm, insert_gathered(graph, layer, self.name) or built)
        inserted = insert_branches(graph, layer, names, self.name, mixed=self.mixed)
        return PassResult(gm, built or inserted)


def lower_graph(layer: MethodLayer, adapters: tuple[str, ...] | None = None, *,
                mixed: bool = False, gathered: bool = False) -> fx.Graph:
    """A layer's forward graph from scratch: this pass on an empty graph, run by the pipeline.

    The pipeline gets a `GraphHolder`, not a GraphModule: the layer compiles the graph itself
    (`compile_forward`), so lowering one layer skips GraphModule's codegen.
    """
    graph = fx.Graph()
    run_passes(GraphHolder(graph), layer, [InsertAdaptersPass(adapters, mixed, gathered)])
    return graph


def _find(graph: fx.Graph, role: str) -> fx.Node:
    return next(n for n in graph.nodes if tag(n).get("role") == role)


def build_base(graph: fx.Graph, layer: MethodLayer, pass_name: str) -> None:
    """`x -> base_layer(x) -> output` into an empty graph."""
    provenance = {"rule": "", "pass": pass_name, "adapter": None}
    x = graph.placeholder("x")
    x.meta[META] = dict(provenance, role="input")
    out = graph.output(None)
    b = Builder(graph, layer, x, out, provenance, role="base")
    y = emit_base(b, layer.kind)
    y.meta[META]["role"] = "base_out"
    out.args = (y,)


def _anchor(graph: fx.Graph) -> fx.Node:
    """Where branches go: before the epilogue if there is one, else before the output."""
    out = graph.output_node()
    first = out.args[0]
    return first if tag(first).get("role") == "epilogue" else out


def insert_branches(graph: fx.Graph, layer: MethodLayer, adapters: tuple[str, ...] | list[str],
                    pass_name: str, *, mixed: bool = False) -> bool:
    """Append a branch for each of `adapters` not in the graph; True if any was added."""
    present = branch_adapters(graph)
    todo = [a for a in adapters if a not in present]
    for adapter in todo:
        _insert_branch(graph, layer, adapter, pass_name, mixed)
    return bool(todo)


def insert_gathered(graph: fx.Graph, layer: MethodLayer, pass_name: str) -> bool:
    """The mixed batch's one gathered branch (`surgeon.runtime.gathered`) unless present:
    placeholders `slots`, `a_stack`, `b_stack` after `x`, then `prev + delta`."""
    if gathered.ALL in branch_adapters(graph):
        return False
    provenance = {"rule": "", "pass": pass_name, "adapter": gathered.ALL}
    x = _find(graph, "input")
    inputs, last = [], x
    for name in gathered.INPUTS:
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        last.meta[META] = dict(provenance, role="rows")
        inputs.append(last)
    anchor = _anchor(graph)
    b = Builder(graph, layer, x, anchor, provenance)
    anchor.args = (gathered.emit(b, anchor.args[0], inputs), *anchor.args[1:])
    return True


def _insert_branch(graph: fx.Graph, layer: MethodLayer, adapter: str, pass_name: str,
                   mixed: bool) -> None:
    site = layer.sites[adapter]
    provenance = {"rule": site.rule, "pass": pass_name, "adapter": adapter}
    x = _find(graph, "input")
    rows = None
    if mixed:
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last):
            rows = graph.placeholder(f"rows_{adapter}")
        rows.meta[META] = dict(provenance, role="rows")
    if _needs_epilogue(layer, adapter):
        _ensure_epilogue(graph, pass_name)
    anchor = _anchor(graph)
    prev = anchor.args[0]
    b = Builder(graph, layer, x, anchor, provenance)
    result = layer.method.emit(b, adapter, prev, rows)
    if result is not prev:  # `prev` back: the branch only transformed the base call's input
        anchor.args = (result, *anchor.args[1:])


def _needs_epilogue(layer: MethodLayer, adapter: str) -> bool:
    base_dtype = layer.base_layer.weight.dtype
    return any(p.dtype != base_dtype for p in layer.adapter_parameters(adapter))


def _ensure_epilogue(graph: fx.Graph, pass_name: str) -> None:
    """`type_as(result, base_out)`: PEFT casts the summed output back to the base dtype."""
    out = graph.output_node()
    if tag(out.args[0]).get("role") == "epilogue":
        return
    with graph.inserting_before(out):
        cast = graph.call_method("type_as", (out.args[0], _find(graph, "base_out")))
    cast.meta[META] = {"rule": "", "pass": pass_name, "adapter": None, "role": "epilogue"}
    out.args = (cast,)

