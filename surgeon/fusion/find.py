"""Which adapted layers read the same input: groups from a capture of the adapted model.

The adapted model is captured as any model is (`surgeon.capture.graph.capture`: torch.export on
a meta copy, repeated blocks captured once). In that graph every LoRA layer's base call and its
shrink read one node, its input; layers whose input is the same node (q, k and v on the
normalised hidden states; gate and up) form a group. A layer called on two different inputs
joins none (its calls do not share one). Groups found in a representative block hold for the
blocks it stands for, under their paths.

The capture is only a guess about the runtime: `surgeon.fusion.shared` shares a GEMM only
between calls that really receive the same tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from surgeon.capture.flow import Flow
from surgeon.capture.graph import CaptureError, capture
from surgeon.errors import UserError
from surgeon.fusion.shared import eligible


class FusionError(UserError, RuntimeError):
    """`surgeon.compile` could not read which layers share an input; the message says why."""


def shared_inputs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, ...]]:
    """Paths of the eligible adapted layers of `model`, grouped by the input they read (groups
    of two or more, in call order). Raises `FusionError` when the model cannot be captured."""
    layers = {path for path, module in model.named_modules() if eligible(module)}
    if len(layers) < 2:
        return []
    try:
        captured = capture(model, example_inputs)
    except CaptureError as error:
        raise FusionError(f"surgeon.compile groups layers by the dataflow it captures, and {error} "
                          "For surgeon.compile, pass `example_inputs=` (the model's forward "
                          "inputs), or leave the model at site scope.") from None
    flow = Flow(captured)
    inputs: dict[str, set[fx.Node]] = {}
    readers: dict[fx.Node, list[str]] = {}
    for proj in flow.projs.values():
        owner = _owner(proj.module, layers)
        if owner is None:
            continue
        node = _outside(flow, proj.data, owner)
        inputs.setdefault(owner, set()).add(node)
        if owner not in readers.setdefault(node, []):
            readers[node].append(owner)
    groups = [tuple(p for p in paths if len(inputs[p]) == 1) for paths in readers.values()]
    groups = [g for g in groups if len(g) >= 2]
    return groups + _for_siblings(groups, captured.stand_ins, layers)


def _owner(module: str | None, layers: set[str]) -> str | None:
    """The adapted layer a projection belongs to (its base layer's or an adapter's weight)."""
    while module:
        if module in layers:
            return module
        module = module.rpartition(".")[0]
    return None


def _outside(flow: Flow, node: fx.Node, owner: str) -> fx.Node:
    """The first node outside `owner` that `node` comes from through one-input steps (the
    layer's own views and casts of its input)."""
    inside = (owner, owner + ".")
    while flow.scope(node) == owner or flow.scope(node).startswith(inside[1]):
        sources = flow.inputs(node)
        if len(sources) != 1:
            break
        node = sources[0]
    return node


def _for_siblings(groups: list[tuple[str, ...]], stand_ins: Mapping[str, str],
                  layers: set[str]) -> list[tuple[str, ...]]:
    """The groups of each representative block, under the paths of the blocks it stands for."""
    out = []
    for sibling, rep in stand_ins.items():
        prefix = rep + "."
        for group in groups:
            if all(p.startswith(prefix) for p in group):
                moved = tuple(sibling + p[len(rep):] for p in group)
                if all(p in layers for p in moved):
                    out.append(moved)
    return out
