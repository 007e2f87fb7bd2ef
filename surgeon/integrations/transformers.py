"""transformers' adapter protocol on a surgeon-adapted model, so its own save paths write PEFT.

transformers' `PreTrainedModel.save_pretrained` writes only the adapter, as a PEFT folder, when
the model says it carries one: `_hf_peft_config_loaded` is true, and then it calls
`active_adapters()`, `get_adapter_state_dict(state_dict=...)` and
`peft_config[active].save_pretrained(dir)` — the attributes its `PeftAdapterMixin` defines.
`Trainer.save_model`, Trainer checkpoints and sentence-transformers' `save` all end in that call.
Without the flag they write the whole model under PEFT's in-memory names (`q_proj.base_layer.weight`),
which `from_pretrained` loads with the adapted layers MISSING and random.

The mixin's own methods reach into peft's tuner layers (and transformers 5 needs peft >= 0.22
for them), so `attach` binds these few names on the model *instance* (its `__dict__`; the class
is never touched, `type(model)` stays the user's) with surgeon's answers; `detach` removes them
when the model is plain again (`unload`, `merge_and_unload`). The mixin's other methods
(`load_adapter`, `set_adapter`, `enable_adapters`, `disable_adapters`, `delete_adapter`) are bound
too, to surgeon's, so they act on surgeon's adapters instead of injecting peft layers on top.
transformers reads the flag in a few other places, as for its own adapters (Trainer then accepts
a quantized base model).

Resuming: Trainer loads a checkpoint of a model that is not a `PeftModel` through
`load_sharded_checkpoint`, which needs `model.safetensors.index.json` and then calls
`model.load_state_dict(shard, strict=False)`. So the adapter config's `save_pretrained` also
writes that index (naming the adapter's in-memory keys, all in `adapter_model.safetensors`), and a
`load_state_dict` pre-hook on the model maps PEFT's checkpoint keys (`base_model.model.…`) to
in-memory ones for the active adapter, checking every key and shape (a `CheckpointError` lists
every mismatch, so a resume never continues with random adapter weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from surgeon.errors import UserError
from surgeon.layer_kinds import is_transformers_model
from surgeon.peft_format import files
from surgeon.peft_format.checkpoint import PREFIX
from surgeon.runtime.state import require_state, state_of
from surgeon.runtime.wrappers import adapted_layers, is_wrapper

INDEX_NAME = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME
_FLAG = "_hf_peft_config_loaded"
_OPS = "_surgeon_hf_ops"
_HOOK = "_surgeon_hf_load_hook"
_GUARD = "_surgeon_hf_guard"  # on a transformers model inside an adapted non-transformers model
_BOUND = ("active_adapters", "get_adapter_state_dict", "set_adapter", "enable_adapters",
          "disable_adapters", "load_adapter", "delete_adapter")


class AdapterSaveError(UserError, ValueError):
    """transformers' `save_pretrained` cannot write this model as an adapter: its adapters were
    applied to a module around it, or it has none left; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Ops:
    """What the protocol needs from `surgeon.api` (passed in, so this module never imports it)."""

    # (model, adapter, state_dict or None) -> (adapter_config dict, PEFT-keyed tensors)
    adapter_files: Callable[[nn.Module, str, dict | None], tuple[dict, dict]]
    # (model, PEFT-keyed tensors, adapter) -> {model key: tensor}; raises CheckpointError
    match: Callable[[nn.Module, dict, str], dict]
    set_adapter: Callable[[nn.Module, object], None]
    enable: Callable[[nn.Module, bool], None]
    # surgeon.api.load_adapter and delete_adapter (model, ...)
    load: Callable[..., nn.Module]
    delete: Callable[[nn.Module, str], None]


