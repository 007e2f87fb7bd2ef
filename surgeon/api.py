"""The model-level API: apply a spec, save and load PEFT checkpoints, merge, switch, unload.

Every function takes the user's own model (or its torch.compile wrapper) and works in place;
the model stays the user's class, so `generate()`, Trainer and gradient checkpointing keep
working. Semantics follow PEFT 0.21's PeftModel/LoraModel methods of the same names.

    import surgeon
    surgeon.apply("adapter default = lora(r=8) { target q_proj, v_proj }", model)
    ...train...
    surgeon.save_pretrained(model, "out/")              # loads with peft.PeftModel.from_pretrained
    surgeon.load_adapter(model, "other_ckpt/", "other")  # a second adapter
    model(**batch, adapter_names=["default", "other"])  # one adapter per row (not via generate())
    with surgeon.disable_adapters(model): ...
    plain = surgeon.merge_and_unload(model)
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from surgeon import distributed
from surgeon.errors import UserError
from surgeon.integrations import hub
from surgeon.integrations import transformers as hf
from surgeon.lang.spec import Spec
from surgeon.peft_format import checkpoint as pf
from surgeon.peft_format import files
from surgeon.runtime import quantized
from surgeon.runtime.base_kinds import layer_weight
from surgeon.runtime.method import checkpoint_buffers
from surgeon.runtime.precision import HALF, autocast_adapters, warn_if_tied
from surgeon.runtime.routing import remove_hooks, route_rows
from surgeon.runtime.saved import SavedModule
from surgeon.runtime.state import State, require_state, set_state, unwrap
from surgeon.runtime.tokens import TokenWrapper
from surgeon.runtime.transaction import Transaction, commit, discard, prepare, rename_adapter
from surgeon.runtime.wrappers import activate, adapted_layers, wrappers, wrappers_of

__all__ = [
    "active_adapters", "adapter_rows", "apply", "delete_adapter", "disable_adapters", "load_adapter", "merge",
    "merge_and_unload", "save_pretrained", "set_adapter", "unload", "unmerge",
]


class AdapterArgumentError(UserError, ValueError):
    """Adapter names passed to an API call that the model does not have, or repeats."""


def _names(state: State, value: str | Sequence[str], what: str) -> tuple[str, ...]:
    """One name or several as a tuple (a str is one name, never its letters), each known and
    named once (a repeated adapter would be applied twice)."""
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(n, str) for n in names):
        raise AdapterArgumentError(f"{what} takes an adapter name or a list of them, not {value!r}")
    if len(set(names)) != len(names):
        raise AdapterArgumentError(f"{what} names an adapter twice: {list(names)}")
    if unknown := [n for n in names if n not in state.names]:
        raise AdapterArgumentError(f"{what}: adapter {unknown[0]!r} is not in the model; it has "
                                   f"{', '.join(state.names) or 'none'}")
    return names


def _as_spec(spec) -> Spec:
    if isinstance(spec, Spec):
        return spec
    from surgeon.lang.parser import load_spec

    return load_spec(spec)


def apply(spec: Spec | str | os.PathLike, model: nn.Module, *, example_inputs=None,
          adapter_name: str | None = None) -> nn.Module:
    """Adapt `model` in place as `spec` says, as one transaction; returns the same model.

    Every adapted layer is built and validated before the first module is swapped; any error
    leaves the model exactly as it was. Afterwards only adapter parameters (plus biases per
    `bias=all|lora_only`, and modules to save) require grad. On a model that already has
    adapters, the spec's adapters are added, inactive (as PEFT's add_adapter); the first
    adapter applied to a plain model is the active one.

    Args:
        spec: a Spec, `.peft` text, or a path to a `.peft` file.
        model: the host model.
        example_inputs: inputs for graph capture, only needed by role selectors on models
            whose inputs cannot be synthesised.
        adapter_name: rename the spec's (single) adapter.

    Example:
        >>> surgeon.apply("adapter default = lora(r=8) { target @attn.q, @attn.v }", model)
    """
    if adapter_name is not None:
        files.check_adapter_name(adapter_name)  # it becomes a folder when saved
    spec = rename_adapter(_as_spec(spec), adapter_name)
    host = unwrap(model)
    distributed.refuse_trainable(host, "`surgeon.apply`")
    prepared = prepare(spec, host, example_inputs=example_inputs)
    tx = Transaction(host)
    try:
        commit(host, prepared, tx)
        autocast_adapters(host, [a.name for a in spec.adapters])
        quantized.keep_trainable(host)  # bitsandbytes 4-bit: eval must not cut gradients
    except BaseException:
        tx.rollback()
        discard(prepared)
        raise
    hf.attach(host, _HF_OPS)
    return model


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The names of the active adapters."""
    return require_state(model).active


# --------------------------------------------------------------------------- checkpoints


