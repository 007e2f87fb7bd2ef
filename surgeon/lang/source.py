"""Source text and positions: building `Span`s and finding the line a span sits on.

Lark reports 1-based lines and columns and 0-based offsets; a `Span` keeps all of them so a
diagnostic can be rendered without re-scanning the text.
"""

from __future__ import annotations

import unicodedata

from surgeon.lang.spec import Span


def span_at(file: str, text: str, start: int, end: int | None = None) -> Span:
    """The span of `text[start:end]`, with its line and column computed from the offsets."""
    start = max(0, min(start, len(text)))
    end = start if end is None else max(start, min(end, len(text)))
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    return Span(file, start, end, line, column)


def span_of_token(file: str, token) -> Span:
    """The span of one Lark token (positions are set by the lexer)."""
    return Span(file, token.start_pos, token.end_pos, token.line, token.column)


def span_of_meta(file: str, meta) -> Span:
    """The span of one Lark tree node (`propagate_positions=True`)."""
    if meta.empty:
        return Span(file, 0, 0, 1, 1)
    return Span(file, meta.start_pos, meta.end_pos, meta.line, meta.column)


def join(first: Span, last: Span) -> Span:
    """The span from the start of `first` to the end of `last`."""
    return Span(first.file, first.start, max(first.end, last.end), first.line, first.column)


def line_of(text: str, span: Span) -> tuple[str, int, int]:
    """The source line `span` starts on, and the caret start and width within that line.

    The width stops at the end of the line for spans that run over several lines and is at
    least 1, so a span at the end of the file still gets one caret.
    """
    lines = text.split("\n")
    index = span.line - 1
    line = lines[index] if 0 <= index < len(lines) else ""
    line = line.rstrip("\r")
    column = max(0, span.column - 1)
    width = max(1, min(span.end - span.start, len(line) - column))
    return line, column, width


def printable(line: str) -> str:
    """`line` with characters a terminal would not show one-for-one replaced by `?`.

    One character stays one column, so the caret line still lines up under the span.
    """
    return "".join(c if c == "\t" or _one_column(c) else "?" for c in line)


def _one_column(c: str) -> bool:
    return c.isprintable() and not unicodedata.combining(c) and unicodedata.east_asian_width(c) not in "WF"
