"""One shrink GEMM for the adapted layers of a group: the runtime half of `surgeon.compile`.

`SharedShrink` holds the members (adapted layers the capture saw read one input) and, per
state of theirs, a `Plan`: which (member, adapter) pairs share the GEMM, in what order, and each
member's forward with its shrinks read from inputs (`surgeon.fusion.rewrite`). The first member
called with a tensor `x` computes `x @ cat(A_1, ..., A_n).T` once and splits it; the others,
called with the *same tensor object*, take their slices. Each slice is taken once; anything
else recomputes:

- a different tensor (or `x` written in place since), another grad mode, another plan: the
  member that sees it computes again (the group's guess about the graph is never trusted);
- a member whose state changed (set_adapter, merge, disable, train/eval, add/delete adapter,
  a dtype cast: all give the layer a new `_graph`) rebuilds the plan first;
- a member's `A` replaced or written in place between the shared GEMM and its own call;
- `adapter_names=` (a mixed batch), extra arguments, an ineligible state: the member runs its
  own site-scope forward (`AdaptedLayer.forward`), unchanged;
- one row on the CPU (a decode step, `surgeon.runtime.single_row`): the member's own row form,
  whose few calls cost less than this bookkeeping saves (bench/README.md, graph scope).

The concatenated `A` is cached by weight identity, storage and `_version` when autograd records
nothing; while it does, it is concatenated per call so gradients reach each `A` (the sum over
the slices is the same gradient the per-layer shrinks give).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import is_
from typing import Any

import torch
from torch import nn

from surgeon import kernels
from surgeon.fusion import rewrite
from surgeon.runtime.adapted import AdaptedLayer

Run = Callable[..., torch.Tensor]
_MAX_PLANS = 8  # states kept per group (train and eval, a few adapter sets)


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """The shared shrink of one state of the members (see the module docstring)."""

    graphs: tuple[Any, ...]  # each member's `_graph` when planned: a new one means a new state
    pairs: tuple[tuple[int, str], ...]  # (member index, adapter): the concatenation order
    tables: tuple[tuple[dict, str], ...]  # per pair: (its layer's `lora_A` modules, adapter)
    sizes: tuple[int, ...]  # the rank of each pair: how the shared output splits
    parts: tuple[tuple[int, ...], ...]  # per member: its pairs' positions, in its inputs' order
    runs: tuple[Run | None, ...]  # per member: its forward without shrinks, None: site scope
    shrink: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # `x @ A.T`: a kernel on a GPU
    dtype: torch.dtype | None  # the `A`s' dtype (the input is cast to it, as PEFT does)
    mask: tuple[bool, ...]  # which members read slices (the others run site scope)
    fused: int  # how many

    def call(self, i: int, member: nn.Module, x: torch.Tensor, chunks: Sequence[torch.Tensor]) -> Any:
        """Member `i`'s forward on `x` with its slices of the shared shrink."""
        part = self.parts[i]
        if len(part) == 1:
            return self.runs[i](member, x, chunks[part[0]])
        return self.runs[i](member, x, *[chunks[j] for j in part])


@dataclass(slots=True, eq=False)
class _Entry:
    """A computed shared shrink, waiting for the members that have not read their slices."""

    x: torch.Tensor  # held: the identity test needs the object alive
    version: int  # `x._version` then
    grad: bool  # grad mode then
    plan: Plan
    chunks: Sequence[torch.Tensor]  # one per pair
    pending: list[bool]  # members that have not read theirs
    left: int  # how many
    weights: list[torch.Tensor]  # the `A`s read, per pair
    versions: list[int]  # and their `_version`s

    def valid_for(self, i: int, x: torch.Tensor) -> bool:
        """Nothing the GEMM read changed for member `i`: `x`, grad mode, the member's `A`s."""
        if self.grad != torch.is_grad_enabled():
            return False
        if torch.compiler.is_compiling():  # nothing is written between calls of one graph
            return True
        if self.version != x._version:
            return False
        plan = self.plan
        for j in plan.parts[i]:
            table, adapter = plan.tables[j]
            weight = table[adapter]._parameters["weight"]
            if weight is not self.weights[j] or weight._version != self.versions[j]:
                return False
        return True


def _a_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    """The live `lora_A.<adapter>.weight` (dict lookups, as the compiled forwards read it)."""
    return layer._modules["lora_A"]._modules[adapter]._parameters["weight"]


def eligible(layer: nn.Module) -> bool:
    """Plain LoRA on a matrix product: the layers whose shrink is `x @ A.T` on the input."""
    return (isinstance(layer, AdaptedLayer) and layer.method.name == "lora"
            and layer.kind in ("Linear", "Conv1D"))


