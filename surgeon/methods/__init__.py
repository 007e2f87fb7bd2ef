"""The method registry: one folder per method, found by PEFT's peft_type lower-cased.

A method is its folder, `surgeon/methods/<name>/`: `config.py` defines `CONFIG`, a torch-free
`MethodConfig` (fields, rules, placement, checks, PEFT quirks); `layer.py` defines the runtime
(parameters, initialisation, emitted subgraph, merge delta; see `surgeon.runtime.method`).
Adding a built-in method is its folder plus one line in `BUILTIN`. A method defined anywhere
else (a user's package, a test) joins with `register(config, runtime)`.

    >>> from surgeon.methods import config_of, runtime_of
    >>> config_of("lora").default("r")
    8
    >>> runtime_of("lora").containers[0][0]
    'lora_dropout'
"""

from __future__ import annotations

import importlib
from typing import Any

from surgeon.methods.base import MethodConfig

# Built-in methods, in the order the language lists them; each is `surgeon.methods.<name>`.
BUILTIN: tuple[str, ...] = (
    "lora",
    "ia3",
    "adalora",
    "loha",
    "lokr",
    "vera",
    "oft",
    "boft",
    "hra",
    "ln_tuning",
    "fourierft",
    "miss",
    "randlora",
    "shira",
    "road",
    "delora",
    "c3a",
    "waveft",
    "vblora",
    "gralora",
    "osf",
)

_configs: dict[str, MethodConfig] = {}  # loaded or registered, by name
_runtimes: dict[str, Any] = {}  # runtime objects, by name, loaded on first use
_registered: list[str] = []  # names added by `register`, in order


def register(config: MethodConfig, runtime: Any = None) -> None:
    """Add (or replace) a method defined outside this package.

    Args:
        config: its `MethodConfig`; `config.name` is the name specs use.
        runtime: the object implementing `surgeon.runtime.method.MethodRuntime`, or None for
            a method that is only parsed and converted.
    """
    _configs[config.name] = config
    _runtimes.pop(config.name, None)
    if runtime is not None:
        _runtimes[config.name] = runtime
    if config.name not in BUILTIN and config.name not in _registered:
        _registered.append(config.name)


def unregister(name: str) -> None:
    """Remove a method added with `register` (built-ins cannot be removed)."""
    if name in _registered:
        _registered.remove(name)
        _configs.pop(name, None)
        _runtimes.pop(name, None)


def names() -> tuple[str, ...]:
    """Every method a spec may name: the built-ins, then registered ones."""
    return BUILTIN + tuple(_registered)


def config_of(name: str) -> MethodConfig:
    """The `MethodConfig` of method `name`.

    Raises:
        KeyError: no such method.
    """
    config = _configs.get(name)
    if config is None:
        if name not in BUILTIN:
            raise KeyError(f"unknown method {name!r}; known: {', '.join(names())}")
        config = _configs[name] = importlib.import_module(f"surgeon.methods.{name}.config").CONFIG
    return config


def by_peft_type(peft_type: str) -> MethodConfig | None:
    """The method whose PEFT peft_type is `peft_type` ("LORA"), or None."""
    return next((config_of(n) for n in names() if config_of(n).peft_type == peft_type), None)


def applies(name: str) -> bool:
    """Whether method `name` can be applied to a model (it has a runtime part)."""
    return name in _runtimes or config_of(name).runtime is not None


def runtime_of(name: str) -> Any:
    """The runtime part of method `name` (what the adapted layer and the passes call).

    Raises:
        NotImplementedError: the method is parsed and converted but not applied yet.
    """
    runtime = _runtimes.get(name)
    if runtime is None:
        where = config_of(name).runtime
        if where is None:
            known = ", ".join(f"`{m}`" for m in names() if applies(m))
            raise NotImplementedError(f"Method `{name}` cannot be applied yet; supported: {known}.")
        module, _, attribute = where.partition(":")
        runtime = _runtimes[name] = getattr(importlib.import_module(module), attribute)
    return runtime