class AdapterConfig:
    """`peft_config[name]` as transformers uses it: `save_pretrained(dir)` writes the adapter's
    `adapter_config.json` (and the index Trainer's resume reads); `to_dict()` gives the dict."""

    def __init__(self, host: nn.Module, name: str, ops: Ops) -> None:
        self._host, self._name, self._ops = host, name, ops

    def to_dict(self) -> dict:
        return self._ops.adapter_files(self._host, self._name, None)[0]

    @property
    def peft_type(self) -> str:
        return self.to_dict()["peft_type"]

    is_prompt_learning = False

    def save_pretrained(self, save_directory, **_: object) -> None:
        config, tensors = self._ops.adapter_files(self._host, self._name, None)
        folder = Path(save_directory)
        files.write_config(folder, config)
        keys = sorted(self._ops.match(self._host, tensors, self._name))
        index = {"metadata": {"format": "peft-adapter"},
                 "weight_map": dict.fromkeys(keys, files.WEIGHTS_NAME)}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"AdapterConfig({self._name!r}, {self.to_dict()!r})"


class AdapterConfigs(Mapping):
    """`model.peft_config`: {adapter name: AdapterConfig}, read live from surgeon's state, so
    `set_adapter`, `load_adapter` and `delete_adapter` never leave it stale."""

    def __init__(self, host: nn.Module, ops: Ops) -> None:
        self._host, self._ops = host, ops

    def __getitem__(self, name: str) -> AdapterConfig:
        if name not in require_state(self._host).names:
            raise KeyError(name)
        return AdapterConfig(self._host, name, self._ops)

    def __iter__(self) -> Iterator[str]:
        return iter(require_state(self._host).names)

    def __len__(self) -> int:
        return len(require_state(self._host).names)


# --------------------------------------------------------------------------- the bound methods


def _active_adapters(self: nn.Module) -> list[str]:
    return list(require_state(self).active)


def _get_adapter_state_dict(self: nn.Module, adapter_name: str | None = None,
                            state_dict: dict | None = None) -> dict:
    """The adapter's tensors under PEFT's keys without `base_model.model.` (transformers adds it)."""
    active = require_state(self).active
    if adapter_name is None and not active:
        raise AdapterSaveError("the model holds surgeon's layers but no adapter (all were deleted): "
                               "`surgeon.unload(model)` makes it plain, then save_pretrained writes it whole")
    name = adapter_name or active[0]
    _, tensors = self.__dict__[_OPS].adapter_files(self, name, state_dict)
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _set_adapter(self: nn.Module, adapter_name) -> None:
    self.__dict__[_OPS].set_adapter(self, adapter_name)


def _enable_adapters(self: nn.Module) -> None:
    self.__dict__[_OPS].enable(self, True)


def _disable_adapters(self: nn.Module) -> None:
    self.__dict__[_OPS].enable(self, False)


def _load_adapter(self: nn.Module, peft_model_id: str | None = None, adapter_name: str | None = None,
                  revision: str | None = None, is_trainable: bool = False) -> None:
    """transformers' `model.load_adapter(path_or_hub_id, name)`, as `surgeon.load_adapter` (not
    peft's layers, which would stack on surgeon's); its other options are not offered."""
    self.__dict__[_OPS].load(self, peft_model_id, adapter_name or "default", revision=revision,
                             is_trainable=is_trainable)


def _delete_adapter(self: nn.Module, adapter_names: str | list[str]) -> None:
    for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
        self.__dict__[_OPS].delete(self, name)


_METHODS = dict(zip(_BOUND, (_active_adapters, _get_adapter_state_dict, _set_adapter, _enable_adapters,
                             _disable_adapters, _load_adapter, _delete_adapter), strict=True))


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """Rename PEFT checkpoint keys (`base_model.model.…`, as in `adapter_model.safetensors`) to
    the active adapter's in-memory keys; a state dict in the model's own names passes through."""
    own = module.state_dict(keep_vars=True)
    peft = [k for k in state_dict if k.startswith(prefix + PREFIX) and k[len(prefix):] not in own]
    if not peft or state_of(module) is None:
        return
    tensors = {k[len(prefix):]: state_dict.pop(k) for k in peft}
    matched = module.__dict__[_OPS].match(module, tensors, require_state(module).active[0])
    state_dict.update({prefix + k: v for k, v in matched.items()})
    for _, layer in adapted_layers(module):
        layer.relower()  # lazy: DoRA norms and compiled graphs are rebuilt from the new values