@dataclass(eq=False)  # identity: members and cached tensors do not compare
class SharedShrink:
    """The group of `members`; call `run(i, x)` as member `i`'s forward."""

    members: list[AdaptedLayer]
    plan: Plan | None = field(default=None, repr=False)
    _entry: _Entry | None = field(default=None, repr=False)
    _cat: tuple[list[Any], list[int], list[int], torch.Tensor] | None = field(default=None, repr=False)
    _plans: dict[tuple[int, ...], Plan] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------ planning
    def current(self) -> Plan | None:
        """The plan for the members' present states: the last one while no member's graph
        changed, else one built before for these graphs, else a new one (None while torch.compile
        traces: fx graphs cannot be edited in a trace, and the members then run site scope)."""
        plan = self.plan
        if plan is not None:
            for graph, member in zip(plan.graphs, self.members):
                if graph is not member._graph:
                    break
            else:
                return plan
        graphs = tuple(m._graph for m in self.members)
        if torch.compiler.is_compiling():
            return None
        key = tuple(map(id, graphs))  # a plan holds its graphs: their ids stay unique
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = self._build(graphs)
        self.plan, self._entry, self._cat = plan, None, None
        return plan

    def _build(self, graphs: tuple[Any, ...]) -> Plan:
        wanted: list[list[str]] = []
        key = None  # (dtype, device) of the first shared A: every pair must match it
        for member, graph in zip(self.members, graphs, strict=True):
            adapters = []
            if graph is not None and eligible(member):
                for adapter in rewrite.shrinks(graph):
                    weight = _a_weight(member, adapter)
                    key = key or (weight.dtype, weight.device)
                    if (weight.dtype, weight.device) == key:
                        adapters.append(adapter)
            wanted.append(adapters)
        pairs = tuple((i, a) for i, adapters in enumerate(wanted) for a in adapters)
        if len(pairs) < 2:
            n = len(self.members)
            return Plan(graphs, (), (), (), ((),) * n, (None,) * n, torch._C._nn.linear, None,
                        (False,) * n, 0)
        sizes = tuple(_a_weight(self.members[i], a).shape[0] for i, a in pairs)
        parts, runs = [], []
        for i, (member, graph, adapters) in enumerate(zip(self.members, graphs, wanted, strict=True)):
            parts.append(tuple(pairs.index((i, a)) for a in adapters))
            runs.append(rewrite.without_shrinks(graph, member, tuple(adapters)) if adapters else None)
        # as the site scope decides at lowering: the kernel only where it runs (see surgeon.kernels)
        shrink = kernels.shrink if kernels.wanted(key[1]) else torch._C._nn.linear
        tables = tuple((self.members[i]._modules["lora_A"]._modules, a) for i, a in pairs)
        mask = tuple(fn is not None for fn in runs)
        return Plan(graphs, pairs, tables, sizes, tuple(parts), tuple(runs), shrink, key[0], mask,
                    sum(mask))

    # ------------------------------------------------------------------------------- forward
    def run(self, i: int, x: Any, *args: Any, adapter_names: Sequence[str] | None = None,
            **kwargs: Any) -> Any:
        """Member `i`'s forward (the layer's own one for anything but a plain whole-batch call)."""
        member = self.members[i]
        row = member._row_shape  # a CPU decode step: the layer's own row form costs fewer calls
        if args or kwargs or adapter_names is not None or member.adapter_names is not None \
                or not isinstance(x, torch.Tensor) or (row is not None and x.shape == row):
            return AdaptedLayer.forward(member, x, *args, adapter_names=adapter_names, **kwargs)
        entry = self._entry
        if entry is not None and entry.x is x and entry.pending[i] and entry.plan is self.plan \
                and entry.plan.graphs[i] is member._graph and entry.valid_for(i, x):
            entry.pending[i] = False
            entry.left -= 1
            if not entry.left:
                self._entry = None
            return entry.plan.call(i, member, x, entry.chunks)
        plan = self.current()
        if plan is None or plan.runs[i] is None:
            return AdaptedLayer.forward(member, x)
        return plan.call(i, member, x, self._compute(i, x, plan))

    def _compute(self, i: int, x: torch.Tensor, plan: Plan) -> Sequence[torch.Tensor]:
        """The shared GEMM on `x`, split per pair; kept for the members still to come."""
        weights = [table[adapter]._parameters["weight"] for table, adapter in plan.tables]
        compiling = torch.compiler.is_compiling()
        versions = [] if compiling else [w._version for w in weights]
        a = self._concatenated(weights, versions, compiling)
        source = x if x.dtype == plan.dtype else x.to(plan.dtype)  # PEFT's cast to A's dtype
        chunks = plan.shrink(source, a).split_with_sizes(plan.sizes, -1)
        if plan.fused > 1:
            pending = list(plan.mask)
            pending[i] = False
            self._entry = _Entry(x, 0 if compiling else x._version, torch.is_grad_enabled(), plan,
                                 chunks, pending, plan.fused - 1, weights, versions)
        return chunks

    def _concatenated(self, weights: list[torch.Tensor], versions: list[int],
                      compiling: bool) -> torch.Tensor:
        """`cat(A_1, ..., A_n)`: cached unless autograd must see it (or torch.compile traces)."""
        if compiling or (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
            return torch.cat(weights)
        cached = self._cat
        if cached is None or cached[1] != versions or not all(map(is_, weights, cached[0])) \
                or cached[2] != [w.data_ptr() for w in weights]:
            with torch.no_grad():
                cached = self._cat = (weights, versions, [w.data_ptr() for w in weights],
                                      torch.cat(weights))
        return cached[3]

    def __getstate__(self) -> dict[str, Any]:
        """Only the members: plans, pending GEMMs and caches are rebuilt (pickle, deepcopy)."""
        return {"members": self.members}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.members, self.plan, self._entry, self._cat = state["members"], None, None, None
        self._plans = {}


class FusedForward(functools.partial):
    """Installed as a member's `forward` (an instance attribute): `group.run(index, ...)`, a
    partial so the call adds no Python frame."""

    @property
    def group(self) -> SharedShrink:
        return self.func.__self__

    @property
    def index(self) -> int:
        return self.args[0]
