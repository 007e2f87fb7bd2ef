"""Rewrite passes over adapted layers' forward graphs, one per file, by CLI name.

Importable as `surgeon.passes`. Passes are looked up lazily so importing the registry is cheap.

Example:
    >>> from surgeon.passes import get_pass
    >>> get_pass("merge")(safe_merge=True)
    MergePass(adapters=None, safe_merge=True)
"""

from __future__ import annotations

import importlib
from typing import Any

# CLI name -> "module:class"
PASSES: dict[str, str] = {
    "insert-adapters": "surgeon.passes.insert_adapters:InsertAdaptersPass",
    "merge": "surgeon.passes.merge:MergePass",
    "unmerge": "surgeon.passes.unmerge:UnmergePass",
}


def get_pass(name: str) -> Any:
    """The pass class registered as `name`."""
    if name not in PASSES:
        known = ", ".join(f"`{p}`" for p in PASSES)
        raise KeyError(f"Unknown pass `{name}`; known passes: {known}.")
    module, cls = PASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)
