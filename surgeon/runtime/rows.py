"""Mixed-adapter batches: which batch rows use which adapter (PEFT's `adapter_names=`).

An adapted layer runs one graph whose branches read their rows through `rows_<adapter>` inputs
(`rows_of`). Wrappers that swap a whole module (saved modules, token rows) run each adapter's
rows through its own module (`run_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def rows_of(names: Sequence[str], adapter: str, device: torch.device) -> torch.Tensor:
    """Indices of the batch rows that use `adapter` (a `rows_<adapter>` graph input)."""
    return torch.tensor([i for i, n in enumerate(names) if n == adapter], dtype=torch.long,
                        device=device)


def run_rows(x: torch.Tensor, names: Sequence[str],
             run: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Row i of `x` through `run(names[i], rows)`; rows sharing an adapter run together, and the
    outputs go back in batch order (as PEFT's `_mixed_batch_forward`)."""
    out: list[torch.Tensor | None] = [None] * len(names)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        for i, y in zip(rows, run(name, x[rows])):
            out[i] = y
    return torch.stack(out)
