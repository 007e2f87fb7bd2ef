"""PEFT's checkpoint keys: the one module that knows key prefixes and key mangling.

The folder itself (file names, where each adapter sits, atomic writes) is `files.py`. Checkpoint
keys are the host model's state_dict keys with the prefix `base_model.model.` and the adapter
name removed (`q_proj.lora_A.default.weight` ->
`base_model.model.q_proj.lora_A.weight`); DoRA's magnitude drops its `.weight`; a module to save
is stored under its own name (`score.modules_to_save.default.weight` -> `...score.weight`).

Surgeon's in-memory names equal PEFT's, so the key mapping here is PEFT 0.21's
(`get_peft_model_state_dict`, `_remove_adapter_name_from_state_dict_key`,
`_remap_adapter_state_dict_for_load`) written as pure functions of state_dict keys plus a
`Layout` that says which module paths are adapted layers and which are saved-module wrappers.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgeon import methods
from surgeon.lang.matching import full_matches
from surgeon.peft_format.files import CheckpointError

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."

# In-memory children of a saved-module wrapper (PEFT's ModulesToSaveWrapper names).
TOKENS = "token_adapter.trainable_tokens_delta"  # a token wrapper's rows, per adapter
ORIGINAL = "original_module"
COPIES = "modules_to_save"
# PEFT's EMBEDDING_LAYER_NAMES: targeting one of these saves the embedding's base weight too.
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where adapter state lives in a host model: what the key mapping needs to know of modules."""

    adapted: tuple[str, ...]  # paths of adapted layers (each holds `base_layer` + per-adapter dicts)
    saved: tuple[tuple[str, tuple[str, ...]], ...]  # (wrapper path, adapters that have a copy there)
    adapters: tuple[str, ...]  # every adapter name in the model
    embeddings: tuple[str, ...] = ()  # adapted paths that are the host's input/output embeddings
    tokens: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (token wrapper path, adapters with rows)


# --------------------------------------------------------------------------- key mapping


def strip_adapter_name(key: str, adapter: str) -> str:
    """`x.lora_A.default.weight` -> `x.lora_A.weight`; `x.lora_embedding_A.default` -> `x.lora_embedding_A`.

    PEFT's `_remove_adapter_name_from_state_dict_key`: a pure function of the key, so it defines
    the correspondence in both directions.
    """
    if "." not in key:
        return key
    if key.endswith(f".{adapter}"):
        return key.removesuffix(f".{adapter}")
    head, _, last = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter}") + r"$", "", head)
    return f"{head}.{last}"


def checkpoint_key(model_key: str, adapter: str) -> str:
    """The checkpoint key of one adapter-owned model key (prefix added, adapter name removed).

    A method's shared container (`MethodConfig.shared_keys`, VeRA's `vera_A`) appears under
    every layer in the state_dict; PEFT saves it once, as `base_model.<name>`."""
    for name in _shared_keys():
        if model_key == f"{name}.{adapter}" or model_key.endswith(f".{name}.{adapter}"):
            return f"base_model.{name}"
    if any(model_key.endswith(f"{name}.{adapter}.weight") for name in _bare_keys()):
        model_key = model_key.removesuffix(".weight")
    return PREFIX + strip_adapter_name(model_key, adapter)


def _bare_keys() -> tuple[str, ...]:
    """Every method's containers whose `.weight` PEFT's keys drop (`MethodConfig.bare_keys`)."""
    return tuple(key for name in methods.names() for key in methods.config_of(name).bare_keys)


def _shared_keys() -> tuple[str, ...]:
    """Every method's model-level containers (`MethodConfig.shared_keys`)."""
    return tuple(key for name in methods.names() for key in methods.config_of(name).shared_keys)


def _codecs() -> dict[str, Any]:
    """Every method's checkpoint codec (`MethodConfig.checkpoint_codec`) by peft_type."""
    out = {}
    for config in map(methods.config_of, methods.names()):
        if config.checkpoint_codec:
            module, _, attribute = config.checkpoint_codec.partition(":")
            out[config.peft_type] = getattr(importlib.import_module(module), attribute)
    return out


