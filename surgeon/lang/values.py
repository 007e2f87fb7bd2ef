"""Option values as a spec states them: bool, int, float, str, None, tuples for lists and
`Table` for `{...}`. A leaf module (torch-free, imports nothing of surgeon): the Spec, the value
kinds and every method's fields are built on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True, slots=True)
class Table:
    """A `{key: value, ...}` literal (e.g. AdaLoRA's saved rank_pattern), order kept."""

    items: tuple[tuple[str, Value], ...]

    def to_dict(self) -> dict:
        return {k: to_python(v) for k, v in self.items}


# Option values: lists are tuples so the Spec stays immutable.
Value = Union[bool, int, float, str, None, tuple, Table]


def to_python(value: Value):
    """A Value as plain JSON-able Python (tuples become lists, tables dicts)."""
    if isinstance(value, Table):
        return value.to_dict()
    if isinstance(value, tuple):
        return [to_python(v) for v in value]
    return value
