"""The unchecked syntax tree: what the parser saw, with a span on every part.

The checker (check.py) turns it into a `Spec`. It exists because the Spec keeps one span per
node, while diagnostics need more: the adapter's name and method, an option's key and value,
each layer slice, each clause. Selector atoms are already Spec atoms (they carry their span).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from surgeon.lang.spec import Atom, LayerSlice, Span, Value

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Located(Generic[T]):
    """A value and where it was written."""

    value: T
    span: Span


@dataclass(frozen=True, slots=True)
class RawLayers:
    """`layers[0:4, 7] of "h"`, before range checks."""

    items: tuple[Located[int | LayerSlice], ...]
    pattern: tuple[Located[str], ...]
    span: Span


@dataclass(frozen=True, slots=True)
class RawClause:
    """`in layers[...]`, `within path` or `except a, b`."""

    kind: str  # "in" | "within" | "except"
    value: RawLayers | Located[str] | tuple[Atom, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class RawSelection:
    """Atoms (empty for a bare `layers[...]`) and clauses in the order written."""

    include: tuple[Atom, ...]
    layers: RawLayers | None  # the bare `layers[...]` form
    clauses: tuple[RawClause, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class RawRule:
    """One rule; which parts are set depends on `kind` (a rule keyword)."""

    kind: str
    keyword: Span
    span: Span
    selection: RawSelection | None = None  # target, exclude, rank, alpha, feedforward
    value: Located[Value] | None = None  # rank, alpha
    names: tuple[Located[str], ...] = ()  # save; tokens' module (at most one)
    indices: tuple[Located[int], ...] = ()  # tokens


@dataclass(frozen=True, slots=True)
class RawOption:
    key: Located[str]
    value: Located[Value]
    span: Span


@dataclass(frozen=True, slots=True)
class RawAdapter:
    name: Located[str]
    method: Located[str]
    options: tuple[RawOption, ...]
    rules: tuple[RawRule, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class RawSpec:
    adapters: tuple[RawAdapter, ...]
    span: Span
