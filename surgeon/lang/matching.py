"""Regex selectors matched with a time budget, so a pathological pattern cannot hang a command.

Python's `re` backtracks without limit: `/(\\w|\\w\\w|\\.)+\\d/` against a 60-character module
path runs for minutes, and a hostile adapter_config.json can carry such a `target_modules`.
The pattern is compiled with `re` (so what is valid, and the error for what is not, stay
PEFT's, which uses `re.fullmatch`), then matched by the `regex` package (installed with
transformers), whose VERSION0 mode is `re`-compatible and whose matches take a `timeout`.
One budget covers every path a pattern is tried on. Torch-free.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from surgeon.errors import UserError

# Seconds one pattern may spend on all of a model's module paths (a normal pattern needs
# microseconds per path; even 100k paths stay far below this).
BUDGET_S = 2.0


class RegexTooSlow(UserError, ValueError):
    """A regex selector that backtracks past its time budget; the message names the pattern."""

    def __init__(self, pattern: str, tried: int, budget: float):
        self.pattern = pattern
        super().__init__(
            f"the regex /{pattern}/ took over {budget:g} s on {tried} module path(s) "
            "(catastrophic backtracking, e.g. a nested quantifier like `(a+)+`); "
            "simplify it or list the module names")


def full_matches(pattern: str, strings: Iterable[str], *, budget: float | None = None) -> list[str]:
    """The strings `pattern` fully matches (as `re.fullmatch`), in order, within `budget` seconds.

    Raises:
        re.error: the pattern is no valid Python regex.
        RegexTooSlow: matching ran past the budget.
    """
    import regex  # a dependency of transformers; imported only when a regex selector is used

    budget = BUDGET_S if budget is None else budget
    re.compile(pattern)  # what is valid, and the error for what is not, exactly as `re` says
    compiled = regex.compile(pattern, flags=regex.VERSION0)  # inline flags are read by both
    deadline = time.monotonic() + budget
    found, tried = [], 0
    for text in strings:
        tried += 1
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            if compiled.fullmatch(text, timeout=left) is not None:
                found.append(text)
        except TimeoutError:
            raise RegexTooSlow(pattern, tried, budget) from None
    return found
