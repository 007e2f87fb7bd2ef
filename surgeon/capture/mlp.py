"""MLP roles: up, gate, down and fused gate_up, from how projections feed each other.

Walking forwards from a projection through pointwise ops only (stopping at projections,
matmuls, norms and reductions) finds the projections it feeds, and for each path whether it
crossed an activation and through which slice of the output it went:
- `down` reads another projection through an activation;
- with two feeders, the one through the activation is `gate`, the one without is `up`;
- a lone feeder through an activation is `up` (`fc1 -> gelu -> fc2`), even when the activation
  is written by hand as `x * sigmoid(x)` or gelu-tanh (paths with and without the nonlinearity,
  but through the same slice);
- a lone feeder reaching `down` through two slices of its output, one through the activation
  and one without, is a fused `gate_up`.
Only linear projections take part: conv stacks (whisper's front end, a CNN) keep no MLP role.
A norm on the way counts only where it normalises the product of two projections after the
activation (BitNet's `down(norm(act(gate) * up))`), never the residual stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from torch import fx

from surgeon.capture.attention import Found
from surgeon.capture.flow import ACT, NORM, PASS, PROJ, SLICE, Flow, op_name

_POINTWISE = frozenset({PASS, SLICE, ACT})


@dataclass(frozen=True)
class _Path:
    """How a walk reached a projection: the first slice it went through, the first activation."""

    slice: fx.Node | None
    act: str | None


def mlp_roles(flow: Flow, candidates: list[fx.Node]) -> list[Found]:
    """Roles for the linear projections in `candidates` (those without an attention role)."""
    pool = {n for n in candidates if flow.projs[n].kind == "linear"}
    feeders: dict[fx.Node, dict[fx.Node, set[_Path]]] = {}
    for node in flow.nodes:
        if node in pool:
            for down, paths in _feeds(flow, node).items():
                if down in pool:
                    feeders.setdefault(down, {})[node] = paths
    found: list[Found] = []
    for down, by_feeder in feeders.items():
        if any(p.act for paths in by_feeder.values() for p in paths):
            found.extend(_classify(flow, down, by_feeder))
    return found


def _feeds(flow: Flow, start: fx.Node) -> dict[fx.Node, set[_Path]]:
    """Projections `start` reaches through pointwise ops, with every distinct way it got there."""
    reached: dict[fx.Node, set[_Path]] = {}
    seen: set[tuple[fx.Node, _Path]] = set()
    queue = deque([(start, _Path(None, None))])
    while queue:
        node, path = queue.popleft()
        for user in flow.users(node):
            kind = flow.kind[user]
            if kind == PROJ:
                if flow.projs[user].data is node:
                    reached.setdefault(user, set()).add(path)
                continue
            if kind not in (PASS, SLICE, ACT) and not (kind == NORM and _product(flow, user)):
                continue
            step = _Path(path.slice or (user if kind == SLICE and _is_part(user) else None),
                         path.act or (op_name(user) if kind == ACT else None))
            if (user, step) not in seen:
                seen.add((user, step))
                queue.append((user, step))
    return reached


def _product(flow: Flow, norm: fx.Node) -> bool:
    """A norm of a product of two projections (BitNet's sub-norm of `act(gate) * up`, before
    `down`): the MLP's hidden state normalised, not the residual stream."""
    inputs = flow.inputs(norm)
    projs = {p for n in inputs for p in flow.walk_back(n, _POINTWISE, frozenset({PROJ}))}
    acts = [a for n in inputs for a in flow.walk_back(n, frozenset({PASS, SLICE}), frozenset({ACT}))]
    return len(projs) >= 2 and bool(acts)


def _is_part(node: fx.Node) -> bool:
    """A node that takes one part of a tensor (not the op that splits it into a list)."""
    return op_name(node) in ("getitem", "slice", "select", "narrow")


