"""Apply a Spec to a host model as one transaction.

    prepare: plan against the model as if unadapted, build every AdaptedLayer and saved-module
             copy off to the side, and validate; the model is only read.
    commit:  swap the new modules in, add adapters to layers that already exist, mark what
             trains, record the adapters on the model. Every step logs its undo, so an error
             anywhere rolls the model back to exactly what it was (module identity, state_dict,
             requires_grad flags).

The model keeps a `State` (frozen; replaced, never edited) under `STATE_ATTR`: what each adapter
is (spec + sites + saved modules), which adapters are active, whether they are disabled. Model-
level operations (surgeon.api) read it and act on every `AdaptedLayer` / `SavedModule`.

Mixed-adapter batches: a forward pre-hook on the root takes `adapter_names=[...]` out of the
call's keyword arguments and hands it to every adapted layer for that call; a post-hook that
always runs clears it. The hooks are plain functions of the module, so deep copies keep working.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgeon.lang.spec import Adapter, Spec
from surgeon.mixed_rows import run_rows
from surgeon.modules import AdaptedLayer
from surgeon.site import Site
from surgeon.select import PlanError
from surgeon.tokens import TokenAdapter, TokenWrapper, tied_output

STATE_ATTR = "surgeon_state"
ROUTED_ATTR = "surgeon_rows_routed"  # set on the root while a mixed batch's rows are routed
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


# --------------------------------------------------------------------------- saved modules


class SavedModule(nn.Module):
    """PEFT's ModulesToSaveWrapper: the original module and one trainable copy per adapter.

    In-memory names are PEFT's (`original_module.*`, `modules_to_save.<adapter>.*`); the active
    adapter's copy runs, the original when none is active or adapters are disabled.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.adapter_names: Sequence[str] | None = None

    def current(self) -> nn.Module:
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        names = self.adapter_names
        if names is None or self.disabled:
            return self.current()(*args, **kwargs)
        saved, original = self.modules_to_save, self.original_module
        return run_rows(args[0], names, lambda name, rows: (saved[name] if name in saved else original)(
            rows, *args[1:], **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or name in ("original_module", "modules_to_save"):
                raise
            # host code reads attributes of the wrapped module (`lm_head.weight`, `out_features`)
            return getattr(self.current(), name)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Installed:
    """One adapter as it lives in the model."""

    adapter: Adapter  # the spec's adapter (options by PEFT name, rules)
    sites: tuple[Site, ...]  # its adapted modules
    save: tuple[str, ...] = ()  # modules saved whole (modules_to_save), by path
    trainable: bool = True  # False: loaded for inference (PEFT's is_trainable=False)
    tokens: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (embedding path, trainable rows)

    @property
    def name(self) -> str:
        return self.adapter.name


@dataclass(frozen=True, slots=True)
class State:
    """Every adapter of a model, which are active, and whether adapters are disabled."""

    adapters: tuple[Installed, ...]
    active: tuple[str, ...]
    disabled: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def get(self, name: str) -> Installed:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(f"no adapter `{name}` in the model; it has {', '.join(self.names) or 'none'}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself when `model` is a torch.compile wrapper (dynamo is then imported)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return model._orig_mod if eval_frame and isinstance(model, eval_frame.OptimizedModule) else model


def state_of(model: nn.Module) -> State | None:
    return unwrap(model).__dict__.get(STATE_ATTR)


def require_state(model: nn.Module) -> State:
    state = state_of(model)
    if state is None:
        raise ValueError(f"`{type(model).__name__}` has no surgeon adapters; call surgeon.apply first")
    return state


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` in the same order, without its generator per nesting level
    (which makes every model-level operation cost depth x modules frames)."""
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield prefix, module
        children = [(f"{prefix}.{n}" if prefix else n, m)
                    for n, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    return ((n, m) for n, m in named_modules(unwrap(model)) if isinstance(m, AdaptedLayer))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    return ((n, m) for n, m in named_modules(unwrap(model)) if isinstance(m, SavedModule))


def token_wrappers(model: nn.Module) -> Iterator[tuple[str, TokenWrapper]]:
    return ((n, m) for n, m in named_modules(unwrap(model)) if isinstance(m, TokenWrapper))


# --------------------------------------------------------------------------- the planner's view


def base_view(model: nn.Module) -> nn.Module:
    """The model as if unadapted, without touching it: what the planner must see.

    Ancestors of adapted layers and saved modules are shallow copies (sharing parameters) whose
    children are the base layers and original modules; everything else is the model's own object.
    """
    wrapped = {n for n, m in model.named_modules()
               if isinstance(m, (AdaptedLayer, SavedModule, TokenWrapper))}
    if not wrapped:
        return model
    ancestors = {".".join(p.split(".")[:i]) for p in wrapped for i in range(p.count(".") + 1)}

    def view(module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, AdaptedLayer):
            return module.base_layer
        if isinstance(module, (SavedModule, TokenWrapper)):
            return module.original_module
        if path not in ancestors:
            return module
        clone = type(module).__new__(type(module))
        clone.__dict__.update(module.__dict__)
        clone.__dict__["_modules"] = {
            name: view(child, f"{path}.{name}" if path else name) if child is not None else None
            for name, child in module._modules.items()
        }
        return clone

    return view(model, "")


# --------------------------------------------------------------------------- transaction


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


def set_state(model: nn.Module, state: State | None) -> None:
    model = unwrap(model)
    if state is None:
        model.__dict__.pop(STATE_ATTR, None)
    else:
        model.__dict__[STATE_ATTR] = state


@dataclass
class Prepared:
    """Everything built for a commit; the model has not been touched yet."""

    adapters: tuple[Installed, ...]
    new_layers: dict[str, AdaptedLayer]  # path -> a layer to swap in
    added_sites: list[tuple[AdaptedLayer, Site]]  # sites for layers the model already has
    new_saved: dict[str, SavedModule]  # path -> a wrapper to swap in
    added_copies: list[tuple[SavedModule, str, nn.Module]]  # (existing wrapper, adapter, copy)
    new_tokens: dict[str, TokenWrapper] = dataclasses.field(default_factory=dict)  # incl. tied ones
    added_tokens: list[tuple[TokenAdapter, str, tuple[int, ...]]] = dataclasses.field(default_factory=list)


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
    from surgeon.planner import plan as make_plan

    state = state_of(model)
    _check_names(spec, state)
    the_plan = make_plan(spec, base_view(model), example_inputs=example_inputs)
    prepared = Prepared((), {}, [], {}, [])
    for ap in the_plan.adapters:
        prepared.adapters += (Installed(ap.adapter, ap.sites, ap.save, tokens=ap.tokens),)
        for site in ap.sites:
            _prepare_site(model, site, prepared)
        for path in ap.save:
            _prepare_saved(model, path, ap.name, prepared)
        for path, indices in ap.tokens:
            _prepare_tokens(model, path, ap.name, indices, prepared)
    return prepared


def _prepare_site(model: nn.Module, site: Site, prepared: Prepared) -> None:
    if site.path in prepared.new_layers:
        prepared.new_layers[site.path].add_adapter(site)  # not in the model yet
        return
    module = model.get_submodule(site.path)
    if isinstance(module, AdaptedLayer):
        if site.kind != module.kind or site.method != module.method.name:
            raise PlanError(f"`{site.path}` holds {module.method.name}/{module.kind} adapters; "
                             f"cannot add a {site.method}/{site.kind} one")
        prepared.added_sites.append((module, site))
    elif isinstance(module, SavedModule):
        raise PlanError(f"`{site.path}` is saved whole by another adapter; it cannot also be adapted")
    elif isinstance(module, TokenWrapper) or site.path in prepared.new_tokens:
        raise PlanError(f"`{site.path}` has trainable tokens; it cannot also be adapted")
    else:
        prepared.new_layers[site.path] = AdaptedLayer(module, site)


def _prepare_saved(model: nn.Module, path: str, adapter: str, prepared: Prepared) -> None:
    if path in prepared.new_saved:
        wrapper = prepared.new_saved[path]
        wrapper.modules_to_save[adapter] = copy.deepcopy(wrapper.original_module)
        return
    module = model.get_submodule(path)
    if isinstance(module, SavedModule):
        prepared.added_copies.append((module, adapter, copy.deepcopy(module.original_module)))
    elif isinstance(module, AdaptedLayer):
        raise PlanError(f"`{path}` is adapted by another adapter; it cannot also be saved whole")
    elif isinstance(module, TokenWrapper):
        raise PlanError(f"`{path}` has trainable tokens; it cannot also be saved whole")
    else:
        wrapper = SavedModule(module)
        wrapper.modules_to_save[adapter] = copy.deepcopy(module)
        prepared.new_saved[path] = wrapper


def _prepare_tokens(model: nn.Module, path: str, adapter: str, indices: tuple[int, ...],
                    prepared: Prepared) -> None:
    """A TokenWrapper for `path` (plus a tied one on a tied output embedding), or new rows."""
    module = prepared.new_tokens.get(path) or model.get_submodule(path)
    if isinstance(module, TokenWrapper) and path not in prepared.new_tokens:
        return prepared.added_tokens.append((module.token_adapter, adapter, indices))
    if isinstance(module, (AdaptedLayer, SavedModule)) or path in prepared.new_layers:
        raise PlanError(f"`{path}` is adapted or saved by another adapter; it cannot have trainable tokens")
    if path not in prepared.new_tokens:
        wrapper = prepared.new_tokens[path] = TokenWrapper(module)
        if (tied := tied_output(model, module)) is not None:
            prepared.new_tokens[tied] = TokenWrapper(model.get_submodule(tied), wrapper.token_adapter)
    prepared.new_tokens[path].token_adapter.add(adapter, indices)  # a tied one adds nothing


def commit(model: nn.Module, prepared: Prepared, tx: Transaction, *, trainable: bool = True) -> State:
    """Swap the prepared modules in and record the adapters; every step undoable through `tx`."""
    for path, layer in prepared.new_layers.items():
        tx.swap(path, layer)
    for layer, site in prepared.added_sites:
        tx.do(lambda l=layer, s=site: l.add_adapter(s), lambda l=layer, s=site: l.delete_adapter(s.adapter))
    for path, wrapper in prepared.new_saved.items():
        tx.swap(path, wrapper)
    for wrapper, name, module in prepared.added_copies:
        tx.do(lambda w=wrapper, n=name, m=module: w.modules_to_save.__setitem__(n, m),
              lambda w=wrapper, n=name: w.modules_to_save.__delitem__(n))
    for path, tokens in prepared.new_tokens.items():
        tx.swap(path, tokens)
    for layer, name, indices in prepared.added_tokens:
        tx.do(lambda l=layer, n=name, i=indices: l.add(n, i), lambda l=layer, n=name: l.remove(n))
    old = state_of(model)
    added = tuple(dataclasses.replace(a, trainable=trainable) for a in prepared.adapters)
    active = old.active if old else (added[0].name,)
    state = State((old.adapters if old else ()) + added, active, old.disabled if old else False)
    activate(model, state, tx)
    freeze_base(model, state)
    set_state(model, state)
    install_hooks(model, tx)
    return state


# --------------------------------------------------------------------------- activation, training


def activate(model: nn.Module, state: State, tx: Transaction | None = None) -> None:
    """Make every layer and saved module follow `state.active` (PEFT's set_adapter)."""
    want = list(state.active)
    for _, layer in adapted_layers(model):
        if layer.active != want:
            before = list(layer.active)
            if tx is None:
                layer.set_adapter(want)
            else:
                tx.do(lambda l=layer: l.set_adapter(want), lambda l=layer, b=before: l.set_adapter(b))
        _freeze_inference(layer, state)
    for _, saved in saved_modules(model):
        present = [a for a in want if a in saved.modules_to_save]
        if len(present) > 1:
            raise ValueError("only one adapter with saved modules can be active at a time, got "
                             f"{present} (PEFT's rule)")
        before = saved.active
        if tx is not None:
            tx.do(lambda s=saved: setattr(s, "active", present[0] if present else None),
                  lambda s=saved, b=before: setattr(s, "active", b))
        else:
            saved.active = present[0] if present else None
        for name, copy_ in saved.modules_to_save.items():
            copy_.requires_grad_(name == saved.active and state.get(name).trainable)
    for _, tokens in token_wrappers(model):
        before, tokens.active = tokens.active, tokens.choose(want)  # PEFT: one adapter's rows
        if tx is not None:
            tx.do(lambda: None, lambda t=tokens, b=before: setattr(t, "active", b))
        for name, delta in tokens.token_adapter.trainable_tokens_delta.items():
            delta.requires_grad_(name == tokens.active and state.get(name).trainable)


def _freeze_inference(layer: AdaptedLayer, state: State) -> None:
    for name in layer.sites:
        if name in state.names and not state.get(name).trainable:
            for p in layer.adapter_parameters(name):
                p.requires_grad_(False)


def freeze_base(model: nn.Module, state: State) -> None:
    """PEFT's mark_only_adapters_as_trainable: freeze all but adapter parameters, then biases."""
    keep: set[int] = set()
    for _, layer in adapted_layers(model):
        for name in layer.sites:
            keep.update(id(p) for p in layer.adapter_parameters(name))
    for _, saved in saved_modules(model):
        keep.update(id(p) for p in saved.modules_to_save.parameters())
    for _, tokens in token_wrappers(model):
        keep.update(id(p) for p in tokens.token_adapter.trainable_tokens_delta.parameters())
    for p in unwrap(model).parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for name in state.active:
        installed = state.get(name)
        bias = installed.adapter.option("bias") or "none"
        if installed.trainable and bias == "all":
            for n, p in unwrap(model).named_parameters():
                if n == "bias" or n.endswith(".bias"):
                    p.requires_grad_(True)
        elif installed.trainable and bias.endswith("_only"):
            for _, layer in adapted_layers(model):
                if isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter):
                    layer.base_layer.bias.requires_grad_(True)
    for _, saved in saved_modules(model):
        saved.original_module.requires_grad_(False)  # PEFT wraps after marking biases


# --------------------------------------------------------------------------- mixed batches


def _take_adapter_names(module: nn.Module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    route_rows(module, list(names))
    setattr(module, ROUTED_ATTR, True)
    return args, kwargs


def _clear_adapter_names(module: nn.Module, args, kwargs, output):
    # Runs after every forward: only walk the model when the pre-hook routed rows, so a plain
    # call (decode) pays one attribute read, not a traversal of every submodule.
    if getattr(module, ROUTED_ATTR, False):
        setattr(module, ROUTED_ATTR, False)
        route_rows(module, None)


def route_rows(module: nn.Module, names: list[str] | None) -> None:
    """Row i of every following forward uses adapter `names[i]` (None: back to the active set)."""
    if names is not None:
        state = state_of(module)
        if module.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = list(state.names if state else ())
        if unknown := sorted(set(names) - {BASE, *known}):
            raise ValueError(f"unknown adapter(s) in adapter_names: {unknown}; has {known}, `{BASE}`")
    for _, routed in (*adapted_layers(module), *saved_modules(module), *token_wrappers(module)):
        routed.adapter_names = names


def install_hooks(model: nn.Module, tx: Transaction | None = None) -> None:
    """Root hooks that route `model(..., adapter_names=[...])` to every adapted layer."""
    model = unwrap(model)
    if _take_adapter_names in model._forward_pre_hooks.values():
        return
    handles = []

    def add() -> None:
        handles.append(model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True, prepend=True))
        handles.append(model.register_forward_hook(_clear_adapter_names, with_kwargs=True, always_call=True))

    if tx is None:
        add()
    else:
        tx.do(add, lambda: [h.remove() for h in handles])


def remove_hooks(model: nn.Module) -> None:
    model = unwrap(model)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, fn in list(hooks.items()):
            if fn in (_take_adapter_names, _clear_adapter_names):
                del hooks[key]
                model._forward_hooks_with_kwargs.pop(key, None)
                model._forward_pre_hooks_with_kwargs.pop(key, None)
                model._forward_hooks_always_called.pop(key, None)