def _encoded(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """PEFT's checkpoint tensors of a method that re-encodes them (VB-LoRA's top-k logits)."""
    codec = _codecs().get(config.get("peft_type"))
    return tensors if codec is None else codec.encode(tensors, config)


def _decoded(tensors: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
             adapter: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors in state_dict form: each codec decodes what it recognises."""
    for codec in _codecs().values():
        tensors = codec.decode(tensors, model_state, adapter)
    return tensors


def _under(key: str, path: str) -> str | None:
    """The rest of `key` below module `path`, or None when the key is not under it."""
    if not path:
        return key
    return key[len(path) + 1:] if key.startswith(path + ".") else None


def _adapter_keys(keys, layout: Layout, adapter: str | None) -> list[str]:
    """Keys owned by adapted layers (all but `base_layer`), restricted to `adapter` when given."""
    owned = []
    for path in layout.adapted:
        for key in keys:
            rest = _under(key, path)
            if rest is None or rest.startswith("base_layer."):
                continue
            parts = rest.split(".")
            if adapter is None or (len(parts) >= 2 and parts[1] == adapter):
                owned.append(key)
    return owned


def _bias_keys(keys, layout: Layout, bias: str) -> list[str]:
    """Base biases an adapter trains and saves: every bias ("all") or adapted layers' ("lora_only")."""
    if bias == "all":
        return [k for k in keys if k == "bias" or k.endswith(".bias")]
    if bias.endswith("_only"):
        wanted = {f"{p}.base_layer.bias" if p else "base_layer.bias" for p in layout.adapted}
        return [k for k in keys if k in wanted]
    return []


def _embedding_keys(keys, layout: Layout, config: dict) -> list[str]:
    """PEFT's `save_embedding_layers="auto"`: a targeted input/output embedding is saved whole.

    PEFT decides from the config's `target_modules` (a list naming `embed_tokens`/`lm_head`, or a
    regex matching a module so named) and skips it when trainable tokens are used.
    """
    target = config.get("target_modules")
    if config.get("trainable_token_indices") is not None or not target:
        return []
    if isinstance(target, str):
        named = [p for p in layout.adapted if re.match(rf"(.*\.)?({'|'.join(_EMBEDDING_NAMES)})$", p)]
        targeted = target != "all-linear" and bool(full_matches(target, named))
    else:
        targeted = any(n in target for n in _EMBEDDING_NAMES)
    if not targeted:
        return []
    prefixes = tuple(f"{p}.base_layer." for p in layout.embeddings)
    return [k for k in keys if k.startswith(prefixes)] if prefixes else []


def _saved_keys(state_dict, layout: Layout, adapter: str) -> dict[str, str]:
    """Checkpoint-relative key -> model key of every module this adapter saves whole."""
    out = {}
    for path, owners in layout.saved:
        if adapter not in owners:
            continue
        inner = f"{path}.{COPIES}.{adapter}."
        for key in state_dict:
            if key.startswith(inner):
                out[f"{path}.{key[len(inner):]}"] = key
    return out


def _token_keys(state_dict, layout: Layout, adapter: str) -> list[str]:
    """Model keys of `adapter`'s trainable token rows (PEFT's TrainableTokensWrapper saves only
    `<path>.token_adapter.trainable_tokens_delta`; a tied wrapper is not listed in the layout)."""
    keys = [f"{path}.{TOKENS}.{adapter}" for path, owners in layout.tokens if adapter in owners]
    return [k for k in keys if k in state_dict]


def adapter_state_dict(state_dict: dict[str, torch.Tensor], layout: Layout, adapter: str,
                       config: dict) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `adapter` (its PEFT `config` dict decides biases and embeddings).

    Exactly the keys PEFT 0.21's `get_peft_model_state_dict` writes for the same model.
    """
    others = [a for a in layout.adapters if a != adapter]
    kept = {k: v for k, v in state_dict.items()
            if not any(f".{o}." in k or k.endswith(f".{o}") for o in others)}
    chosen = {k: kept[k] for k in _adapter_keys(kept, layout, None)}
    chosen.update({k: kept[k] for k in _bias_keys(kept, layout, config.get("bias", "none"))})
    chosen.update({k: kept[k] for k in _embedding_keys(kept, layout, config)})
    chosen.update({k: kept[k] for k in _token_keys(kept, layout, adapter)})
    out = {checkpoint_key(k, adapter): v for k, v in chosen.items()}
    for rel, key in _saved_keys(kept, layout, adapter).items():
        out[PREFIX + strip_adapter_name(rel, adapter)] = kept[key]
    return _encoded(out, config)


def load_key_map(state_dict: dict[str, torch.Tensor], layout: Layout, adapter: str) -> dict[str, str]:
    """Checkpoint key -> model key for everything `adapter` expects to find in its checkpoint."""
    mapping = {checkpoint_key(k, adapter): k for k in _adapter_keys(state_dict, layout, adapter)}
    mapping.update({PREFIX + rel: key for rel, key in _saved_keys(state_dict, layout, adapter).items()})
    mapping.update({checkpoint_key(k, adapter): k for k in _token_keys(state_dict, layout, adapter)})
    return mapping


def match_checkpoint(tensors: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
                     layout: Layout, adapter: str) -> dict[str, torch.Tensor]:
    """Model key -> tensor for a checkpoint; raise one `CheckpointError` listing every mismatch.

    Keys the adapter owns must all be present; other keys (trained biases, saved embeddings)
    must name an existing model tensor. Every shape must agree.
    """
    tensors = _decoded(tensors, model_state, adapter)
    expected = load_key_map(model_state, layout, adapter)
    # PEFT's bias="all" also writes each saved copy's bias without the adapter name
    # (`score.modules_to_save.bias`); it loads nowhere in PEFT either, and `score.bias` has it.
    redundant = tuple(f"{PREFIX}{path}.{COPIES}." for path, _ in layout.saved)
    problems, out = [], {}
    for ckpt_key, tensor in tensors.items():
        if ckpt_key not in expected and redundant and ckpt_key.startswith(redundant):
            continue
        model_key = expected.get(ckpt_key) or ckpt_key.removeprefix(PREFIX)
        if model_key not in model_state:
            problems.append(f"unexpected key `{ckpt_key}`: the model has no `{model_key}`")
        elif tuple(model_state[model_key].shape) != tuple(tensor.shape):
            problems.append(f"shape mismatch for `{ckpt_key}`: checkpoint {tuple(tensor.shape)}, "
                            f"model {tuple(model_state[model_key].shape)}")
        else:
            out[model_key] = tensor
    problems += [f"missing key `{k}` (model `{v}`)" for k, v in expected.items() if k not in tensors]
    if problems:
        lines = "\n".join(f"  - {p}" for p in sorted(problems))
        raise CheckpointError(f"checkpoint for adapter `{adapter}` does not fit the model "
                              f"({len(problems)} problem(s)):\n{lines}")
    return out
