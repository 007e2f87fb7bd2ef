"""The single-row form of a CPU eval graph: a decode step's LoRA layer as matrix-vector calls.

A decode step calls every adapted layer on one row (`x` of shape (1, 1, in)). There the cost is
calls into torch, not arithmetic: inside a model each one costs microseconds of cold caches,
and `linear` on a 3-D input is several (transpose, fold, `mm`, unfold). So an eval graph that is
the base `linear` plus LoRA branches written into its output (`surgeon.runtime.graph.lora_add_`)
gets a second form for one row, on the flat row `xf = x.view(-1)`:

    out = mv(W, xf)                      # addmv(bias, W, xf) with a bias
    out.addmv_(B, mv(A, xf), alpha=s)    # per adapter, in the graph's order
    return out.view(*x.shape[:-1], out_features)

On the CPU `mv` gives the same bits as `linear` for one row (float32, bfloat16, float16 and
float64; tests/lowering/test_single_row.py checks it where it runs), and the adapter half is
what `lora_add_` already does for one row, so both forms compute the same numbers. Inside a
hidden-64 llama's decode step an adapted layer then costs about 9 us over its bare `Linear`,
against 15 us for the general form and 44 us for peft's (bench/README.md).

`AdaptedLayer.forward` calls it for inputs with one row (`x.numel() == x.shape[-1]`); any graph
of another shape (training, casts, DoRA, hooks on the base, a GPU's kernels) has none.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from surgeon.runtime.graph import lora_add_


def single_row_graph(graph: fx.Graph, layer: nn.Module) -> fx.Graph | None:
    """The single-row form of `graph` (see the module docstring), or None when it has none."""
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1 or not _plain_cpu(getattr(layer, "base_layer", None)):
        return None
    x = inputs[0]
    base = next((n for n in nodes if n.op == "call_function"), None)
    if base is None or base.target is not torch._C._nn.linear or base.kwargs \
            or len(base.args) not in (2, 3) or base.args[0] is not x:
        return None
    branches, last = [], base
    for node in nodes[nodes.index(base) + 1:]:
        if node.op == "get_attr":
            continue
        if node.op == "output":
            if node.args[0] is not last:
                return None
            break
        if node.op != "call_function" or node.target is not lora_add_ or node.kwargs \
                or node.args[0] is not last or node.args[1] is not x:
            return None
        branches.append(node)
        last = node
    if not branches:
        return None
    return _build(x, base, branches)


def row_shape(layer: nn.Module) -> torch.Size:
    """The input shape the single-row form takes: (1, 1, in_features), a decode step's."""
    return torch.Size((1, 1, layer.base_layer.in_features))


def _plain_cpu(base: nn.Module | None) -> bool:
    """A dense CPU `nn.Linear` (its weight a plain tensor): where `mv` is `linear`'s bits."""
    weight = getattr(base, "weight", None)
    return (type(base) is nn.Linear and isinstance(weight, torch.Tensor)
            and type(weight.data) is torch.Tensor and weight.device.type == "cpu"
            and weight.layout is torch.strided and weight.dtype.is_floating_point)


def _build(x: fx.Node, base: fx.Node, branches: list[fx.Node]) -> fx.Graph:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def attr(node: fx.Node) -> fx.Node:
        if node not in env:
            env[node] = g.get_attr(node.target)
        return env[node]

    row = g.placeholder(x.name, x.type)
    flat = g.call_method("view", (row, -1))
    shrunk = [g.call_function(torch.mv, (attr(branch.args[2]), flat)) for branch in branches]
    weight, bias = base.args[1], base.args[2] if len(base.args) == 3 else None
    if isinstance(bias, fx.Node):
        out = g.call_function(torch.addmv, (attr(bias), attr(weight), flat))
    else:
        out = g.call_function(torch.mv, (attr(weight), flat))
    for branch, h in zip(branches, shrunk, strict=True):
        out = g.call_method("addmv_", (out, attr(branch.args[3]), h), {"alpha": branch.args[4]})
    g.output(g.call_method("view", (out, 1, 1, -1)))
    return g
