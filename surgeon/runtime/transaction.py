"""Apply a Spec to a host model as one transaction.

    prepare: plan against the model as if unadapted, build every new wrapper (adapted layer,
             saved-module copy, token rows) off to the side, and validate; the model is only
             read.
    commit:  swap the new wrappers in, add adapters to wrappers that already exist, mark what
             trains, record the adapters on the model (`surgeon.runtime.state`). Every step logs
             its undo, so an error anywhere rolls the model back to exactly what it was (module
             identity, state_dict, requires_grad flags).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from surgeon.lang.spec import Spec
from surgeon.methods import runtime_of
from surgeon.planning.select import PlanError
from surgeon.planning.site import Site
from surgeon.runtime.adapted import AdaptedLayer
from surgeon.runtime.method import shared_containers
from surgeon.runtime.routing import BASE, install_hooks
from surgeon.runtime.saved import SavedModule
from surgeon.runtime.state import STATE_ATTR, Installed, State, set_state, state_of
from surgeon.runtime.tokens import TokenWrapper, tied_output
from surgeon.runtime.wrappers import Wrapper, activate, base_view, freeze_base, is_wrapper


class Transaction:
    """An undo log over one model: `do(step, undo)`, then `rollback()` on any error."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._undo: list[Callable[[], None]] = []
        self._grad = [(p, p.requires_grad) for p in model.parameters()]
        self._state = model.__dict__.get(STATE_ATTR)

    def do(self, step: Callable[[], None], undo: Callable[[], None]) -> None:
        step()
        self._undo.append(undo)

    def done(self, undo: Callable[[], None]) -> None:
        """Log the undo of a step already taken (one that returned its own undo)."""
        self._undo.append(undo)

    def swap(self, path: str, new: nn.Module) -> None:
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        old = parent._modules[name]
        self.do(lambda: setattr(parent, name, new), lambda: setattr(parent, name, old))

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        for p, flag in self._grad:
            p.requires_grad_(flag)
        set_state(self.model, self._state)


@dataclass
class Prepared:
    """Everything built for a commit; the model has not been touched yet."""

    adapters: tuple[Installed, ...] = ()
    # path -> a wrapper to swap in (token wrappers of tied output embeddings included)
    new: dict[str, Wrapper] = dataclasses.field(default_factory=dict)
    # (a wrapper already in the model, adapter, the step that adds the adapter to it)
    added: list[tuple[Wrapper, str, Callable[[], None]]] = dataclasses.field(default_factory=list)
    # (step, undo) run first at commit: shared containers swapped into existing layers
    steps: list[tuple[Callable[[], None], Callable[[], None]]] = dataclasses.field(default_factory=list)


def rename_adapter(spec: Spec, adapter_name: str | None) -> Spec:
    """`spec` with its single adapter renamed (None: unchanged)."""
    if adapter_name is None:
        return spec
    if len(spec.adapters) != 1:
        raise PlanError(f"adapter_name={adapter_name!r} needs a spec with one adapter; "
                         f"this one has {len(spec.adapters)}")
    return dataclasses.replace(spec, adapters=(dataclasses.replace(spec.adapters[0], name=adapter_name),))


def _check_names(spec: Spec, state: State | None) -> None:
    existing = set(state.names) if state else set()
    for a in spec.adapters:
        if a.name in existing:
            raise PlanError(f"adapter `{a.name}` already exists in the model; delete it first or "
                             "choose another name")
        if a.name == BASE or "." in a.name or not a.name:
            raise PlanError(f"`{a.name}` cannot name an adapter (no dots, not `{BASE}`)")


