"""Model factories for `--model py:tests/cli/factories.py:NAME` in the CLI tests."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyNet(nn.Module):
    """Two residual MLP blocks and a head: 16 features in, 4 out."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def not_a_module():
    return 42


def broken() -> nn.Module:
    raise RuntimeError("the factory failed on purpose")
