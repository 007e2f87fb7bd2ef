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
    """A hint naming the choice closest to `word`, or None when nothing is close.

    A case-insensitive equal wins; else, among difflib's close matches, the fewest typing
    edits (a swap of two neighbours counts one: `lroa` is `lora`, not `road`)."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        best = lowered[word.lower()]
    else:
        close = difflib.get_close_matches(word, choices, n=5, cutoff=0.6)
        best = min(close, key=lambda c: edits(word.lower(), c.lower()), default=None)
    return f"did you mean {quote}{best}{quote}?" if best else None


def edits(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions, adjacent swaps."""
    prev2, prev = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
            if prev2 is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


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
