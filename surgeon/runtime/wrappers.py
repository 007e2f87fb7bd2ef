"""The modules surgeon swaps into a host model, behind one protocol, and the one walk over them.

Three kinds of module replace a host module: `AdaptedLayer` (a base layer plus method
adapters), `SavedModule` (PEFT's modules_to_save) and `TokenWrapper` (PEFT's trainable token
rows). Model-level operations (`surgeon.api`, `surgeon.runtime.transaction`) walk the model once
with `wrappers` and call the `Wrapper` protocol, so none of them switches on the kind; only
code about one kind (merging layers, a checkpoint's key layout) asks for it with `wrappers_of`.

`KINDS` is the one list of wrapper classes: a new kind implements `Wrapper` and joins it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import ClassVar, Protocol, TypeVar

from torch import nn

from surgeon.runtime.adapted import AdaptedLayer
from surgeon.runtime.saved import SavedModule
from surgeon.runtime.state import State, unwrap
from surgeon.runtime.tokens import TokenWrapper

W = TypeVar("W", bound=nn.Module)


class Wrapper(Protocol):
    """What every module surgeon swaps into a host model implements."""

    # how a conflicting adapter's error names it: "`path` <held_as>; it cannot also be ..."
    held_as: ClassVar[str]
    # a mixed batch's adapter per row, set on every wrapper for one call (None: the active set)
    adapter_names: Sequence[str] | None

    @property
    def original_module(self) -> nn.Module:
        """The host module this replaced: what the planner sees (`base_view`)."""
        ...

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters held, by name."""
        ...

    def adapter_parameters(self, adapter: str) -> Iterator[nn.Parameter]:
        """`adapter`'s parameters here: what stays trainable when the base is frozen."""
        ...

    def set_active(self, names: Sequence[str], frozen: Collection[str]) -> Callable[[], None]:
        """Follow the model's active adapters `names` (PEFT's set_adapter); those in `frozen`
        (loaded for inference) never require grad. Raises before changing anything if this
        kind cannot run them together. Returns what undoes the switch."""
        ...

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's enable/disable; disabling also freezes every adapter here."""
        ...

    def delete_adapter(self, name: str) -> None:
        """Remove `name`'s part (nothing if it has none)."""
        ...

    def unloaded(self, merged: Sequence[str]) -> nn.Module:
        """The module to put back in the host when adapters are removed. `merged`: adapters
        being merged into the model (adapted layers have merged theirs already)."""
        ...


KINDS: tuple[type[nn.Module], ...] = (AdaptedLayer, SavedModule, TokenWrapper)


def is_wrapper(module: nn.Module) -> bool:
    return isinstance(module, KINDS)


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


def wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """Every wrapper in `model` (or its torch.compile wrapper) with its path, outermost first."""
    return ((n, m) for n, m in named_modules(unwrap(model)) if isinstance(m, KINDS))


def wrappers_of(model: nn.Module, kind: type[W]) -> Iterator[tuple[str, W]]:
    """The wrappers of one kind, for code about that kind only."""
    return ((n, m) for n, m in named_modules(unwrap(model)) if isinstance(m, kind))


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    return wrappers_of(model, AdaptedLayer)


def base_view(model: nn.Module) -> nn.Module:
    """The model as if unadapted, without touching it: what the planner must see.

    Ancestors of wrappers are shallow copies (sharing parameters) whose children are the
    wrappers' original modules; everything else is the model's own object.
    """
    wrapped = [n for n, _ in wrappers(model)]
    if not wrapped:
        return model
    ancestors = {".".join(p.split(".")[:i]) for p in wrapped for i in range(p.count(".") + 1)}

    def view(module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, KINDS):
            return module.original_module
        if path not in ancestors:
            return module
        clone = object.__new__(type(module))  # FSDP2's classes run __init__ in their __new__
        clone.__dict__.update(module.__dict__)
        clone.__dict__["_modules"] = {
            name: view(child, f"{path}.{name}" if path else name) if child is not None else None
            for name, child in module._modules.items()
        }
        return clone

    return view(model, "")


def activate(model: nn.Module, state: State, log: Callable[[Callable[[], None]], None] | None = None) -> None:
    """Make every wrapper follow `state.active` (PEFT's set_adapter); `log` receives each undo."""
    frozen = state.frozen
    for _, wrapper in wrappers(model):
        undo = wrapper.set_active(state.active, frozen)
        if log is not None:
            log(undo)


def freeze_base(model: nn.Module, state: State) -> None:
    """PEFT's mark_only_adapters_as_trainable: freeze all but adapter parameters, then biases."""
    keep = {id(p) for _, w in wrappers(model) for a in w.adapters for p in w.adapter_parameters(a)}
    host = unwrap(model)
    for p in host.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for name in state.active:
        installed = state.get(name)
        bias = installed.adapter.option("bias", "none") or "none"  # a method may have no `bias`
        if installed.trainable and bias == "all":
            for n, p in host.named_parameters():
                if n == "bias" or n.endswith(".bias"):
                    p.requires_grad_(True)
        elif installed.trainable and bias.endswith("_only"):
            for _, layer in adapted_layers(model):
                if isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter):
                    layer.base_layer.bias.requires_grad_(True)
    for _, saved in wrappers_of(model, SavedModule):
        saved.original_module.requires_grad_(False)  # PEFT wraps after marking biases