# --------------------------------------------------------------------------- attach / detach


class _Bound:
    """One of these functions bound to its model, as a method would be, but picklable: a bound
    function pickles as `getattr(model, fn.__name__)`, which on loading finds no such attribute
    (or transformers' own method). This one pickles as its name and the model."""

    __slots__ = ("model", "name")

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name, self.model = name, model

    def __call__(self, *args: object, **kwargs: object) -> object:
        return _FUNCTIONS[self.name](self.model, *args, **kwargs)

    def __reduce__(self) -> tuple:
        return _Bound, (self.name, self.model)

    def __repr__(self) -> str:
        return f"<surgeon's {self.name} of {type(self.model).__name__}>"


def _refuse_nested_save(self: nn.Module, *_: object, **__: object) -> dict:
    path, outer = self.__dict__[_GUARD]
    raise AdapterSaveError(
        f"`{path}` is a transformers model inside the `{outer}` that surgeon adapted, so its own "
        "save_pretrained (which sentence-transformers' save and Trainer call) would write a full model "
        "whose adapted layers reload random. Apply the spec to the transformers model itself "
        f"(`surgeon.apply(spec, model.get_submodule({path!r}))`), or save with "
        "`surgeon.save_pretrained(model, path)`")


_FUNCTIONS: dict[str, Callable[..., object]] = {**_METHODS, "refuse_nested_save": _refuse_nested_save}


def _guard_inner(host: nn.Module) -> None:
    """On a non-transformers host, make the save_pretrained of each transformers model inside it
    that holds surgeon modules raise `AdapterSaveError` (through the protocol's
    `get_adapter_state_dict`), instead of writing in-memory names that reload random."""
    inside: list[str] = []
    for path, module in host.named_modules():
        if not path or any(path.startswith(p + ".") for p in inside) or not is_transformers_model(module):
            continue
        inside.append(path)
        if any(is_wrapper(m) for m in module.modules()):
            module.__dict__[_GUARD] = (path, type(host).__name__)
            module.__dict__[_FLAG] = True
            module.__dict__["get_adapter_state_dict"] = _Bound("refuse_nested_save", module)


def attach(host: nn.Module, ops: Ops) -> None:
    """Make a transformers model carrying surgeon adapters answer transformers' adapter
    protocol; on another module, guard the transformers models inside it (see `_guard_inner`).
    Again on an attached model: nothing new."""
    if not is_transformers_model(host):
        return _guard_inner(host)
    if _OPS in host.__dict__:
        return
    host.__dict__[_OPS] = ops
    host.__dict__[_FLAG] = True
    host.__dict__["peft_config"] = AdapterConfigs(host, ops)
    for name in _METHODS:
        host.__dict__[name] = _Bound(name, host)
    # the handle's id, not the handle: a deep copy of the model keeps the id (its hook dict is
    # copied) while a copied handle would still point at the original's hooks
    host.__dict__[_HOOK] = host.register_load_state_dict_pre_hook(_load_pre_hook).id


def detach(host: nn.Module) -> None:
    """Undo `attach`: the model is plain again and saves as a plain transformers model."""
    for module in host.modules():
        if module.__dict__.pop(_GUARD, None) is not None:
            module.__dict__.pop(_FLAG, None)
            module.__dict__.pop("get_adapter_state_dict", None)
    if host.__dict__.pop(_OPS, None) is None:
        return
    for name in (_FLAG, "peft_config", *_BOUND):
        host.__dict__.pop(name, None)
    host._load_state_dict_pre_hooks.pop(host.__dict__.pop(_HOOK), None)
