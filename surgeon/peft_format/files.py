"""PEFT's checkpoint folder on disk: file names, where each adapter lives, and writes that land
whole or not at all.

    <path>/adapter_config.json          the "default" adapter
    <path>/adapter_model.safetensors    (or a pickled adapter_model.bin, read only on request)
    <path>/README.md                    a model card
    <path>/<name>/adapter_config.json   every other adapter, in a subfolder named after it

Writes go through `atomic_dir`: everything is built in a temporary sibling of the target folder
and renamed into place at the end, so an error (or Ctrl-C) never leaves a half-written checkpoint
and a reader never sees one. The API (`save_pretrained`) and every CLI command that writes a
folder share it. Torch is imported only by the functions that read or write tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.errors import UserError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
README_NAME = "README.md"
DEFAULT = "default"  # the adapter that sits at the top of the folder


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read as asked or does not fit the model; the message says why
    (for a misfit, every mismatch at once)."""


# --------------------------------------------------------------------------- layout


def adapter_dir(path: str | os.PathLike, adapter: str) -> Path:
    """Where PEFT keeps `adapter` below a save path: the path itself for "default"."""
    return Path(path) if adapter == DEFAULT else Path(path) / adapter


def adapters_in(folder: str | os.PathLike) -> dict[str, Path]:
    """{adapter name: its folder} for every adapter a checkpoint folder holds, "default" first
    and the subfolders by name; {} when it holds none (or is no folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {DEFAULT: folder} if (folder / CONFIG_NAME).is_file() else {}
    for sub in sorted(p for p in folder.iterdir() if (p / CONFIG_NAME).is_file()):
        found[sub.name] = sub
    return found


def write_config(folder: Path, config: dict) -> None:
    """`adapter_config.json` as PEFT writes it (indented, keys sorted)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- checkpoints


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
        import torch

        return config, torch.load(folder / PICKLE_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no `{WEIGHTS_NAME}` (or `{PICKLE_NAME}`) in `{folder}`")


def write_checkpoint(path: str | os.PathLike, adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]],
                     readme: str) -> None:
    """Write adapters {name: (config, tensors)} as PEFT does, all-or-nothing.

    Into an existing folder each file is replaced and other files stay, as with PEFT's
    `save_pretrained`; see `atomic_dir`.
    """
    target = Path(path)
    if target.is_file():
        raise NotADirectoryError(f"`{target}` is a file; save_pretrained needs a directory")
    with atomic_dir(target, replace=False) as tmp:
        (tmp / README_NAME).write_text(readme)
        for name, (config, tensors) in adapters.items():
            _write_adapter(adapter_dir(tmp, name), config, tensors)


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    write_config(folder, config)
    seen: set[int] = set()
    plain = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        storage = t.untyped_storage().data_ptr()
        # safetensors refuses aliased tensors; PEFT clones shared ones the same way
        plain[key] = t.clone() if storage in seen or not t.is_contiguous() else t
        seen.add(storage)
    save_file(plain, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def model_card(adapters: dict[str, dict]) -> str:
    """A short README.md in the shape of PEFT's model card (front matter PEFT and the Hub read)."""
    base = next((c.get("base_model_name_or_path") for c in adapters.values()
                 if c.get("base_model_name_or_path")), None)
    front = ["---", "library_name: peft"] + ([f"base_model: {base}"] if base else []) + ["---", ""]
    rows = [f"| `{name}` | {c.get('peft_type', '?')} | {c.get('r', '-')} | {c.get('lora_alpha', '-')} |"
            for name, c in adapters.items()]
    body = ["# Adapter", "", ("Written by surgeon in PEFT's format; load it with "
                             "`peft.PeftModel.from_pretrained(base_model, path)`."), "",
            "| adapter | method | r | alpha |", "|---|---|---|---|", *rows, "",
            "### Framework versions", "", "- PEFT-compatible format (PEFT 0.21 layout)", ""]
    return "\n".join(front + body)


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_dir(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling folder that becomes `target` when the block succeeds.

    A new `target` is renamed into place in one step. An existing one is swapped out whole when
    `replace` (a command's `--force`), else each new file is moved into it with `os.replace` (so
    other files stay). On failure the temporary folder goes, and so do the parents it created.
    The folder has ordinary permissions (what `mkdir` gives under the umask), not mkdtemp's 0700.

    Example:
        with atomic_dir(Path("out/adapter")) as tmp:
            (tmp / "adapter_config.json").write_text("{}")
    """
    created = _make_parents(target.parent)
    tmp = _fresh_dir(target, ".partial")
    try:
        yield tmp
        if not target.exists():
            os.rename(tmp, target)
        elif replace:
            _swap_in(tmp, target)
        else:
            _move_files(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # what `_move_files` left: empty folders


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces `target` when the block succeeds."""
    created = _make_parents(target.parent)
    tmp = target.parent / f".{target.name}.{os.urandom(4).hex()}.partial"
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_dirs(created)
        raise


def _fresh_dir(target: Path, suffix: str) -> Path:
    """A new empty hidden sibling of `target`, made by `mkdir` so the umask sets its mode."""
    while True:
        path = target.parent / f".{target.name}.{os.urandom(4).hex()}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` to the existing `target`; the old `target` is removed only afterwards."""
    old = _fresh_dir(target, ".old")
    os.rename(target, old / "x")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old / "x", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _move_files(tmp: Path, target: Path) -> None:
    for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
        dst = target / src.relative_to(tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parents, returning those created (deepest last) so a failure can undo them."""
    missing = []
    path = parent.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


def _remove_dirs(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break
