"""Progress on stderr for slow commands: a line per stage, a bar for long loops.

stdout stays for results (tables, JSON), so piping `surgeon plan --json` keeps working. Bars use
tqdm (a transformers dependency) when stderr is a terminal and the work is large; otherwise a
stage prints one line when it ends, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# Bars appear from this many parameters on (about 0.4 GB of fp32 weights).
LARGE_MODEL_PARAMS = 100_000_000


@contextmanager
def stage(label: str, *, quiet: bool = False) -> Iterator[None]:
    """Report `label ... 1.2 s` on stderr once the block finishes (nothing if it raises)."""
    start = time.perf_counter()
    yield
    if not quiet:
        print(f"{label} ... {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def bar(items: Iterable[T], *, total: int, label: str, large: bool) -> Iterable[T]:
    """`items`, with a tqdm bar on an interactive stderr when the work is `large`."""
    if not (large and sys.stderr.isatty()):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=label, unit="layer", file=sys.stderr, leave=False)