def prepare(spec: Spec, model: nn.Module, *, example_inputs=None) -> Prepared:
    """Plan `spec` and build every new module, reading the model only."""
    from surgeon.planning.planner import plan as make_plan

    state = state_of(model)
    _check_names(spec, state)
    the_plan = make_plan(spec, base_view(model), example_inputs=example_inputs)
    _check_parameter_sets(state, the_plan.adapters)
    prepared = Prepared()
    try:
        for ap in the_plan.adapters:
            prepared.adapters += (Installed(ap.adapter, ap.sites, ap.save, tokens=ap.tokens),)
            shared = _prepare_shared(model, ap.name, ap.sites, prepared)
            for site in ap.sites:
                _prepare_site(model, site, prepared, shared)
            for path in ap.save:
                _prepare_saved(model, path, ap.name, prepared)
            for path, indices in ap.tokens:
                _prepare_tokens(model, path, ap.name, indices, prepared)
    except BaseException:
        discard(prepared)
        raise
    return prepared


def _parameters(sites: tuple[Site, ...]) -> frozenset[str]:
    return frozenset(f"{s.path}.{s.option('parameter_name')}" for s in sites if s.kind == "Parameter")


def _check_parameter_sets(state: State | None, planned) -> None:
    """PEFT 0.21 refuses adapters whose target_parameters differ (its nesting of wrappers
    says which parameter a factor belongs to); surgeon compares the matched parameters."""
    seen = [(i.name, _parameters(i.sites)) for i in (state.adapters if state else ())]
    for ap in planned:
        mine = _parameters(ap.sites)
        for name, theirs in seen:
            if mine and theirs and mine != theirs:
                raise PlanError(f"adapter `{ap.name}` must target the same parameters as adapter "
                                f"`{name}` (PEFT: all adapters using target_parameters target the same "
                                f"set): {sorted(mine)} vs {sorted(theirs)}")
        seen.append((ap.name, mine))


def discard(prepared: Prepared) -> None:
    """Take every adapter out of the layers this prepare built. A method may have changed the
    base module while building (LoRA on a MultiheadAttention nests its out_proj adapter inside
    the MHA, at PEFT's key path); removing the adapters undoes that, so a failed apply leaves
    the host model exactly as it was. Call after a failed prepare or a rolled-back commit."""
    for wrapper in prepared.new.values():
        if isinstance(wrapper, AdaptedLayer):
            for name in list(wrapper.sites):
                wrapper.method.remove(wrapper, name)


def _module_at(model: nn.Module, path: str, prepared: Prepared) -> nn.Module:
    """What `path` will hold before this adapter's part: a wrapper built by this prepare, or
    the model's module."""
    return prepared.new[path] if path in prepared.new else model.get_submodule(path)


def _refuse_wrapped(module: nn.Module, path: str, use: str) -> None:
    """A module held by another wrapper kind cannot be `use`d too."""
    if is_wrapper(module):
        raise PlanError(f"`{path}` {module.held_as}; it cannot also be {use}")


def _add_later(prepared: Prepared, path: str, wrapper: Wrapper, adapter: str,
               step: Callable[[], None]) -> None:
    """Run `step` now on a wrapper this prepare built, else at commit (undoably)."""
    if path in prepared.new:
        step()
    else:
        prepared.added.append((wrapper, adapter, step))


def _parameter_layer(layer: AdaptedLayer, site: Site) -> AdaptedLayer | None:
    """Where a bare-parameter site (LoRA's target_parameters) goes in the nest at its path: the
    layer adapting the same parameter; None (nest a new layer around `layer`) when its adapter
    already adapts another parameter there (a layer this prepare built: `_check_parameter_sets`
    keeps the sets equal), as PEFT nests ParamWrappers; else `layer`, which refuses it."""
    name, module = site.option("parameter_name"), layer
    while isinstance(module, AdaptedLayer) and module.kind == site.kind:
        if module.__dict__.get("parameter_name") == name:  # set by LoRA's param.create
            return module
        module = module.base_layer
    return None if site.adapter in layer.sites else layer


