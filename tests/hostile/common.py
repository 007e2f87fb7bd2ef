"""What the hostile-input tests share: the CLI run in-process (no torch import per call), a
small plain model, and the outcome every bad input must have (exit 2, one clear line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgeon.cli.main import main

EVIL_REGEX = r"(\w|\w\w|\.)+\d"  # backtracks for ~forever on a 30+ character module path


@dataclass(frozen=True)
class Outcome:
    rc: int
    out: str
    err: str


def cli(capsys, *argv: str | Path) -> Outcome:
    """`surgeon ARGV...` in this process (the CLI's error boundary is `main`)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own usage errors
        rc = stop.code
    captured = capsys.readouterr()
    return Outcome(rc, captured.out, captured.err)


def assert_exit_2(outcome: Outcome, *needles: str) -> None:
    """Exit 2, no traceback, and a message naming what was wrong."""
    assert outcome.rc == 2, outcome
    assert "Traceback" not in outcome.err and "internal error" not in outcome.err, outcome
    for needle in needles:
        assert needle in outcome.err, outcome


class Net(nn.Module):
    """Two blocks with long module paths (so a backtracking regex has something to chew on)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_layers_with_a_long_name = nn.ModuleList(
            nn.ModuleDict({"query_projection_matrix": nn.Linear(8, 8), "value_projection_matrix": nn.Linear(8, 8)})
            for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder_layers_with_a_long_name:
            x = x + block["value_projection_matrix"](block["query_projection_matrix"](x))
        return self.head(x)


def net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def tree(folder: Path) -> list[str]:
    """Every path under `folder`, hidden ones included (a leftover temporary would show)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
