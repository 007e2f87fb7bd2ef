"""Build a PEFT LoRA layer (the oracle) and a surgeon `AdaptedLayer` on identical weights.

`pair(kind, ...)` wraps two deep copies of one tiny base module: PEFT's via
`inject_adapter_in_model` on a one-attribute module, ours via `AdaptedLayer(base, site)`. It
then gives PEFT's adapter random non-zero weights and loads PEFT's layer state dict into ours
with `strict=True`, which also checks that the in-memory names agree.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgeon.planning.site import Site
from surgeon.runtime.adapted import AdaptedLayer

KINDS = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding")


def make_base(kind: str, bias: bool = True, seed: int = 0) -> nn.Module:
    """A tiny seeded base layer of `kind`."""
    torch.manual_seed(seed)
    if kind == "Linear":
        return nn.Linear(8, 6, bias=bias)
    if kind == "Conv1D":
        return Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs; always has a bias
    if kind == "Conv1d":
        return nn.Conv1d(4, 6, 3, padding=1, bias=bias)
    if kind == "Conv2d":
        return nn.Conv2d(3, 5, 3, padding=1, bias=bias)
    if kind == "Conv3d":
        return nn.Conv3d(2, 4, 3, bias=bias)
    return nn.Embedding(12, 6, padding_idx=0)


def make_input(kind: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"Linear": (batch, 3, 8), "Conv1D": (batch, 3, 8), "Conv1d": (batch, 4, 7),
              "Conv2d": (batch, 3, 6, 6), "Conv3d": (batch, 2, 5, 5, 5)}
    if kind == "Embedding":
        return torch.randint(0, 12, (batch, 5), generator=gen)
    return torch.randn(*shapes[kind], generator=gen)


@dataclass(frozen=True)
class Variant:
    """LoRA options shared by PEFT's config and our Site (PEFT field names)."""

    r: int = 2
    alpha: float = 4.0
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    init_lora_weights: Any = True
    lora_dropout: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=["layer"],
                          use_rslora=self.use_rslora, use_dora=self.use_dora,
                          lora_bias=self.lora_bias, init_lora_weights=self.init_lora_weights,
                          lora_dropout=self.lora_dropout, **self.extra)

    def site(self, kind: str, adapter: str = "default") -> Site:
        options = {"init_lora_weights": self.init_lora_weights, "lora_bias": self.lora_bias,
                   "lora_dropout": self.lora_dropout, "use_dora": self.use_dora,
                   "use_rslora": self.use_rslora, "bias": "none"}
        if kind in ("Linear", "Conv1D"):
            options["fan_in_fan_out"] = kind == "Conv1D"
        return Site(path="layer", kind=kind, method="lora", adapter=adapter, r=self.r,
                    alpha=self.alpha, scaling=self.scaling, options=tuple(sorted(options.items())),
                    rule="test.peft:3:5")


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.layer(x, **kwargs)


def peft_layer(base: nn.Module, variant: Variant, adapter: str = "default") -> nn.Module:
    """PEFT's LoRA layer around `base` (which it takes over)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        holder = inject_adapter_in_model(variant.config(), Holder(base), adapter_name=adapter)
    return holder.layer


def add_peft_adapter(layer: nn.Module, variant: Variant, adapter: str) -> None:
    """A second adapter on PEFT's layer, as `inject_adapter_in_model` would add it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.update_layer(adapter, variant.r, lora_alpha=variant.alpha, config=variant.config())


def randomise(layer: nn.Module, adapter: str, seed: int = 7) -> None:
    """Random non-zero values for every adapter tensor (magnitudes positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if f".{adapter}" in name and "lora_" in name:
                values = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.3
                if "magnitude" in name:
                    values = values.abs() + 0.5
                p.copy_(values.to(p.dtype))


def copy_adapters(peft: nn.Module, ours: AdaptedLayer) -> None:
    """Load PEFT's layer state into ours: same keys or it fails."""
    ours.load_state_dict(peft.state_dict(), strict=True)


def pair(kind: str, variant: Variant, bias: bool = True, randomize: bool = True,
         dtype: torch.dtype = torch.float32) -> tuple[nn.Module, AdaptedLayer]:
    """PEFT's layer and ours on identical base weights and (random) adapter weights."""
    base = make_base(kind, bias).to(dtype)
    theirs = peft_layer(copy.deepcopy(base), variant)
    ours = AdaptedLayer(copy.deepcopy(base), variant.site(kind))
    if randomize:
        randomise(theirs, "default")
    copy_adapters(theirs, ours)
    return theirs, ours


def two_adapters(kind: str, second: Variant | None = None, first: Variant | None = None):
    """PEFT's and our layer with adapters `default` and `other`, random weights, in eval mode."""
    first, second = first or Variant(), second or Variant(r=3, alpha=6.0, use_rslora=True)
    base = make_base(kind)
    theirs = peft_layer(copy.deepcopy(base), first)
    add_peft_adapter(theirs, second, "other")
    ours = AdaptedLayer(copy.deepcopy(base), first.site(kind))
    ours.add_adapter(second.site(kind, "other"))
    randomise(theirs, "default", seed=1)
    randomise(theirs, "other", seed=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval()
    ours.eval()
    return theirs, ours


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
