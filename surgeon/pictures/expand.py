"""The inside of an adapted layer, before and after `merge`: the passes' fx graphs, each node
with its provenance tag (rule, pass, adapter, role; `surgeon.runtime.graph.tag`).

The layer is rebuilt on a meta-device copy of its base module, so this costs no weight memory
and never touches the user's model, whether it was adapted already or is only planned. It runs
in train mode, because that graph has every step the passes insert (dropout included); merge
then folds the adapters into the (meta) base weight and the merge pass removes the branches.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from torch import fx, nn

from surgeon.capture.flow import op_name
from surgeon.capture.graph import meta_copy
from surgeon.planning.site import Site
from surgeon.pictures.scene import Expansion

# At most this many distinct layer shapes are expanded (each costs a lowering).
MAX_EXPANSIONS = 8


def expand_layers(base: nn.Module, sites: Mapping[str, tuple[Site, ...]]) -> tuple[Expansion, ...]:
    """One Expansion per distinct adapted-layer shape (kind, method, options, adapters)."""
    by_shape: dict[tuple, list[str]] = {}
    for path, layer_sites in sites.items():
        module = base.get_submodule(path)
        key = (type(module).__name__, tuple(module.weight.shape),
               tuple((s.adapter, s.method, s.kind, s.r, s.alpha, s.options) for s in layer_sites))
        by_shape.setdefault(key, []).append(path)
    out = []
    for paths in list(by_shape.values())[:MAX_EXPANSIONS]:
        out.append(expand_layer(base.get_submodule(paths[0]), sites[paths[0]], tuple(paths)))
    return tuple(out)


def expand_layer(module: nn.Module, sites: tuple[Site, ...], stands_for: tuple[str, ...] = ()) -> Expansion:
    """The graphs of `module` adapted by `sites` (one per adapter), before and after merge."""
    from surgeon.runtime.adapted import AdaptedLayer  # the runtime, only when expanding

    layer = AdaptedLayer(meta_copy(module), sites[0])
    for site in sites[1:]:
        layer.add_adapter(site)
    adapters = [s.adapter for s in sites]
    layer.set_adapter(adapters)
    layer.train(True)
    before = layer.graph_module.graph
    nodes_before, edges_before = _describe(before, layer)
    layer.merge(adapters)
    nodes_after, edges_after = _describe(layer.graph_module.graph, layer, folded=adapters)
    folded = "; ".join(f"`{s.adapter}` ({s.method}, scaling {s.scaling:g}) folded into "
                       "base_layer.weight: W ← W + ΔW" for s in sites)
    return Expansion(sites[0].path, stands_for or (sites[0].path,), nodes_before, nodes_after,
                     edges_before, edges_after, folded)


def _describe(graph: fx.Graph, layer: nn.Module, folded: list[str] = ()):
    """(name, op, label, tag) per node and (src, dst) per data edge; `folded` adapters are
    written into the base weight's label, since merge changes that weight, not the graph."""
    from surgeon.runtime.graph import tag

    nodes, edges = [], []
    for node in graph.nodes:
        label = _label(node, layer)
        if folded and node.op == "get_attr" and str(node.target).startswith("base_layer."):
            label += "\n= W + " + " + ".join(f"ΔW({a})" for a in folded)
        nodes.append((node.name, node.op, label, dict(tag(node))))
        edges.extend((src.name, node.name) for src in node.all_input_nodes)
    return tuple(nodes), tuple(edges)


def _label(node: fx.Node, layer: nn.Module) -> str:
    if node.op == "placeholder":
        return str(node.target)
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        value = functools.reduce(getattr, str(node.target).split("."), layer)
        return f"{node.target}\n{'×'.join(map(str, value.shape))}"
    name = op_name(node) if node.op != "call_module" else str(node.target)
    constants = [f"{a:g}" if isinstance(a, float) else repr(a) for a in node.args
                 if isinstance(a, (int, float, str)) and not isinstance(a, bool)]
    constants += [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}"
                  for k, v in node.kwargs.items() if isinstance(v, (int, float, str, bool))]
    if name == "mul" and len(constants) == 1:
        return f"× {constants[0]}\n(scaling)"
    return name + (f"\n{', '.join(constants)}" if constants else "")
