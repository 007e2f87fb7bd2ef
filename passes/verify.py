"""The invariants of an adapted layer's forward graph, one rule each; run between passes in tests.

A broken rule is a bug in a pass, not a user error: it raises AssertionError naming the rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from surgeon.runtime.graph import tag

if TYPE_CHECKING:
    from surgeon.runtime.graph import LayerView

TAG_KEYS = {"rule", "pass", "adapter", "role"}


def verify_graph(gm: fx.GraphModule, layer: LayerView) -> None:
    """Check `gm` against `layer`; raise AssertionError on the first broken rule."""
    nodes = list(gm.graph.nodes)
    results = [n for n in nodes if tag(n).get("role") == "result"]
    # every node but the output carries a complete provenance tag
    for n in nodes:
        assert n.op == "output" or TAG_KEYS <= tag(n).keys(), f"untagged node {n.name}"
    # exactly one input and one base output
    assert sum(tag(n).get("role") == "input" for n in nodes) == 1, "expected one input"
    base_out = [n for n in nodes if tag(n).get("role") == "base_out"]
    assert len(base_out) == 1, "expected one base output"
    # results chain: each adds to the base output or to the previous result
    prev = base_out[0]
    for r in results:
        assert r.args[0] is prev, f"result {r.name} does not extend {prev.name}"
        prev = r
    # the output returns the last result, possibly through the epilogue cast
    out = gm.graph.output_node().args[0]
    assert (out.args[0] if tag(out).get("role") == "epilogue" else out) is prev, "dangling result"
    # one branch per adapter, each an adapter of the layer; none while adapters are merged
    adapters = [tag(r)["adapter"] for r in results]
    assert len(set(adapters)) == len(adapters), "duplicate branch"
    assert set(adapters) <= set(layer.sites), "branch of an unknown adapter"
    assert not (adapters and layer.merged_adapters), "branch on a layer with merged adapters"
    # attribute targets resolve in the layer
    for n in nodes:
        if n.op in ("get_attr", "call_module"):
            layer.get_submodule(n.target) if n.op == "call_module" else _resolve(layer, n.target)


def _resolve(layer: LayerView, target: str) -> None:
    owner, _, leaf = target.rpartition(".")
    module = layer.get_submodule(owner) if owner else layer
    assert leaf in module._parameters or leaf in module._buffers or leaf in module._modules, \
        f"unresolved attribute {target}"
