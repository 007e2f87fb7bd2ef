"""The invariants of an adapted layer's forward graph, one rule each; run between passes in tests.

A broken rule is a bug in a pass, not a user error: it raises AssertionError naming the rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from surgeon.runtime.graph import spine_source, tag

if TYPE_CHECKING:
    from surgeon.runtime.graph import LayerView

TAG_KEYS = {"rule", "pass", "adapter", "role"}


def verify_graph(gm: fx.GraphModule, layer: LayerView) -> None:
    """Check `gm` against `layer`; raise AssertionError on the first broken rule."""
    nodes = list(gm.graph.nodes)
    roles = [tag(n).get("role") for n in nodes]
    results = [n for n, r in zip(nodes, roles) if r == "result"]
    inputs = [n for n, r in zip(nodes, roles) if r == "input_result"]
    # every node but the output carries a complete provenance tag
    for n in nodes:
        assert n.op == "output" or TAG_KEYS <= tag(n).keys(), f"untagged node {n.name}"
    # exactly one input and one base output
    x = [n for n, r in zip(nodes, roles) if r == "input"]
    assert len(x) == 1, "expected one input"
    base_out = [n for n, r in zip(nodes, roles) if r == "base_out"]
    assert len(base_out) == 1, "expected one base output"
    # input parts chain: each transforms the layer input or the previous input part
    prev = x[0]
    for n in inputs:
        assert spine_source(n) is prev, f"input part {n.name} does not extend {prev.name}"
        prev = n
    # the base call reads the last input, never an earlier one
    base = [n for n, r in zip(nodes, roles) if r in ("base", "base_out")]
    stale = {x[0], *inputs} - {prev}
    assert not any(a in stale for n in base for a in n.all_input_nodes), "base reads a stale input"
    # results chain: each extends the base output or the previous result
    prev = base_out[0]
    for r in results:
        assert spine_source(r) is prev, f"result {r.name} does not extend {prev.name}"
        prev = r
    # the output returns the last result, possibly through the epilogue cast
    out = gm.graph.output_node().args[0]
    assert (out.args[0] if tag(out).get("role") == "epilogue" else out) is prev, "dangling result"
    # at most one input part and one output part per adapter, each an adapter of the layer
    for ends in (results, inputs):
        adapters = [tag(n)["adapter"] for n in ends]
        assert len(set(adapters)) == len(adapters), "duplicate branch"
        assert set(adapters) <= set(layer.sites), "branch of an unknown adapter"
    # no branch while adapters are merged
    assert not ((results or inputs) and layer.merged_adapters), "branch on a layer with merged adapters"
    # attribute targets resolve in the layer
    for n in nodes:
        if n.op in ("get_attr", "call_module"):
            layer.get_submodule(n.target) if n.op == "call_module" else _resolve(layer, n.target)


def _resolve(layer: LayerView, target: str) -> None:
    owner, _, leaf = target.rpartition(".")
    module = layer.get_submodule(owner) if owner else layer
    assert leaf in module._parameters or leaf in module._buffers or leaf in module._modules, \
        f"unresolved attribute {target}"
