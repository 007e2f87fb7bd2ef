"""Mixed-adapter batches for wrappers that swap a whole module (saved modules, token rows).

Row i of the batch runs through `run(name, rows_input)` for its adapter `names[i]`; rows that share
an adapter run together, and the outputs are put back in batch order (as PEFT's
`_mixed_batch_forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def run_rows(x: torch.Tensor, names: Sequence[str],
             run: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    out: list[torch.Tensor | None] = [None] * len(names)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        for i, y in zip(rows, run(name, x[rows])):
            out[i] = y
    return torch.stack(out)
