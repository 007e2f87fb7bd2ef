"""Diagnostics: one dataclass, one renderer, one exception.

Rendered like xDSL and rustc, so a reader sees the line and where on it:

    llama.peft:4:12: error: unknown role '@attn.qq'
        target @attn.qq in layers[0:16]
               ^^^^^^^^
        hint: did you mean '@attn.q'?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from surgeon.errors import UserError
from surgeon.lang.source import line_of, printable
from surgeon.lang.spec import Span

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One message about one place in a spec, with secondary places (`notes`) and a hint."""

    severity: Severity
    span: Span
    message: str
    notes: tuple[tuple[Span, str], ...] = ()
    hint: str | None = None


def error(span: Span, message: str, *, hint: str | None = None, notes=()) -> Diagnostic:
    return Diagnostic("error", span, message, tuple(notes), hint)


def warning(span: Span, message: str, *, hint: str | None = None, notes=()) -> Diagnostic:
    return Diagnostic("warning", span, message, tuple(notes), hint)


def did_you_mean(word: str, choices: Iterable[str], quote: str = "'") -> str | None:
    """A hint naming the choice closest to `word`, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    return f"did you mean {quote}{close[0]}{quote}?" if close else None


def _excerpt(source: str, span: Span, indent: str = "") -> list[str]:
    line, column, width = line_of(source, span)
    shown = printable(line)
    pad = "".join(c if c == "\t" else " " for c in shown[:column])
    pad += " " * max(0, column - len(shown))
    return [indent + shown, indent + pad + "^" * width]


def render_one(diagnostic: Diagnostic, source: str) -> str:
    """The text of one diagnostic: location line, source excerpt, hint, then its notes."""
    span = diagnostic.span
    lines = [f"{span.location()}: {diagnostic.severity}: {diagnostic.message}"]
    lines += _excerpt(source, span)
    if diagnostic.hint:
        lines.append(f"    hint: {diagnostic.hint}")
    for note_span, note in diagnostic.notes:
        lines.append(f"{note_span.location()}: note: {note}")
        lines += _excerpt(source, note_span)
    return "\n".join(lines)


def render(diagnostics: Iterable[Diagnostic], source: str) -> str:
    """All diagnostics in source order, separated by blank lines."""
    ordered = sorted(diagnostics, key=lambda d: (d.span.start, d.span.end))
    return "\n\n".join(render_one(d, source) for d in ordered)


class SpecError(UserError):
    """A `.peft` spec that cannot be used; `str()` is every diagnostic, rendered.

    Attributes:
        diagnostics: every error (and any warning) found, in source order.
        source: the spec text the spans point into.
    """

    rendered = True

    def __init__(self, diagnostics: Iterable[Diagnostic], source: str = ""):
        self.diagnostics = tuple(sorted(diagnostics, key=lambda d: (d.span.start, d.span.end)))
        self.source = source
        super().__init__(render(self.diagnostics, source))

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    def __reduce__(self):
        return (SpecError, (self.diagnostics, self.source))
