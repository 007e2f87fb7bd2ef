"""`.peft` text -> checked `Spec`. The only way in; raises nothing but `SpecError` on any text
(and `SpecFileError` for a path that is no regular file of sensible size).

    text --Lark LALR (grammar/peft.lark)--> parse tree --Builder--> syntax tree --check--> Spec

Example:
    >>> spec = parse("adapter default = lora(r=16, alpha=32) { target @attn.q, @attn.v }")
    >>> spec.adapters[0].option("lora_alpha")
    32
"""

from __future__ import annotations

import functools
import os
import stat
from importlib import resources
from pathlib import Path

from lark import Lark, Tree
from lark.exceptions import UnexpectedInput

from surgeon.errors import UserError
from surgeon.lang.build import Builder
from surgeon.lang.check import check
from surgeon.lang.diagnostics import Diagnostic, SpecError, error
from surgeon.lang.source import span_at, span_of_meta
from surgeon.lang.spec import Spec
from surgeon.lang.syntax_errors import syntax_error

# Deeper parse trees are rejected before the (recursive) tree transformer runs. A real spec is
# about 10 deep; the limit only stops `[[[[...]]]]` bombs from reaching a RecursionError.
MAX_DEPTH = 48


@functools.cache
def grammar_parser() -> Lark:
    """The LALR parser for grammar/peft.lark (package data of `surgeon.grammar`), built once."""
    text = resources.files("surgeon.grammar").joinpath("peft.lark").read_text(encoding="utf-8")
    return Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def diagnose(text: str, file: str = "<spec>") -> tuple[Spec | None, tuple[Diagnostic, ...]]:
    """The checked Spec (None when there is an error) and every diagnostic, never raising.

    For tools that also want warnings (`surgeon check`); most callers want `parse`.
    """
    parser = grammar_parser()
    try:
        tree = parser.parse(text)
    except UnexpectedInput as e:
        return None, (syntax_error(e, text, file, parser, parser.parse),)
    too_deep = _too_deep(tree, file)
    if too_deep is not None:
        return None, (too_deep,)
    builder = Builder(file)
    raw = builder.transform(tree)
    if builder.diagnostics:
        return None, tuple(builder.diagnostics)
    spec, diags = check(raw, text, file)
    return spec, tuple(diags)


def parse(text: str, file: str = "<spec>") -> Spec:
    """Parse and check `.peft` text.

    Args:
        text: the spec source.
        file: the name diagnostics show for it.

    Returns:
        The checked Spec.

    Raises:
        SpecError: with every diagnostic found (syntax errors stop at the first).
    """
    if not isinstance(text, str):
        raise TypeError(f"parse() takes the spec text as str, not {type(text).__name__}")
    spec, diags = diagnose(text, file)
    if spec is None:
        raise SpecError(diags, text)
    return spec


def load_spec(source: str | os.PathLike) -> Spec:
    """A Spec from `.peft` text or from a file.

    Args:
        source: a `pathlib.Path` (or other path-like), a str naming an existing file, or the
            spec text itself. A one-line str ending in `.peft` is taken as a path.

    Raises:
        SpecError: the spec has errors (or the file is not UTF-8).
        FileNotFoundError: a path was given and no such file exists.
    """
    if isinstance(source, os.PathLike):
        return _load_file(Path(source))
    if not isinstance(source, str):
        raise TypeError(f"load_spec() takes .peft text or a path, not {type(source).__name__}")
    if _names_file(source):
        return _load_file(Path(source))
    if "\n" not in source and source.strip().endswith(".peft"):
        raise FileNotFoundError(f"no such spec file: {source}")
    return parse(source)


def _names_file(source: str) -> bool:
    if "\n" in source or len(source) > 4096:
        return False
    try:
        path = Path(source)
        return path.exists() and not path.is_dir()  # a device or FIFO is refused when read
    except (OSError, ValueError):
        return False


# The largest .peft file read (bytes): real specs are a few KiB; this stops `/dev/zero` or a
# mistyped multi-GB path from being read until memory runs out.
MAX_SPEC_BYTES = 4 * 2**20


class SpecFileError(UserError, ValueError):
    """A spec path that is no readable regular file of sensible size; the message says which."""


def _load_file(path: Path) -> Spec:
    return parse(read_spec_file(path), file=str(path))


def check_file(path: Path) -> tuple[Spec, str, tuple[Diagnostic, ...]]:
    """The checked Spec of a `.peft` file, its text and its warnings (`surgeon check` shows
    them; `load_spec` drops them). Raises SpecError when the file has errors."""
    text = read_spec_file(path)
    spec, diags = diagnose(text, str(path))
    if spec is None:
        raise SpecError(diags, text)
    return spec, text, diags


def read_spec_file(path: Path) -> str:
    """A spec file's text; a located SpecError at the first byte that is not UTF-8."""
    data = _read_bounded(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", errors="replace")
        at = len(data[: e.start].decode("utf-8", errors="replace"))
        message = f"this file is not valid UTF-8 (byte 0x{data[e.start]:02x})"
        raise SpecError([error(span_at(str(path), text, at, at + 1), message)], text) from None


def _read_bounded(path: Path) -> bytes:
    """The file's bytes, refusing devices, FIFOs and folders (checked on the open descriptor,
    so no race with the check) and anything over MAX_SPEC_BYTES (read stops there)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block here
    with os.fdopen(fd, "rb") as file:  # FileNotFoundError / PermissionError as Python says them
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecFileError(f"spec '{path}' is not a regular file")
        data = file.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecFileError(f"spec '{path}' is larger than {MAX_SPEC_BYTES // 2**20} MiB; "
                            "is it really a .peft file?")
    return data


def _too_deep(tree: Tree, file: str) -> Diagnostic | None:
    """An error at the first node nested deeper than MAX_DEPTH (iterative: no recursion)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            span = span_of_meta(file, node.meta)
            return error(span, f"this value is nested too deeply (more than {MAX_DEPTH} levels)")
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))
    return None
