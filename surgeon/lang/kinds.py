"""Value kinds: what an option accepts, as small frozen validators.

Each kind answers `problem(value)` with a message fragment ("must be a positive integer") or
None, and `describe()` for the field reference. Values are Spec values: bool, int, float, str,
None, tuples for lists and `Table` for `{...}`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from surgeon.lang.values import Table


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def show(value) -> str:
    """A value the way a spec would spell it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Table):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items) + "}"
    return repr(value)


@dataclass(frozen=True, slots=True)
class Int:
    """An integer in [lo, hi] (either bound may be open-ended)."""

    lo: int | None = None
    hi: int | None = None

    def describe(self) -> str:
        if self.lo == 1 and self.hi is None:
            return "a positive integer"
        if self.lo == 0 and self.hi is None:
            return "a non-negative integer"
        return "an integer"

    def problem(self, value) -> str | None:
        if not is_int(value):
            return f"must be {self.describe()}"
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            return f"must be {self.describe()}"
        return None


@dataclass(frozen=True, slots=True)
class Number:
    """A finite number with optional bounds; `below` is an exclusive upper bound."""

    lo: float | None = None
    below: float | None = None
    hi: float | None = None
    positive: bool = False

    def describe(self) -> str:
        if self.positive:
            return "a positive number"
        if self.lo is not None and self.below is not None:
            return f"a number in [{self.lo:g}, {self.below:g})"
        if self.lo is not None and self.hi is not None:
            return f"a number in [{self.lo:g}, {self.hi:g}]"
        if self.lo is not None:
            return f"a number >= {self.lo:g}"
        return "a number"

    def problem(self, value) -> str | None:
        if not is_number(value):
            return f"must be {self.describe()}"
        bad = (
            (self.positive and value <= 0)
            or (self.lo is not None and value < self.lo)
            or (self.below is not None and value >= self.below)
            or (self.hi is not None and value > self.hi)
        )
        return f"must be {self.describe()}" if bad else None


@dataclass(frozen=True, slots=True)
class Bool:
    def describe(self) -> str:
        return "true or false"

    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else "must be true or false"


@dataclass(frozen=True, slots=True)
class Enum:
    """One of `choices` (bare word or string); `bools` also admits true/false; `patterns`
    admits words matching a regex (e.g. `pissa_niter_16`)."""

    choices: tuple[str, ...]
    bools: bool = False
    patterns: tuple[str, ...] = ()

    def describe(self) -> str:
        words = [f"'{c}'" for c in self.choices]
        if self.bools:
            words = ["true", "false"] + words
        return "one of " + ", ".join(words)

    def problem(self, value) -> str | None:
        if isinstance(value, bool):
            return None if self.bools else f"must be {self.describe()}"
        if isinstance(value, str) and (
            value in self.choices or any(re.fullmatch(p, value) for p in self.patterns)
        ):
            return None
        return f"must be {self.describe()}"


@dataclass(frozen=True, slots=True)
class Str:
    def describe(self) -> str:
        return "a string"

    def problem(self, value) -> str | None:
        return None if isinstance(value, str) else "must be a string"


@dataclass(frozen=True, slots=True)
class Dict:
    """A `{key: value}` table (PEFT sub-configs such as loftq_config, or rank_pattern)."""

    values: Int | Number | List | None = None

    def describe(self) -> str:
        return "a table {key: value, ...}"

    def problem(self, value) -> str | None:
        if not isinstance(value, Table):
            return f"must be {self.describe()}"
        if self.values is not None and any(self.values.problem(v) for _, v in value.items):
            return f"must be a table whose values are {self.values.describe()}s"
        return None


@dataclass(frozen=True, slots=True)
class List:
    """A `[...]` list whose items are `item`; `length` fixes the length when set."""

    item: Int | Str | Bool | List
    length: int | None = None

    def describe(self) -> str:
        if self.length is not None:
            return f"a list of {self.length} ({self.item.describe()})"
        return f"a list of ({self.item.describe()})"

    def problem(self, value) -> str | None:
        if not isinstance(value, tuple) or (self.length is not None and len(value) != self.length):
            return f"must be {self.describe()}"
        if any(self.item.problem(v) for v in value):
            return f"must be {self.describe()}"
        return None


Kind = Int | Number | Bool | Enum | Str | Dict | List
