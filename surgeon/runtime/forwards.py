"""The compiled forwards of one adapted layer: one per layer state, built through the passes.

A layer's whole-batch forward depends on its state: train or eval mode (eval drops dropout,
training recomputes DoRA norms) and the adapters it lowers (none while any is merged or
adapters are disabled). `Forwards` keeps one `Lowered` graph and function per state, so
switching mode or a merge / unmerge cycle reuses them; mixed-adapter batches get their own
forwards by (mode, adapters in the batch). The layer drops the whole cache when its adapters,
active set, enabling or parameter dtypes change, and never rebuilds per call.

Every graph comes from the pass pipeline (`surgeon.passes.pipeline.run_passes`): from scratch
by insert-adapters (`lower_graph`), or, after a merge or unmerge, by that pass on a copy of the
previous state's graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from surgeon.passes.insert_adapters import lower_graph
from surgeon.passes.pipeline import GraphHolder, Pass, run_passes
from surgeon.runtime import gathered
from surgeon.runtime.graph import compile_forward, copy_graph
from surgeon.runtime.rows import rows_of
from surgeon.runtime.single_row import RowForm

if TYPE_CHECKING:
    from surgeon.runtime.method import MethodLayer

# (training, adapters): the state a graph was built for
Key = tuple[bool, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Lowered:
    """The compiled forward of a layer for one state."""

    graph: fx.Graph  # what `graph_module` shows; a merge or unmerge edits a copy of it
    run: Callable[..., torch.Tensor]  # compile_forward(graph): what the layer's forward calls
    row: RowForm  # the same function for one input row, a decode step (runtime.single_row)
    # Built by merge/unmerge from the previous state's graph, so its provenance names that
    # pass. A graph lowered from scratch is dropped once a merge/unmerge leaves its state, so
    # coming back rebuilds it through the pass too (provenance as if edited in place).
    by_transition: bool


def _lower(graph: fx.Graph, layer: MethodLayer, by_transition: bool) -> Lowered:
    return Lowered(graph, compile_forward(graph, layer), RowForm(graph, layer), by_transition)


@dataclass
class Forwards:
    """One layer's compiled forwards (see the module docstring)."""

    by_state: dict[Key, Lowered] = field(default_factory=dict)
    mixed: dict[Key, Callable[..., torch.Tensor]] = field(default_factory=dict)

    def lowered(self, layer: MethodLayer, key: Key) -> Lowered:
        """The forward for state `key` (the layer's current one), lowering it if needed."""
        lowered = self.by_state.get(key)
        if lowered is None:
            lowered = self.by_state[key] = _lower(lower_graph(layer), layer, False)
        return lowered

    def transition(self, layer: MethodLayer, graph: fx.Graph, before: Key, after: Key,
                   pass_: Pass) -> None:
        """After a merge or unmerge took the layer from `before` (whose graph is `graph`) to
        `after`: unless cached, build `after`'s graph with `pass_` on a copy of `graph`."""
        if after in self.by_state:
            return
        new = run_passes(GraphHolder(copy_graph(graph)), layer, [pass_]).gm.graph
        old = self.by_state.get(before)
        if old is not None and not old.by_transition:
            del self.by_state[before]
        self.by_state[after] = _lower(new, layer, True)

    def mixed_run(self, layer: MethodLayer, training: bool,
                  adapters: tuple[str, ...]) -> Callable[..., torch.Tensor]:
        """The forward `run(layer, x, names)` of a mixed-adapter batch whose rows use `adapters`:
        one gather-matmul when the method allows (`surgeon.runtime.gathered`), else a branch
        per adapter reading its `rows_<a>` input (`surgeon.runtime.rows.rows_of`)."""
        run = self.mixed.get((training, adapters))
        if run is None:
            if gathered.supports(layer, adapters):
                graph = lower_graph(layer, adapters, mixed=True, gathered=True)
                run = gathered.GatheredRun(compile_forward(graph, layer), adapters)
            else:
                run = _looped(compile_forward(lower_graph(layer, adapters, mixed=True), layer),
                              adapters)
            self.mixed[(training, adapters)] = run
        return run


def _looped(fn: Callable[..., torch.Tensor], adapters: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    def run(layer: MethodLayer, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        return fn(layer, x, *(rows_of(names, a, x.device) for a in adapters))
    return run
