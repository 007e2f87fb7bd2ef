"""Mixed-adapter batches at model level: `model(..., adapter_names=[...])` and `adapter_rows`.

A forward pre-hook on the root takes `adapter_names` out of the call's keyword arguments and
sets it on every wrapper for that call (`Wrapper.adapter_names`); a post-hook that always runs
clears it. The hooks are plain functions of the module, so deep copies keep working. Row i then
uses adapter `adapter_names[i]`, or none for `BASE` (PEFT's "__base__").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from surgeon.runtime.state import state_of, unwrap
from surgeon.runtime.wrappers import wrappers

ROUTED_ATTR = "surgeon_rows_routed"  # set on the root while a mixed batch's rows are routed
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def _take_adapter_names(module: nn.Module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    route_rows(module, list(names))
    setattr(module, ROUTED_ATTR, True)
    return args, kwargs


_ROUTED_CACHE = "surgeon_routed_wrappers"  # (State, wrappers) of the last walk


def _clear_adapter_names(module: nn.Module, args, kwargs, output):
    # Runs after every forward: only walk the model when the pre-hook routed rows, so a plain
    # call (decode) pays one attribute read, not a traversal of every submodule.
    if module.__dict__.get(ROUTED_ATTR, False):
        setattr(module, ROUTED_ATTR, False)
        route_rows(module, None)


def route_rows(module: nn.Module, names: Sequence[str] | None) -> None:
    """Row i of every following forward uses adapter `names[i]` (None: back to the active set)."""
    if names is not None:
        state = state_of(module)
        if module.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = list(state.names if state else ())
        if unknown := sorted(set(names) - {BASE, *known}):
            raise ValueError(f"unknown adapter(s) in adapter_names: {unknown}; has {known}, `{BASE}`")
    for wrapper in _routed(module):
        wrapper.adapter_names = names


def _routed(module: nn.Module) -> list[nn.Module]:
    """The wrappers under `module`, walked once per State: every change to the set of wrappers
    (apply, load, delete, unload) replaces the model's State, so the walk (about 1 ms on a small
    model, twice per mixed-batch call) is redone exactly when it could differ."""
    state = state_of(module)
    cached = module.__dict__.get(_ROUTED_CACHE)
    if state is None or cached is None or cached[0] is not state:
        cached = (state, [w for _, w in wrappers(module)])
        if state is not None:
            module.__dict__[_ROUTED_CACHE] = cached
    return cached[1]


def install_hooks(model: nn.Module) -> Callable[[], None]:
    """Root hooks that route `model(..., adapter_names=[...])` to every wrapper; returns what
    removes them again (nothing when they were installed already)."""
    model = unwrap(model)
    if _take_adapter_names in model._forward_pre_hooks.values():
        return lambda: None
    handles = [
        model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True, prepend=True),
        model.register_forward_hook(_clear_adapter_names, with_kwargs=True, always_call=True),
    ]
    return lambda: [h.remove() for h in handles]


def remove_hooks(model: nn.Module) -> None:
    """Remove the root hooks (unload: the model is plain again)."""
    model = unwrap(model)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, fn in list(hooks.items()):
            if fn in (_take_adapter_names, _clear_adapter_names):
                del hooks[key]
                model._forward_hooks_with_kwargs.pop(key, None)
                model._forward_pre_hooks_with_kwargs.pop(key, None)
                model._forward_hooks_always_called.pop(key, None)
