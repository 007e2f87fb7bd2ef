"""Output files and directories that appear whole or not at all.

Every command that writes builds its result in a temporary sibling of the target and renames it
into place at the end, so an error (or Ctrl-C) never leaves a half-written checkpoint behind.
Targets are checked before any slow work starts, so a typo in `-o` fails in milliseconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputError(Exception):
    """An output location the command cannot (or must not) write; the message says which."""


def check_output(target: Path, *, directory: bool, force: bool = False) -> None:
    """Raise OutputError now if writing `target` later would fail or clobber something."""
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write '{target}': '{ancestor}' is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write '{target}': permission denied in '{ancestor}'")
    if not target.exists() and not target.is_symlink():
        return
    if directory and not target.is_dir():
        raise OutputError(f"cannot write '{target}': it exists and is not a directory")
    if not directory and target.is_dir():
        raise OutputError(f"cannot write '{target}': it is a directory")
    if directory and any(target.iterdir()) and not force:
        raise OutputError(f"output directory '{target}' exists and is not empty "
                          "(pass --force to replace it)")


@contextmanager
def atomic_dir(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `target` when the block succeeds.

    Example:
        with atomic_dir(Path("out/adapter")) as tmp:
            save_pretrained(model, tmp)
    """
    check_output(target, directory=True, force=force)
    created = _make_parents(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        raise


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces `target` when the block succeeds."""
    check_output(target, directory=False)
    created = _make_parents(target.parent)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_dirs(created)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an old `target` (allowed by check_output) goes only afterwards."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / "x")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old / "x", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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
