"""What adapters a model holds: the `State` kept on the host model, and how to reach it.

The state is frozen and replaced, never edited: each adapter as installed (its spec, sites,
saved modules, token rows, whether it trains), which adapters are active, whether adapters are
disabled. It lives in the host module's `__dict__` under `STATE_ATTR` (not a submodule, buffer
or parameter), so state_dict, deep copies and `generate()` ignore it. Model-level operations
(`surgeon.api`) read it and act on every wrapper (`surgeon.runtime.wrappers`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from surgeon.lang.spec import Adapter
from surgeon.planning.site import Site

STATE_ATTR = "surgeon_state"


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

    @property
    def frozen(self) -> frozenset[str]:
        """Adapters loaded for inference: they never require grad."""
        return frozenset(a.name for a in self.adapters if not a.trainable)

    def get(self, name: str) -> Installed:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(f"no adapter `{name}` in the model; it has {', '.join(self.names) or 'none'}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself when `model` is a torch.compile or DistributedDataParallel wrapper
    (each looked up only when its module is already imported)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    if ddp and isinstance(model, ddp.DistributedDataParallel):
        model = model.module
    return model


def state_of(model: nn.Module) -> State | None:
    """The model's adapters, or None for a model surgeon has not adapted."""
    return unwrap(model).__dict__.get(STATE_ATTR)


def require_state(model: nn.Module) -> State:
    state = state_of(model)
    if state is None:
        raise ValueError(f"`{type(model).__name__}` has no surgeon adapters; call surgeon.apply first")
    return state


def set_state(model: nn.Module, state: State | None) -> None:
    """Record `state` on the model (None: forget it, the model is plain again)."""
    model = unwrap(model)
    if state is None:
        model.__dict__.pop(STATE_ATTR, None)
    else:
        model.__dict__[STATE_ATTR] = state
