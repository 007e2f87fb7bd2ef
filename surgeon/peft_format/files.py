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

import errno
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
_DISK_ERRNOS = (errno.EIO, errno.ENOSPC)  # the machine's trouble, not the file's


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read as asked or does not fit the model; the message says why
    (for a misfit, every mismatch at once)."""


# --------------------------------------------------------------------------- layout


class AdapterNameError(UserError, ValueError):
    """An adapter name that could not be a folder name (`../x`, `/abs`, `a/b`, ``)."""


def check_adapter_name(name: object) -> str:
    """`name`, or an AdapterNameError: a name becomes a folder, so it must never leave one."""
    from surgeon.lang.check import adapter_name_problem

    if problem := adapter_name_problem(name):
        raise AdapterNameError(problem)
    return name


def adapter_dir(path: str | os.PathLike, adapter: str) -> Path:
    """Where PEFT keeps `adapter` below a save path: the path itself for "default"."""
    return Path(path) if check_adapter_name(adapter) == DEFAULT else Path(path) / adapter


def adapter_config_path(path: str | os.PathLike) -> Path:
    """The adapter_config.json of the adapter folder `path`, for messages."""
    return Path(path) / CONFIG_NAME


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
    and then with `torch.load(weights_only=True)` so it cannot run code. Every way a file can be
    broken (missing, dangling link, not JSON, not an object, truncated or random safetensors, a
    huge header) is a CheckpointError naming the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"`{folder}`: no such directory (a PEFT checkpoint is a folder)")
    config = read_config(folder / CONFIG_NAME)
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return config, _read_safetensors(weights)
    if (folder / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise CheckpointError(f"`{folder / PICKLE_NAME}` is a pickle; pass allow_pickle=True to load "
                                  "it (read with torch.load(weights_only=True))")
        import torch

        try:
            return config, torch.load(folder / PICKLE_NAME, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"`{folder / PICKLE_NAME}` cannot be read with torch.load(weights_only=True): "
                                  f"it is no pickle of plain tensors ({type(error).__name__})") from None
    dangling = " (a dangling link)" if weights.is_symlink() else ""
    raise CheckpointError(f"no `{WEIGHTS_NAME}` (or `{PICKLE_NAME}`) in `{folder}`{dangling}")


# An adapter_config.json is a few KiB; anything far larger is not one.
MAX_CONFIG_BYTES = 16 * 2**20


def read_config(file: Path) -> dict:
    """An adapter_config.json as a dict, or a CheckpointError saying what is wrong with it."""
    if not file.is_file():
        dangling = " (a dangling link)" if file.is_symlink() else ""
        raise CheckpointError(f"no `{CONFIG_NAME}` in `{file.parent}`{dangling}: "
                              "not a PEFT adapter checkpoint")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"`{file}` is over {MAX_CONFIG_BYTES // 2**20} MiB: not an adapter config")
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"`{file}` is not valid JSON ({_first_line(error)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"`{file}` holds a JSON {type(config).__name__}, not an object: "
                              "not a PEFT adapter config")
    return config


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; safetensors itself checks the header size and that
    every tensor lies inside the file, before allocating."""
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except Exception as error:  # noqa: BLE001 - SafetensorError, and OSError for odd files
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            raise
        raise CheckpointError(f"`{file}` is not a readable safetensors file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0]


def write_checkpoint(path: str | os.PathLike, adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]],
                     readme: str) -> None:
    """Write adapters {name: (config, tensors)} as PEFT does, as one swap of the whole folder.

    Into an existing folder, the new folder is built beside it with the files that are not
    adapters carried over (hard links where possible), then swapped in with one rename: a failure
    at any point leaves the old folder as it was, and the result holds exactly the adapters of
    this save (an adapter subfolder from an earlier save does not linger). A non-adapter file or
    folder where an adapter must go is refused before anything is written.
    """
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CheckpointError(f"`{target}` exists and is not a directory; save_pretrained needs one")
    for name in adapters:
        where = adapter_dir(target, name)
        if name != DEFAULT and where.exists() and not (where / CONFIG_NAME).is_file():
            raise CheckpointError(f"`{where}` exists and is not an adapter folder; adapter "
                                  f"'{name}' would replace it (move it away first)")
    with atomic_dir(target, replace=True) as tmp:
        (tmp / README_NAME).write_text(readme)
        for name, (config, tensors) in adapters.items():
            _write_adapter(adapter_dir(tmp, name), config, tensors)
        follow_umask(tmp)  # before carrying over: the user's own files keep their modes
        _carry_over(target, tmp)


# The files of the top-level ("default") adapter; they belong to the save, never carried over.
_ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, README_NAME)


def _carry_over(old: Path, new: Path) -> None:
    """Link or copy into `new` what `old` holds besides adapters (the user's own files)."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        dst = new / entry.name
        if entry.name in _ADAPTER_FILES or dst.exists() or (entry / CONFIG_NAME).is_file():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dst)


def _link_or_copy(src, dst) -> None:
    try:
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


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
    The folder has ordinary permissions (what `mkdir` gives under the umask), not mkdtemp's 0700;
    callers apply `follow_umask` to what they wrote.

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
        follow_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_dirs(created)
        raise


def umask() -> int:
    """The process umask, read without changing it where Linux tells it (else set and reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain `open`/`mkdir` would: libraries such
    as safetensors write 0600, which `ls -l` then shows unlike every other written file."""
    mask = umask()
    paths = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for path in paths:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
