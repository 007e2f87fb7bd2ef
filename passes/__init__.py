"""Rewrite passes over adapted layers' forward graphs, one per file, by CLI name.

Passes only rewrite graphs (weights are written by `surgeon.runtime.fold`), and they stand on
the graph IR alone: `surgeon.runtime.graph` (Builder, tags, `LayerView`),
`surgeon.runtime.base_kinds` and `surgeon.runtime.method.MethodLayer`, never the adapted layer.

Importable as `surgeon.passes`. Passes are looked up lazily so importing the registry is cheap.

Example:
    >>> from surgeon.passes import get_pass
    >>> get_pass("insert-adapters")(mixed=True)
    InsertAdaptersPass(adapters=None, mixed=True)
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
