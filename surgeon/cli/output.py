"""Checks on output paths, made before any slow work starts, so a typo in `-o` fails in
milliseconds instead of after loading a model.

The writes themselves are `surgeon.peft_format.files.atomic_dir` / `atomic_file` (a temporary
sibling renamed into place), shared with the Python API; `atomic_dir` here adds the check and
`--force`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import UserError
from surgeon.peft_format import files


class OutputError(UserError):
    """An output location the command cannot (or must not) write; the message says which."""


def check_output(target: Path, *, directory: bool, force: bool = False) -> None:
    """Raise OutputError now if writing `target` later would fail or clobber something.

    Only regular files and folders are ever replaced, and only with `--force` when they hold
    something: never a device, FIFO, socket or symbolic link (the write would go through it or
    replace the link), never `.`, `..` or an empty path.
    """
    if str(target) in ("", ".") or target.name in ("", ".", ".."):
        raise OutputError(f"cannot write {str(target)!r}: name a new file or folder")
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write '{target}': '{ancestor}' is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write '{target}': permission denied in '{ancestor}'")
    if target.is_symlink():
        raise OutputError(f"cannot write '{target}': it is a symbolic link; give the path it points to")
    if not target.exists():
        return
    mode = target.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"cannot write '{target}': it exists and is not a regular file or folder")
    if directory and not target.is_dir():
        raise OutputError(f"cannot write '{target}': it exists and is not a directory")
    if not directory and target.is_dir():
        raise OutputError(f"cannot write '{target}': it is a directory")
    if directory and any(target.iterdir()) and not force:
        raise OutputError(f"output directory '{target}' exists and is not empty "
                          "(pass --force to replace it)")
    if not directory and not force:
        raise OutputError(f"output file '{target}' exists (pass --force to replace it)")


@contextmanager
def atomic_dir(target: Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary folder that replaces `target` whole when the block succeeds (checked first);
    what was written gets the modes the umask gives."""
    check_output(target, directory=True, force=force)
    with files.atomic_dir(target, replace=True) as tmp:
        yield tmp
        files.follow_umask(tmp)


@contextmanager
def atomic_file(target: Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary file path that replaces `target` when the block succeeds (checked first)."""
    check_output(target, directory=False, force=force)
    with files.atomic_file(target) as tmp:
        yield tmp


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
