"""`AdaptedLayer`: one host-model module with its adapters, the site-scope lowering.

The planner hands over a `Site` per (module, adapter); the model-level apply replaces the module
with `AdaptedLayer(module, site)` and calls `add_adapter(site)` for further adapters. The layer
holds the original module as `base_layer` (not copied) and the adapter parameters in PEFT's
in-memory containers, so `state_dict()` keys equal a PEFT `LoraLayer`'s:
`base_layer.weight`, `lora_A.<a>.weight`, `lora_B.<a>.weight` (convolutions for conv kinds),
`lora_embedding_A.<a>` / `lora_embedding_B.<a>` (Embedding), `lora_magnitude_vector.<a>.weight`
(DoRA); `lora_dropout.<a>` is a parameter-free module.

Its forward is a torch.fx graph built by the passes in `surgeon.passes` (insert-adapters,
merge, unmerge), run by their pipeline: the base call and one branch per active adapter,
compiled to plain functional calls on the parameters, cached per layer state
(`surgeon.runtime.forwards`). As in PEFT, a layer with any merged adapter, or with adapters
disabled, runs its base layer alone. A merge or unmerge writes the weights first (the fold
step, `surgeon.runtime.fold`), then takes the graph for the new state.

A whole-module kind (`surgeon.layer_kinds.WHOLE_MODULE_KINDS`: a MultiheadAttention, which
reads its own weights and takes key, value and masks) is not lowered: `forward` passes every
argument to the method's `forward_module`, merges go through its `merge_module` /
`unmerge_module`, and attributes the layer lacks are read from the module (as PEFT's layer).

API (PEFT's layer API; each acts on this layer only, `surgeon.api` calls it on every layer):
    add_adapter(site) (inactive, frozen), set_adapter(names), enable_adapters(enabled),
    adapters_disabled(), delete_adapter(name), merge(adapter_names, safe_merge), unmerge(),
    unload(merge, ...), delta_weight(adapter), adapter_parameters(adapter), relower() (after
    changes the layer cannot see: hooks added to base_layer, `.data` writes);
    forward(x, adapter_names=None): `adapter_names` (or the attribute of that name, which the
    model's root hooks set for one call) gives each row's adapter, "__base__" for none;
    set_active / unloaded / original_module / adapters: the `surgeon.runtime.wrappers.Wrapper`
    protocol. Freezing the base model, bias modes and adapter-name checks are model-level.

Example:
    >>> layer = AdaptedLayer(nn.Linear(16, 16), site)   # site.kind == "Linear"
    >>> layer(torch.randn(2, 16)).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import fx, nn

from surgeon import distributed
from surgeon.layer_kinds import KINDS, WHOLE_MODULE_KINDS
from surgeon.methods import runtime_of
from surgeon.passes.merge import MergePass
from surgeon.passes.unmerge import UnmergePass
from surgeon.planning.site import Site
from surgeon.runtime import fold, quantized
from surgeon.runtime.forwards import Forwards
from surgeon.runtime.method import MethodRuntime, shared_containers

# Attributes holding compiled state: rebuilt on demand, never pickled or deep-copied.
_COMPILED = ("_gm", "_graph", "_run", "_run_row", "_row_shape", "_forwards")


def _nothing() -> None:
    """The undo of a switch that changed nothing."""


def _lazy_run(layer: AdaptedLayer, *inputs: Any) -> torch.Tensor:
    """Stand-in forward after unpickling or invalidation: lower, then run."""
    layer.relower()
    return layer._run(layer, *inputs)


def _module_call_graph() -> fx.Graph:
    """What `graph_module` shows for a whole-module kind: the base module called on the input
    (its forward substitutes the adapters' deltas, see `WHOLE_MODULE_KINDS`)."""
    graph = fx.Graph()
    graph.output(graph.call_module("base_layer", (graph.placeholder("x"),)))
    return graph


class AdaptedLayer(nn.Module):
    """A base layer plus adapters, run through a compiled fx graph (see the module docstring)."""

    held_as: ClassVar[str] = "is adapted by another adapter"

    def __init__(self, base_layer: nn.Module, site: Site,
                 shared: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        if site.kind not in KINDS:
            raise ValueError(f"Unknown base kind `{site.kind}`; expected one of {KINDS}.")
        self.base_layer = base_layer
        self.method: MethodRuntime = runtime_of(site.method)
        # `shared`: the model-level containers of the method (one instance for every layer)
        for name, container in self.method.containers:
            setattr(self, name, shared[name] if shared and name in shared else container())
        self.kind = site.kind
        self.sites: dict[str, Site] = {}
        self.active: list[str] = [site.adapter]
        self.merged_adapters: list[str] = []
        self._disabled = False
        self.adapter_names: Sequence[str] | None = None
        self.training = base_layer.training
        self._reset_compiled()
        self.add_adapter(site)
        self._select()

    # ----------------------------------------------------------------- state and peft-style API
    @property
    def path(self) -> str:
        return next(iter(self.sites.values())).path if self.sites else "<empty>"

    def __getattr__(self, name: str) -> Any:
        """A whole-module kind answers for its module (host code reads an MHA's `batch_first`,
        `in_proj_weight`, `out_proj`...), as PEFT's MultiheadAttention layer does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if self.__dict__.get("kind") not in WHOLE_MODULE_KINDS:
                raise
        return getattr(self._modules["base_layer"], name)

    @property
    def active_adapters(self) -> list[str]:
        return list(self.active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (host code such as T5's reads `proj.weight`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def graph_module(self) -> fx.GraphModule:
        """The current forward graph (inspection only; it runs via `forward`). Wrapped in a
        GraphModule on first access only: lowering itself never builds one."""
        if self._graph is None:
            self.relower()
        if self._gm is None or self._gm.graph is not self._graph:
            self.__dict__["_gm"] = fx.GraphModule(self, self._graph, class_name="AdaptedForward")
        return self._gm

    def lowered_adapters(self) -> list[str]:
        """Adapters whose branch the whole-batch forward runs: the active ones on this layer,
        unless adapters are disabled or any adapter is merged (then PEFT runs the base only)."""
        if self._disabled or self.merged_adapters:
            return []
        return [a for a in self.active if a in self.sites]

    def adapter_parameters(self, adapter: str) -> Iterator[nn.Parameter]:
        """The parameters of `adapter` on this layer; a shared container's only when they are
        Parameters (VB-LoRA's vector bank), not buffers (VeRA's projections)."""
        shared = shared_containers(self.method)
        for name, _ in self.method.containers:
            table = self._modules[name]
            if adapter in table:
                item = table[adapter]
                if isinstance(item, nn.Module) and name not in shared:
                    yield from item.parameters()
                elif isinstance(item, nn.Parameter):  # a per-adapter buffer (DeLoRA's norms) is not
                    yield item

    def add_adapter(self, site: Site) -> None:
        """Add `site.adapter`; it starts inactive and frozen unless it is the active one."""
        if site.method != self.method.name or site.kind != self.kind:
            raise ValueError(f"Cannot add a {site.method}/{site.kind} adapter to a "
                             f"{self.method.name}/{self.kind} layer at `{site.path}`.")
        if site.adapter in self.sites:
            raise ValueError(f"Adapter `{site.adapter}` already exists on `{site.path}`.")
        quantized.check_supported(self.base_layer, site)
        self.sites[site.adapter] = site
        try:
            self.method.add(self, site)
        except BaseException:
            self.method.remove(self, site.adapter)
            del self.sites[site.adapter]
            raise
        for container in (self._modules[name] for name, _ in self.method.containers):
            container.train(self.training)
        self._set_requires_grad(self.active, bool(site.option("inference_mode", False)))
        if site.adapter in self.lowered_adapters():
            self._invalidate()

    def set_adapter(self, names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make `names` the active adapters; only they require grad (none in inference mode)."""
        names = [names] if isinstance(names, str) else list(names)
        self._set_requires_grad(names, inference_mode)
        self.active = names
        self._invalidate()

    def _set_requires_grad(self, names: Sequence[str], inference_mode: bool) -> None:
        for adapter in self.sites:
            for p in self.adapter_parameters(adapter):
                p.requires_grad_(adapter in names and not inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's enable/disable; disabling unmerges first so the base weight is original."""
        if not enabled and self.merged_adapters:
            self.unmerge()
        self._disabled = not enabled
        # PEFT: enabling re-marks the active adapters trainable, disabling freezes all
        self._set_requires_grad(self.active if enabled else (), False)
        self._invalidate()

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base layer alone inside the block."""
        was_disabled = self._disabled
        self.enable_adapters(False)
        try:
            yield
        finally:
            if not was_disabled:
                self.enable_adapters(True)

    def delete_adapter(self, name: str) -> None:
        """Delete `name` (absent: nothing to remove, as PEFT's layer); it must not be merged. If
        it was active here, the rest of the active ones stay, else PEFT's pick: this layer's
        first remaining adapter by name (so layers may differ, as in PEFT)."""
        if name in self.merged_adapters:
            raise ValueError(f"Adapter `{name}` is merged into `{self.path}`; unmerge first.")
        if name in self.sites:
            self.method.remove(self, name)
            del self.sites[name]
        if name not in self.active:
            self._invalidate()
            return
        remaining = [a for a in self.active if a != name]
        if not remaining and self.sites:
            remaining = [min(self.sites)]
            warnings.warn(f"Adapter {name} was active which is now deleted. Setting active "
                          f"adapter to {remaining[0]}.", stacklevel=2)
        self.set_adapter(remaining)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        return self.method.delta_weight(self, adapter)

    # ------------------------------------------------------------------ the wrapper protocol
    @property
    def original_module(self) -> nn.Module:
        """The host module, below nested layers (LoRA's bare parameters nest one per parameter)."""
        base = self.base_layer
        return base.original_module if isinstance(base, AdaptedLayer) else base

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.sites)

    def set_active(self, names: Sequence[str], frozen: Collection[str]) -> Callable[[], None]:
        """`set_adapter(names)` unless already so (keeping the compiled graphs), then freeze
        the adapters in `frozen` (loaded for inference)."""
        before = self.active
        changed = before != list(names)
        if changed:
            self.set_adapter(names)
        for name in self.sites:
            if name in frozen:
                for p in self.adapter_parameters(name):
                    p.requires_grad_(False)
        return (lambda: self.set_adapter(before)) if changed else _nothing

    def unloaded(self, merged: Sequence[str]) -> nn.Module:
        return self.base_layer  # the model-level merge folded `merged` in already

    # ------------------------------------------------------------------------- merge / unload
    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or named) adapters into the base weight, in order."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = self.active if adapter_names is None else list(adapter_names)
        if self.merged_adapters and all(a in self.merged_adapters for a in names):
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
        if self.kind in WHOLE_MODULE_KINDS:  # no `.weight`: the method folds the module
            write = lambda: self.method.merge_module(self, names, safe_merge)
        else:
            write = lambda: fold.merge_weights(self, names, safe_merge)
        self._change_state(write, MergePass())

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight (newest first)."""
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        whole = self.kind in WHOLE_MODULE_KINDS
        self._change_state(lambda: self.method.unmerge_module(self) if whole
                           else fold.unmerge_weights(self), UnmergePass())

    def unload(self, merge: bool = False, safe_merge: bool = False,
               adapter_names: Sequence[str] | None = None) -> nn.Module:
        """The base layer, after merging when `merge` (PEFT leaves earlier merges in place)."""
        if merge:
            self.merge(adapter_names, safe_merge)
        return self.base_layer

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None,
                **kwargs: Any) -> Any:
        # A decode step first, with as few checks as it takes: inside a model each costs
        # about a microsecond (`surgeon.runtime.single_row`); `_row_shape` is None without that form.
        row = self._row_shape
        if row is not None and x.shape == row and adapter_names is None and not args \
                and not kwargs and self.adapter_names is None:
            return self._run_row(self, x)
        if self.kind in WHOLE_MODULE_KINDS:  # called with all its arguments (an MHA's key, masks...)
            if adapter_names is not None:
                kwargs["adapter_names"] = adapter_names
            return self.method.forward_module(self, x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"A {self.kind} layer takes one input; got {len(args)} more "
                            f"positional and {sorted(kwargs)} keyword arguments.")
        if adapter_names is None:
            adapter_names = self.adapter_names
            if adapter_names is None:
                return self._run(self, x)
        return self._forward_mixed(x, adapter_names)

    def _forward_mixed(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """PEFT's mixed-adapter batch: row i uses adapter `names[i]` (any adapter of the layer,
        active or not; "__base__" and names absent from this layer mean the base alone)."""
        if len(x) != len(names):
            raise ValueError("Length of `adapter_names` should be the same as the number of "
                             f"inputs, but got {len(names)} and {len(x)} respectively.")
        if self.merged_adapters:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please "
                             "call `unmerge_adapter` first.")
        wanted = set(names)
        present = tuple(a for a in self.sites if a in wanted)
        run = self._forwards.mixed.get((self.training, present))
        if run is None:  # checked once per adapter set: what it checks is fixed at add_adapter
            for adapter in present:
                self.method.check_mixed(self, adapter)
        if self._disabled:
            return self._run(self, x)
        if distributed.is_dtensor(x):  # tensor parallelism; FSDP2 and DDP pass plain tensors
            raise distributed.DistributedError("`adapter_names=` needs plain tensor inputs; this "
                                               f"layer (`{self.path}`) got a DTensor")
        if run is None:
            run = self._forwards.mixed_run(self, self.training, present)
        return run(self, x, names)

    # ------------------------------------------------------------------------------ lowering
    def relower(self) -> None:
        """Drop compiled graphs and DoRA caches and lower again (for changes made behind the
        layer's back: hooks added to `base_layer`, weights written through `.data`)."""
        self.method.clear_caches(self)
        self._invalidate()

    def _reset_compiled(self) -> None:
        self.__dict__.update(_gm=None, _graph=None, _run=_lazy_run, _run_row=None,
                             _row_shape=None, _forwards=Forwards())

    def _invalidate(self) -> None:
        self._reset_compiled()
        self._select()

    def _key(self) -> tuple[bool, tuple[str, ...]]:
        """What the whole-batch graph depends on, besides changes that invalidate it."""
        return self.training, tuple(self.lowered_adapters())

    def _select(self) -> None:
        """Use the forward for the current state, lowering it if needed."""
        if self.kind in WHOLE_MODULE_KINDS:  # never lowered: the method calls the module
            self.__dict__.update(_graph=_module_call_graph(), _run=_lazy_run, _run_row=None,
                                 _row_shape=None)
            return
        lowered = self._forwards.lowered(self, self._key())
        self.__dict__.update(_graph=lowered.graph, _run=lowered.run, _run_row=lowered.row.forward(),
                             _row_shape=lowered.row.shape)

    def _change_state(self, write_weights: Callable[[], object], pass_: MergePass | UnmergePass) -> None:
        """A merge or unmerge: `write_weights` (the fold step), then the forward for the new
        state, cached or built by `pass_` from the current graph."""
        if self.kind in WHOLE_MODULE_KINDS:
            try:
                write_weights()
            finally:
                self._select()
            return
        if self._graph is None:
            self.relower()
        current, before = self._graph, self._key()
        try:
            write_weights()
            self._forwards.transition(self, current, before, self._key(), pass_)
        except BaseException:
            self._invalidate()  # some adapters may have been folded before the failure
            raise
        self._select()

    def train(self, mode: bool = True) -> AdaptedLayer:
        super().train(mode)
        if mode:  # bitsandbytes' CPU eval repacking has no backward (runtime/quantized.py)
            quantized.unpack(self.base_layer)
        self._select()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedLayer:
        before = [(p.dtype, p.device) for p in self.parameters()]
        super()._apply(fn, recurse)
        if [(p.dtype, p.device) for p in self.parameters()] != before:
            self._invalidate()  # dtype casts in the graph, and the kernels (a GPU's), depend on them
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in _COMPILED:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_compiled()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapters={list(self.sites)}, active={self.active}, " \
               f"merged={self.merged_adapters}"
