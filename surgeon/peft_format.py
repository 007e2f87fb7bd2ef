"""PEFT's checkpoint layout: the one module that knows file names, key prefixes and key mangling.

A PEFT adapter checkpoint is a folder with `adapter_config.json` and `adapter_model.safetensors`
(or a pickled `adapter_model.bin`). The default adapter sits at the top, every other adapter in
`<path>/<name>/`. Checkpoint keys are the host model's state_dict keys with the prefix
`base_model.model.` and the adapter name removed (`q_proj.lora_A.default.weight` ->
`base_model.model.q_proj.lora_A.weight`); DoRA's magnitude drops its `.weight`; a module to save
is stored under its own name (`score.modules_to_save.default.weight` -> `...score.weight`).

Surgeon's in-memory names equal PEFT's, so the key mapping here is PEFT 0.21's
(`get_peft_model_state_dict`, `_remove_adapter_name_from_state_dict_key`,
`_remap_adapter_state_dict_for_load`) written as pure functions of state_dict keys plus a
`Layout` that says which module paths are adapted layers and which are saved-module wrappers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
README_NAME = "README.md"
DEFAULT = "default"

# In-memory children of a saved-module wrapper (PEFT's ModulesToSaveWrapper names).
TOKENS = "token_adapter.trainable_tokens_delta"  # a token wrapper's rows, per adapter
ORIGINAL = "original_module"
COPIES = "modules_to_save"
_DORA = "lora_magnitude_vector"
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


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every mismatch at once."""


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
    """The checkpoint key of one adapter-owned model key (prefix added, adapter name removed)."""
    dora = f"{_DORA}.{adapter}.weight"
    if model_key.endswith(dora):
        model_key = model_key.removesuffix(".weight")
    return PREFIX + strip_adapter_name(model_key, adapter)


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
        targeted = target != "all-linear" and any(re.fullmatch(target, p) for p in named)
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
    return out


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


# --------------------------------------------------------------------------- files


def adapter_dir(path: str | os.PathLike, adapter: str) -> Path:
    """Where PEFT keeps `adapter` below a save path: the path itself for "default"."""
    return Path(path) if adapter == DEFAULT else Path(path) / adapter


def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, checkpoint tensors) of one adapter folder.

    Safetensors is read when present; a pickled `adapter_model.bin` only with `allow_pickle=True`,
    and then with `torch.load(weights_only=True)` so it cannot run code.
    """
    folder = Path(path)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no `{CONFIG_NAME}` in `{folder}`: not a PEFT adapter checkpoint")
    config = json.loads(config_file.read_text())
    if (folder / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        return config, load_file(folder / WEIGHTS_NAME)
    if (folder / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise CheckpointError(f"`{folder / PICKLE_NAME}` is a pickle; pass allow_pickle=True to load "
                                  "it (read with torch.load(weights_only=True))")
        return config, torch.load(folder / PICKLE_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no `{WEIGHTS_NAME}` (or `{PICKLE_NAME}`) in `{folder}`")


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    seen: set[int] = set()
    plain = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        storage = t.untyped_storage().data_ptr()
        # safetensors refuses aliased tensors; PEFT clones shared ones the same way
        plain[key] = t.clone() if storage in seen or not t.is_contiguous() else t
        seen.add(storage)
    save_file(plain, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def write_checkpoint(path: str | os.PathLike, adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]],
                     readme: str) -> None:
    """Write adapters {name: (config, tensors)} as PEFT does, all-or-nothing.

    Everything is written into a temporary sibling folder first. A new `path` is then renamed into
    place in one step; into an existing folder each file is moved with `os.replace`, so a reader
    never sees a half-written file and a failure while writing leaves `path` untouched.
    """
    target = Path(path)
    if target.is_file():
        raise NotADirectoryError(f"`{target}` is a file; save_pretrained needs a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is an ordinary folder
        (tmp / README_NAME).write_text(readme)
        for name, (config, tensors) in adapters.items():
            _write_adapter(adapter_dir(tmp, name), config, tensors)
        if not target.exists():
            os.rename(tmp, target)
            return
        for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
            dst = target / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_card(adapters: dict[str, dict]) -> str:
    """A short README.md in the shape of PEFT's model card (front matter PEFT and the Hub read)."""
    base = next((c.get("base_model_name_or_path") for c in adapters.values()
                 if c.get("base_model_name_or_path")), None)
    front = ["---", "library_name: peft"] + ([f"base_model: {base}"] if base else []) + ["---", ""]
    rows = [f"| `{name}` | {c.get('peft_type', '?')} | {c.get('r', '-')} | {c.get('lora_alpha', '-')} |"
            for name, c in adapters.items()]
    body = ["# Adapter", "", "Written by surgeon in PEFT's format; load it with "
            "`peft.PeftModel.from_pretrained(base_model, path)`.", "",
            "| adapter | method | r | alpha |", "|---|---|---|---|", *rows, "",
            "### Framework versions", "", "- PEFT-compatible format (PEFT 0.21 layout)", ""]
    return "\n".join(front + body)