def _classify(flow: Flow, down: fx.Node, by_feeder: dict[fx.Node, set[_Path]]) -> list[Found]:
    where = f"`{flow.projs[down].module or flow.scope(down)}`"
    acts = sorted({p.act for paths in by_feeder.values() for p in paths if p.act})
    act = "/".join(acts)
    factors = _outside_factors(flow, down, set(by_feeder))
    if len(by_feeder) > 1 and factors:
        return []  # a gate on the residual stream (a gated norm, adaLN), not an MLP
    found = [Found(down, "mlp.down", f"reads the output of another projection through {act}")]
    if len(by_feeder) == 1:
        (feeder, paths), = by_feeder.items()
        mixed = next((f for f in factors if _depends_on(flow, f, feeder)), None)
        if factors and mixed is None:
            return []  # the activation gates a tensor the feeder did not make: not an MLP
        if mixed is not None:
            return [Found(feeder, "mixer.in", f"its output is mixed along the sequence (through "
                          f"`{op_name(mixed)}`, not attention) and gated by itself into {where}"),
                    Found(down, "mixer.out", "reads a sequence mixer's output gated by "
                          f"`{flow.projs[feeder].module or flow.scope(feeder)}`")]
        if _split_gate_up(paths):
            found.append(Found(feeder, "mlp.gate_up", f"one slice of its output passes {act}, "
                               f"another does not, and both reach {where}"))
        else:
            found.append(Found(feeder, "mlp.up", f"feeds {where} through {act}"))
        return found
    for feeder, paths in by_feeder.items():
        if _split_gate_up(paths):  # fused, with another feeder added to it (Zamba2's adapters)
            found.append(Found(feeder, "mlp.gate_up", f"one slice of its output passes {act}, "
                               f"another does not, and both reach {where}"))
        # gelu-tanh by hand multiplies x by a function of x: some paths skip the nonlinearity
        elif any(p.act for p in paths):
            found.append(Found(feeder, "mlp.gate", f"feeds {where} through {act}, gating a "
                               "projection that reaches it without one"))
        else:
            found.append(Found(feeder, "mlp.up", f"feeds {where} without an activation, gated "
                               "by a projection that passes one"))
    return found


def _outside_factors(flow: Flow, down: fx.Node, feeders: set[fx.Node]) -> list[fx.Node]:
    """What `down`'s input is computed from, pointwise, besides its feeders' outputs: nothing in
    an MLP (its factors are projections and the nonlinearity). A factor computed from a feeder
    through non-pointwise ops (a convolution, a scan) makes a state-space or linear-attention
    mixer; any other factor (a normed residual stream) makes a gate, not an MLP."""
    cone, queue, outside = set(), [flow.projs[down].data], []
    while queue:
        node = queue.pop()
        if node in cone or node in feeders:
            continue
        crossed = flow.kind[node] in (PASS, SLICE, ACT) or (flow.kind[node] == NORM and _product(flow, node))
        if not crossed:
            if node not in flow.projs and flow.origins[node]:
                outside.append(node)
            continue
        cone.add(node)
        inputs = flow.inputs(node)
        if flow.kind[node] == NORM:  # its data, not its statistic (rsqrt(mean(x^2)) of that data)
            inputs = [n for n in inputs if flow.walk_back(n, _POINTWISE, frozenset({PROJ}))]
        queue.extend(inputs)
    return outside


def _depends_on(flow: Flow, node: fx.Node, ancestor: fx.Node) -> bool:
    seen, queue = set(), [node]
    while queue:
        current = queue.pop()
        if current is ancestor:
            return True
        if current in seen:
            continue
        seen.add(current)
        queue.extend(flow.inputs(current))
    return False


def _split_gate_up(paths: set[_Path]) -> bool:
    gated = {p.slice for p in paths if p.act and p.slice is not None}
    plain = {p.slice for p in paths if not p.act and p.slice is not None}
    return bool(gated) and bool(plain) and gated != plain