def _layout(model: nn.Module, state: State) -> pf.Layout:
    host = unwrap(model)
    adapted = tuple(n for n, _ in adapted_layers(host))
    saved = tuple((n, m.adapters) for n, m in wrappers_of(host, SavedModule))
    embeddings: tuple[str, ...] = ()
    if callable(getattr(host, "get_input_embeddings", None)) and hasattr(host, "config"):
        io = _io_embeddings(host)
        embeddings = tuple(n for n, m in adapted_layers(host) if any(m is e for e in io))
    tokens = tuple((n, m.adapters) for n, m in wrappers_of(host, TokenWrapper) if m.token_adapter.tied is None)
    return pf.Layout(adapted, saved, state.names, embeddings, tokens)


def _with_buffers(host: nn.Module, tensors: dict) -> dict:
    """`tensors` (the host's state_dict) plus the buffers PEFT saves although its state_dict
    lacks them (a method's `checkpoint_buffers`, SHiRA's indices), keyed as persistent ones."""
    extra = {f"{path}.{name}.{adapter}": tensor for path, layer in adapted_layers(host)
             for name in checkpoint_buffers(layer.method)
             for adapter, tensor in layer._modules[name]._buffers.items()}
    return {**tensors, **extra} if extra else tensors


def _io_embeddings(host: nn.Module) -> list[nn.Module]:
    """The input and output embeddings of a transformers model; composite models (CLIP under
    transformers 5) raise NotImplementedError for them, which means none to save."""
    try:
        return [host.get_input_embeddings(), host.get_output_embeddings()]
    except NotImplementedError:
        return []


def _config(model: nn.Module, installed) -> dict:
    from surgeon.peft_format.config import peft_config_for_sites

    host = unwrap(model)
    name_or_path = host.__dict__.get("name_or_path") or getattr(host, "name_or_path", None) or None
    config = peft_config_for_sites(installed.adapter, installed.sites, base_model_name_or_path=name_or_path)
    config["inference_mode"] = True  # PEFT writes every saved config in inference mode
    if config.get("task_type") is None and "auto_mapping" in config:
        config["auto_mapping"] = {"base_model_class": type(host).__name__,
                                  "parent_library": type(host).__module__}
    return config


def save_pretrained(model: nn.Module, path: str | os.PathLike, *,
                    selected_adapters: Sequence[str] | None = None,
                    is_main_process: bool | None = None) -> None:
    """Write the adapters as a PEFT checkpoint: `adapter_config.json`, `adapter_model.safetensors`,
    a README.md; the default adapter at `path`, each other one in `path/<name>/` (as PEFT 0.21).

    Written to a temporary folder and renamed into place, so a failure leaves `path` as it was.
    The result loads with `peft.PeftModel.from_pretrained(base_model, path)`.

    Under torch.distributed only the main process writes (`is_main_process`, default: rank 0).
    On a sharded model (FSDP2) every rank must call this: the adapter tensors alone are
    gathered to full size, then rank 0 writes and the others wait for it (`surgeon.distributed`).
    """
    state = require_state(model)
    names = list(state.names if selected_adapters is None else
                 _names(state, selected_adapters, "selected_adapters"))
    layout = _layout(model, state)
    tensors = _with_buffers(unwrap(model), unwrap(model).state_dict())
    out = {}
    for name in names:
        config = _config(model, state.get(name))
        out[name] = (config, distributed.gather(pf.adapter_state_dict(tensors, layout, name, config)))
    card = files.model_card({n: c for n, (c, _) in out.items()})
    sharded = distributed.is_sharded(unwrap(model).parameters())  # then every rank is here
    distributed.on_main_process(lambda: files.write_checkpoint(path, out, card), is_main_process,
                                collective=sharded)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *,
                 allow_pickle: bool = False, is_trainable: bool = False,
                 revision: str | None = None) -> nn.Module:
    """Load a PEFT checkpoint folder (written by PEFT or surgeon) as adapter `adapter_name`.

    The folder's adapter_config.json is decompiled into a spec and applied (to a plain model,
    or added to an adapted one), then every checkpoint key and shape is checked against the
    model; all mismatches are reported in one `CheckpointError`, and any error leaves the model
    unchanged. `.bin` pickles load only with `allow_pickle=True` (then `weights_only=True`).
    Like PEFT, the adapter is frozen unless `is_trainable=True`; it is active on a plain model.
    `path` may also be a Hub id (`user/repo`, at `revision`), fetched through huggingface_hub's
    cache and offline-aware (`surgeon.integrations.hub`).
    """
    from surgeon.peft_format.config import ConversionError, spec_from_peft_config

    files.check_adapter_name(adapter_name)  # it becomes a folder when saved
    path = hub.adapter_folder(path, revision=revision)  # a folder, or a Hub id `user/repo`
    config, tensors = files.read_checkpoint(path, allow_pickle=allow_pickle)
    # as PeftModel.from_pretrained: the saved inference_mode (PEFT writes true) yields to the caller
    config = {**config, "inference_mode": not is_trainable}
    try:
        spec = Spec((spec_from_peft_config(config, name=adapter_name),))
    except ConversionError as error:  # name the file: `r` must be a positive integer; got -4
        raise files.CheckpointError(f"`{files.adapter_config_path(path)}`: {error}") from None
    host = unwrap(model)
    if is_trainable:
        distributed.refuse_trainable(host, "Loading a trainable adapter")
    distributed.reshard(host)  # FSDP2: copy into the shards, not into a gathered copy
    prepared = prepare(spec, host)
    managed = {id(p) for p in host.parameters()}  # on a sharded model: the engine's
    tx = Transaction(host)
    try:
        state = commit(host, prepared, tx, trainable=is_trainable)
        autocast_adapters(host, [adapter_name])
        distributed.gather_new(host, managed)  # sharded copies the engine would never gather
        layout, current = _layout(host, state), _with_buffers(host, host.state_dict(keep_vars=True))
        matched = pf.match_checkpoint(tensors, current, layout, adapter_name)
        owned = set(pf.load_key_map(current, layout, adapter_name).values())
        _copy_in(host, matched, owned)
    except BaseException:
        tx.rollback()
        discard(prepared)
        raise
    hf.attach(host, _HF_OPS)
    return model