def _prepare_shared(model: nn.Module, adapter: str, sites: tuple[Site, ...],
                    prepared: Prepared) -> dict[str, nn.Module]:
    """The method's model-level containers holding `adapter`'s shared tensors too (runtime
    optional parts `shared_containers` / `init_shared`); {} for a method without any.

    Existing layers get the new containers at commit (undoably); layers this prepare built
    get them now."""
    method = runtime_of(sites[0].method) if sites else None
    names = shared_containers(method) if method is not None else ()
    if not names:
        return {}
    holders = [m for m in (*prepared.new.values(), *model.modules())
               if isinstance(m, AdaptedLayer) and m.method is method]
    old = {n: holders[0]._modules[n] for n in names} if holders else {}
    bases = [_module_at(model, s.path, prepared) for s in sites]
    bases = [b.base_layer if isinstance(b, AdaptedLayer) else b for b in bases]
    shared = method.init_shared(old, adapter, sites, bases)
    for holder in dict.fromkeys(holders):
        for name, new in shared.items():
            if any(holder is w for w in prepared.new.values()):
                setattr(holder, name, new)
            else:
                prepared.steps.append((functools.partial(setattr, holder, name, new),
                                       functools.partial(setattr, holder, name, old[name])))
    return shared


def _prepare_site(model: nn.Module, site: Site, prepared: Prepared,
                  shared: dict[str, nn.Module] | None = None) -> None:
    module = _module_at(model, site.path, prepared)
    if isinstance(module, AdaptedLayer) and site.kind == "Parameter" and module.kind == site.kind:
        if (held := _parameter_layer(module, site)) is None:
            prepared.new[site.path] = AdaptedLayer(module, site, shared)
            return None
        module = held
    if isinstance(module, AdaptedLayer):
        if site.kind != module.kind or site.method != module.method.name:
            raise PlanError(f"`{site.path}` holds {module.method.name}/{module.kind} adapters; "
                             f"cannot add a {site.method}/{site.kind} one")
        return _add_later(prepared, site.path, module, site.adapter,
                          functools.partial(module.add_adapter, site))
    _refuse_wrapped(module, site.path, "adapted")
    prepared.new[site.path] = AdaptedLayer(module, site, shared)


def _prepare_saved(model: nn.Module, path: str, adapter: str, prepared: Prepared) -> None:
    module = _module_at(model, path, prepared)
    if isinstance(module, SavedModule):
        copy_ = copy.deepcopy(module.original_module)
        return _add_later(prepared, path, module, adapter,
                          functools.partial(module.modules_to_save.__setitem__, adapter, copy_))
    _refuse_wrapped(module, path, "saved whole")
    wrapper = prepared.new[path] = SavedModule(module)
    wrapper.modules_to_save[adapter] = copy.deepcopy(module)


def _prepare_tokens(model: nn.Module, path: str, adapter: str, indices: tuple[int, ...],
                    prepared: Prepared) -> None:
    """A TokenWrapper for `path` (plus a tied one on a tied output embedding), or new rows."""
    module = _module_at(model, path, prepared)
    if isinstance(module, TokenWrapper):  # a tied one adds nothing
        return _add_later(prepared, path, module, adapter,
                          functools.partial(module.token_adapter.add, adapter, indices))
    _refuse_wrapped(module, path, "given trainable tokens")
    wrapper = prepared.new[path] = TokenWrapper(module)
    if (tied := tied_output(model, module)) is not None:
        prepared.new[tied] = TokenWrapper(model.get_submodule(tied), wrapper.token_adapter)
    wrapper.token_adapter.add(adapter, indices)


def commit(model: nn.Module, prepared: Prepared, tx: Transaction, *, trainable: bool = True) -> State:
    """Swap the prepared modules in and record the adapters; every step undoable through `tx`."""
    # innermost first, so a wrapper around an adapted layer's parent wraps the adapted tree
    for path, wrapper in sorted(prepared.new.items(), key=lambda item: -item[0].count(".")):
        tx.swap(path, wrapper)
    for step, undo in prepared.steps:
        tx.do(step, undo)
    for wrapper, adapter, step in prepared.added:
        tx.do(step, functools.partial(wrapper.delete_adapter, adapter))
    old = state_of(model)
    added = tuple(dataclasses.replace(a, trainable=trainable) for a in prepared.adapters)
    active = old.active if old else (added[0].name,)
    state = State((old.adapters if old else ()) + added, active, old.disabled if old else False)
    activate(model, state, tx.done)
    freeze_base(model, state)
    set_state(model, state)
    tx.done(install_hooks(model))
    return state
