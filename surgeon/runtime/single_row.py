"""The single-row form of a CPU eval graph: a decode step's LoRA layer as matrix-vector calls.

A decode step calls every adapted layer on one row (`x` of shape (1, 1, in)). There the cost is
calls into torch, not arithmetic: inside a model each one costs microseconds of cold caches,
and `linear` on a 3-D input is several (transpose, fold, `mm`, unfold). So an eval graph that is
the base `linear` plus LoRA branches written into its output (`surgeon.runtime.graph.lora_add_`)
gets a second form for that input, on the flat row `xf = x.view(-1)`:

    h = mv(A, xf)                        # each shrink first (measured ~2 us cheaper in a step)
    out = mv(W, xf)                      # addmv(bias, W, xf) with a bias
    out.addmv_(B, h, alpha=s)            # per adapter, in the graph's order
    return out.view(1, 1, -1)

On the CPU `mv` gives the same bits as `linear` for one row (float32, bfloat16, float16 and
float64; tests/lowering/test_single_row.py checks it where it runs), and the adapter half is
what `lora_add_` already does for one row, so both forms compute the same numbers. Inside a
hidden-64 llama's decode step an adapted layer then costs about 12 us over its bare `Linear`,
against 15 us for the general form and 44 us for peft's (bench/README.md, bench/decode_floor.py).

`AdaptedLayer.forward` takes it first, for an input of exactly `RowForm.shape` (one shape
compare: every check costs about a microsecond there too); any graph of another shape
(training, casts, DoRA, hooks on the base, a GPU's kernels) has none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from surgeon.runtime.graph import compile_forward, lora_add_


class RowForm:
    """The single-row form of one lowered graph: `shape` is the input it takes (None: the graph
    has no such form); `run(layer, x)` builds and compiles it on first use, then hands the
    layer the compiled function (most layers of most models never see a decode step, and
    building costs about a third of a millisecond per layer: an apply does not pay it)."""

    __slots__ = ("compiled", "match", "shape")

    def __init__(self, graph: fx.Graph, layer: nn.Module) -> None:
        self.match = _match(graph, layer)
        self.shape = None if self.match is None else _row_shape(layer)
        self.compiled: Callable[..., torch.Tensor] | None = None

    def forward(self) -> Callable[..., torch.Tensor] | None:
        """What the layer calls for an input of `shape`: the compiled form, or the builder."""
        if self.shape is None:
            return None
        return self.compiled or self.run

    def run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a trace cannot build fx graphs: the general form
            return layer._run(layer, x)
        if self.compiled is None:
            self.compiled = compile_forward(_build(*self.match), layer)
        layer.__dict__["_run_row"] = self.compiled
        return self.compiled(layer, x)


def single_row_graph(graph: fx.Graph, layer: nn.Module) -> fx.Graph | None:
    """The single-row form of `graph` (see the module docstring), or None when it has none."""
    match = _match(graph, layer)
    return None if match is None else _build(*match)


def _match(graph: fx.Graph, layer: nn.Module) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """(input, base `linear`, `lora_add_` branches) when `graph` is exactly those on a dense
    CPU Linear."""
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
    return (x, base, branches) if branches else None


def _row_shape(layer: nn.Module) -> torch.Size:
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
