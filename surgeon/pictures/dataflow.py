"""The captured graph at the grain a reader wants: modules and a few named ops, not aten nodes.

A 7B model's exported graph has thousands of views, casts and adds; a picture of those is
unreadable. Here every fx node becomes one *unit* or is transparent:

- an adaptable layer (a projection `Flow` found) is its module;
- any node that ran inside a leaf module (a norm, an activation module, rotary embeddings) is
  that module, so a decomposed RMSNorm is one box;
- attention, matmuls of two activations, softmax, activations, top-k and explicit norms outside
  leaf modules are op units (the score/softmax/value path of eager attention stays visible);
- inputs and outputs are units; everything else (views, casts, residual adds) is transparent.

Edges join two units when a floating-point tensor flows from one to the other through
transparent nodes only (integer indices and masks do not connect things, as in `Flow`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from torch import fx, nn

from surgeon.capture.flow import ACT, INPUT, MATMUL, NORM, OUTPUT, SDPA, SOFTMAX, TOPK, Flow, op_name
from surgeon.capture.graph import Capture
from surgeon.pictures.scene import IO, LAYER, MODULE, OP

_OP_KINDS = frozenset({SDPA, MATMUL, SOFTMAX, ACT, TOPK, NORM})
_OP_LABELS = {SDPA: "attention\nsoftmax(QKᵀ)·V", MATMUL: "matmul", SOFTMAX: "softmax", TOPK: "top-k"}


@dataclass(frozen=True, slots=True)
class Unit:
    """One box of the dataflow picture, before repeated blocks are grouped."""

    id: str  # the module path for modules; scope + "::" + fx node name for ops and I/O
    path: str  # the module it is or ran in ("" at the top level)
    kind: str  # LAYER, MODULE, OP or IO (surgeon.pictures.scene)
    label: str
    type: str  # module class or op name
    shape: str = ""


@dataclass(frozen=True, slots=True)
class Dataflow:
    units: dict[str, Unit]  # in graph order
    edges: tuple[tuple[str, str], ...]  # unit id -> unit id, unique, in graph order


def module_dataflow(captured: Capture) -> Dataflow:
    """Units and the edges between them for one capture (see the module docstring)."""
    flow = Flow(captured)
    model = captured.model
    leaves = {path for path, m in model.named_modules() if next(m.children(), None) is None}
    units: dict[str, Unit] = {}
    unit_of: dict[fx.Node, str] = {}
    for node in flow.nodes:
        unit = _unit(flow, node, model, leaves)
        if unit is not None:
            # a node may run in a layer's scope before its projection (an input cast): the
            # projection decides that the unit is a layer
            if unit.id not in units or unit.kind == LAYER:
                units[unit.id] = unit
            unit_of[node] = unit.id
    return Dataflow(units, _edges(flow, unit_of))


def _unit(flow: Flow, node: fx.Node, model: nn.Module, leaves: set[str]) -> Unit | None:
    kind = flow.kind[node]
    if kind == INPUT:
        name = flow.input_name(node)
        return Unit(f"::input:{name}", "", IO, name, "input")
    if kind == OUTPUT:
        return Unit("::output", "", IO, "output", "output")
    proj = flow.projs.get(node)
    if proj is not None and proj.module is not None:
        module = model.get_submodule(proj.module)
        return Unit(proj.module, proj.module, LAYER, proj.module, type(module).__name__, _shape(module))
    scope = flow.scope(node)
    if scope in leaves and scope:
        return Unit(scope, scope, MODULE, scope, type(model.get_submodule(scope)).__name__)
    if kind in _OP_KINDS or proj is not None:
        name = op_name(node)
        label = _OP_LABELS.get(kind, name)
        return Unit(f"{scope}::{node.name}", scope, OP, label, name)
    return None


def _edges(flow: Flow, unit_of: dict[fx.Node, str]) -> tuple[tuple[str, str], ...]:
    """Unit -> unit wherever float data flows between them through transparent nodes."""
    edges: dict[tuple[str, str], None] = {}
    for start, src in unit_of.items():
        # Token ids are integers: from an input, follow every edge, but only to a layer that
        # reads it (the embedding), not to the masks and positions computed from it.
        index = flow.kind[start] == INPUT
        users = (lambda n: list(n.users)) if index else flow.users
        queue = deque(users(start))
        seen: set[fx.Node] = set()
        while queue:
            node = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            dst = unit_of.get(node)
            if dst == src:
                continue  # still inside the same unit (the nodes of a decomposed norm)
            if dst is not None:
                if _feeds_data(flow, node, start, seen) and (not index or node in flow.projs):
                    edges[(src, dst)] = None
                continue
            queue.extend(users(node))
    return tuple(edges)


def _feeds_data(flow: Flow, node: fx.Node, start: fx.Node, seen: set[fx.Node]) -> bool:
    """False when the walk reached a projection through its weight operand, not its data."""
    proj = flow.projs.get(node)
    return proj is None or proj.data is start or proj.data in seen


def _shape(module: nn.Module) -> str:
    """Every adaptable kind has a weight (surgeon.layer_kinds)."""
    return "×".join(str(n) for n in module.weight.shape)
