"""AdaLoRA: `config.py` (torch-free), `layer.py` (runtime), and what a training loop calls:
`orth_loss(model)` (the orthogonality term added to the loss, `regularizer.py`) and
`RankAllocator(model).update_and_allocate(step)` (rank pruning, `allocator.py`).

Both are imported on first use, so reading a spec (which loads `config.py`) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"orth_loss": "regularizer", "RankAllocator": "allocator", "resize": "allocator"}
__all__ = ["RankAllocator", "orth_loss", "resize"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