@torch.no_grad()
def _copy_in(host: nn.Module, matched: dict[str, torch.Tensor], owned: set[str]) -> None:
    """Copy checkpoint tensors in; base tensors (trained biases) are restored on failure."""
    targets = _with_buffers(host, host.state_dict(keep_vars=True))
    backup = {k: targets[k].detach().clone() for k in matched if k not in owned}  # base tensors
    try:
        for key, tensor in matched.items():
            targets[key].copy_(distributed.place(targets[key], tensor))  # a DTensor takes its shard
    except BaseException:
        for key, old in backup.items():
            targets[key].copy_(old)
        raise
    for _, layer in adapted_layers(host):
        layer.relower()  # DoRA norms and other caches read the new values


# --------------------------------------------------------------------------- merge / unload


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
    """Fold the active (or named) adapters into the base weights (PEFT's merge_adapter)."""
    _merge(model, adapter_names, safe_merge=safe_merge, keep_exact=True)


# Half-precision base weights as they were before their layer's first merge (see `_merge`).
_EXACT: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def _merge(model: nn.Module, adapter_names, *, safe_merge: bool, keep_exact: bool) -> None:
    """Merge; with `keep_exact`, a fp16/bf16 base weight is kept as it was so that `unmerge`
    restores it bit for bit (subtracting the delta again drifts by rounding: PEFT's 20 cycles
    change most weights). Costs one copy of each merged half-precision weight while merged;
    merge_and_unload, which never unmerges, skips it."""
    state = require_state(model)
    wanted = state.active if adapter_names is None else _names(state, adapter_names, "merge")
    distributed.reshard(model)  # FSDP2: fold into the shards, not a gathered copy about to go
    todo = [(path, layer) for path, layer in adapted_layers(model) if any(a in layer.sites for a in wanted)]
    warn_if_tied(model, todo)
    before = {id(layer): list(layer.merged_adapters) for _, layer in todo}
    for _, layer in todo:
        if layer.merged_adapters != before[id(layer)]:
            continue  # merged by its parent (an MHA merges its nested out_proj layer itself)
        weight = layer_weight(layer)
        if keep_exact and not layer.merged and weight.dtype in HALF and not distributed.is_dtensor(weight):
            _EXACT[layer] = weight.detach().clone()
        layer.merge([a for a in wanted if a in layer.sites], safe_merge=safe_merge)


def unmerge(model: nn.Module) -> None:
    """Restore the base weights of every merged layer (PEFT's unmerge_adapter)."""
    require_state(model)
    distributed.reshard(model)
    for _, layer in adapted_layers(model):
        if layer.merged:
            layer.unmerge()
            exact = _EXACT.pop(layer, None)
            if exact is not None and exact.shape == layer_weight(layer).shape:
                with torch.no_grad():
                    layer_weight(layer).copy_(exact)  # bit for bit, not weight + delta - delta
                layer.method.clear_caches(layer)


def _unwrap_all(model: nn.Module, *, merge_first: bool, adapter_names, safe_merge: bool) -> nn.Module:
    host = unwrap(model)
    state = require_state(host)
    merged: tuple[str, ...] = ()
    if merge_first:
        _merge(host, adapter_names, safe_merge=safe_merge, keep_exact=False)
        merged = state.active if adapter_names is None else _names(state, adapter_names, "merge")
    # innermost first: a wrapper's replacement may sit inside another wrapper's original
    for path, wrapper in reversed(list(wrappers(host))):
        _replace(host, path, wrapper.unloaded(merged))
    remove_hooks(host)
    set_state(host, None)
    hf.detach(host)
    return model


def _replace(host: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(host.get_submodule(parent_path), name, module)


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None, *,
                     safe_merge: bool = False) -> nn.Module:
    """Merge the active (or named) adapters and return the plain model (no surgeon modules)."""
    return _unwrap_all(model, merge_first=True, adapter_names=adapter_names, safe_merge=safe_merge)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging and return the plain model (earlier merges stay)."""
    return _unwrap_all(model, merge_first=False, adapter_names=None, safe_merge=False)


# --------------------------------------------------------------------------- switching


def set_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> None:
    """Activate one adapter or several (their outputs add up); only they require grad."""
    state = require_state(model)
    names = _names(state, name_or_names, "set_adapter")
    new = State(state.adapters, names, state.disabled)
    activate(model, new)
    set_state(model, new)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged first)."""
    state = require_state(model)
    if state.disabled:
        yield model
        return
    _enable(model, state, False)
    try:
        yield model
    finally:
        _enable(model, require_state(model), True)


@contextmanager
def adapter_rows(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Route batch row i through adapter `adapter_names[i]` ("__base__": none) for every forward
    inside the block: the mixed-adapter batch for callers that cannot pass `adapter_names=` to
    `model(...)`, such as `model.generate(...)`. The rows must match the batch the model sees
    (generate's beams and num_return_sequences multiply it). Eval mode only, as in PEFT.
    """
    require_state(model)
    route_rows(unwrap(model), list(adapter_names))
    try:
        yield model
    finally:
        route_rows(unwrap(model), None)


def _enable(model: nn.Module, state: State, enabled: bool) -> None:
    for _, wrapper in wrappers(model):
        wrapper.enable_adapters(enabled)
    new = State(state.adapters, state.active, not enabled)
    set_state(model, new)
    if enabled:
        activate(model, new)  # re-applies which copies and adapters train


def delete_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` everywhere; if it was active, PEFT's rule picks the next active."""
    state = require_state(model)
    if not isinstance(name, str):  # one name: PEFT's delete_adapter takes a str
        raise AdapterArgumentError(f"delete_adapter takes one adapter name, not {name!r}")
    _names(state, name, "delete_adapter")
    for path, layer in adapted_layers(model):
        if name in layer.merged_adapters:
            raise ValueError(f"adapter `{name}` is merged into `{path}`; unmerge it first")
    rest = tuple(a for a in state.adapters if a.name != name)
    # PEFT: every adapter layer picks its own next active (`AdaptedLayer.delete_adapter`), so
    # layers may differ; the model's record (and the saved modules' and token rows') is the first
    # layer's. PEFT takes it even from a layer left with no adapter (a stale, empty record while
    # its other layers still run one); surgeon takes the first layer that still holds one.
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:
        layer.delete_adapter(name)
    kept = tuple(a for a in state.active if a != name) or tuple(sorted(a.name for a in rest))[:1]
    active = next((tuple(layer.active) for layer in layers if layer.sites), kept)
    new = State(rest, active, state.disabled)
    for _, wrapper in wrappers(model):
        if wrapper not in layers:
            wrapper.set_active(new.active, new.frozen)
            wrapper.delete_adapter(name)
    set_state(model, new)


# --------------------------------------------------------------------------- transformers' protocol


def _adapter_files(model: nn.Module, name: str, state_dict: dict | None = None) -> tuple[dict, dict]:
    """(adapter_config dict, PEFT-keyed tensors) of adapter `name`, from `state_dict` (a caller's,
    such as Trainer's) or the model's own."""
    state = require_state(model)
    config = _config(model, state.get(name))
    tensors = _with_buffers(unwrap(model), unwrap(model).state_dict() if state_dict is None else state_dict)
    return config, pf.adapter_state_dict(tensors, _layout(model, state), name, config)


def _match(model: nn.Module, tensors: dict, name: str) -> dict:
    """{model key: tensor} for a PEFT-keyed adapter checkpoint; CheckpointError on any misfit."""
    host = unwrap(model)
    layout = _layout(host, require_state(host))
    return pf.match_checkpoint(tensors, _with_buffers(host, host.state_dict(keep_vars=True)), layout, name)


def _enable_all(model: nn.Module, enabled: bool) -> None:
    state = require_state(model)
    if state.disabled == enabled:
        _enable(model, state, enabled)


# what `surgeon.integrations.transformers` binds on a transformers model (see its docstring)
_HF_OPS = hf.Ops(_adapter_files, _match, set_adapter, _enable_all, load_adapter, delete_adapter)
