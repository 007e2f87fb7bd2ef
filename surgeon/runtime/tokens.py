"""Trainable token rows (`tokens embed_tokens [0, 5, 9]`): PEFT 0.21's TrainableTokensWrapper.

The wrapper keeps PEFT's in-memory names (`<path>.token_adapter.base_layer.weight`,
`<path>.token_adapter.trainable_tokens_delta.<adapter>`), so checkpoints map as in PEFT. The
"delta" holds the rows' new values, not a difference: forward uses the base weight with those
rows replaced (index_copy), and merging writes them into the weight. An output embedding tied
to the input one gets a tied wrapper that shares the delta and is never saved (PEFT's rule).
`TokenWrapper` implements `surgeon.runtime.wrappers.Wrapper`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.runtime.rows import run_rows


class TokenAdapter(nn.Module):
    """PEFT's TrainableTokensLayer: per-adapter replacement rows of `base_layer.weight`."""

    def __init__(self, base_layer: nn.Module, tied: TokenAdapter | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied] if tied is not None else []  # a list: not a submodule, never saved
        if tied is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied.trainable_tokens_delta
            self.token_indices = tied.token_indices

    @property
    def tied(self) -> TokenAdapter | None:
        return self._tied[0] if self._tied else None

    def add(self, adapter: str, indices: Sequence[int]) -> None:
        """New rows for `adapter`, initialised to the current rows (PEFT's init_weights=True)."""
        if self.tied is not None:
            return
        rows = self.base_layer.weight.detach()[list(indices)].clone()
        self.token_indices[adapter] = list(indices)
        self.trainable_tokens_delta[adapter] = nn.Parameter(rows, requires_grad=True)

    def remove(self, adapter: str) -> None:
        if self.tied is not None:
            return
        self.token_indices.pop(adapter, None)
        if adapter in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[adapter]

    def merged_weight(self, adapters: Sequence[str]) -> torch.Tensor:
        weight = self.base_layer.weight
        for name in adapters:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    @torch.no_grad()
    def merge(self, adapters: Sequence[str]) -> None:
        """Write the adapters' rows into the base weight (PEFT's TrainableTokensLayer.merge)."""
        self.base_layer.weight.data = self.merged_weight(adapters).detach()

    def forward(self, x: torch.Tensor, adapters: Sequence[str]) -> torch.Tensor:
        base = self.base_layer
        if not adapters:
            return base(x)
        weight = self.merged_weight(adapters)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
            scale = getattr(base, "embed_scale", None)  # Gemma3's scaled embedding, as PEFT
            if isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1):
                out = out * torch.as_tensor(scale, device=out.device).to(out.dtype)
            return out
        if isinstance(base, nn.Linear):
            return F.linear(x, weight)  # a tied output embedding
        raise ValueError(f"trainable tokens wrap an Embedding or a tied Linear, not {type(base).__name__}")


class TokenWrapper(nn.Module):
    """PEFT's TrainableTokensWrapper: one active adapter's rows, the base when none or disabled."""

    held_as: ClassVar[str] = "has trainable tokens"

    def __init__(self, base_layer: nn.Module, tied: TokenAdapter | None = None) -> None:
        super().__init__()
        self.token_adapter = TokenAdapter(base_layer, tied)
        self.active: str | None = None
        self.disabled = False
        self.adapter_names: Sequence[str] | None = None  # a mixed batch's rows

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    def choose(self, wanted: Sequence[str]) -> str | None:
        """The adapter whose rows run among `wanted` (PEFT allows one at a time)."""
        present = [a for a in wanted if a in self.token_adapter.trainable_tokens_delta]
        if len(present) > 1:
            raise ValueError(f"only one adapter with trainable tokens can be active at a time, got {present} "
                             "(PEFT's rule)")
        return present[0] if present else None

    # ------------------------------------------------------------------ the wrapper protocol
    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.token_adapter.trainable_tokens_delta)

    def adapter_parameters(self, adapter: str) -> Iterator[nn.Parameter]:
        return iter((self.token_adapter.trainable_tokens_delta[adapter],))

    def set_active(self, names: Sequence[str], frozen: Collection[str]) -> Callable[[], None]:
        before, self.active = self.active, self.choose(names)  # PEFT: one adapter's rows
        for name, delta in self.token_adapter.trainable_tokens_delta.items():
            delta.requires_grad_(name == self.active and name not in frozen)
        return lambda: setattr(self, "active", before)

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled
        if not enabled:
            self.token_adapter.trainable_tokens_delta.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        self.token_adapter.remove(name)

    def unloaded(self, merged: Sequence[str]) -> nn.Module:
        """The base layer, with the rows of `merged` written in (a tied wrapper's are written
        through the wrapper it shares them with)."""
        names = [a for a in merged if a in self.token_adapter.trainable_tokens_delta]
        if names and self.token_adapter.tied is None:
            self.token_adapter.merge(names)
        return self.original_module

    def _running(self) -> list[str]:
        if self.disabled or self.active not in self.token_adapter.trainable_tokens_delta:
            return []
        return [self.active]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        names = self.adapter_names
        if names is None or self.disabled:
            return self.token_adapter(x, self._running())
        deltas = self.token_adapter.trainable_tokens_delta
        return run_rows(x, names, lambda name, rows: self.token_adapter(rows, [name] if name in deltas else []))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or name == "token_adapter":
                raise
            if name == "weight":  # as PEFT: hosts read `embed_tokens.weight` (dtype, tying)
                return self.token_adapter.merged_weight(self._running())
            return getattr(self.token_adapter.base_layer, name)


def tied_output(model: nn.Module, embedding: nn.Module) -> str | None:
    """The path of the output embedding tied to `embedding`, which PEFT wraps with a tied adapter."""
    config = getattr(model, "config", None)
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output) or not getattr(config, "tie_word_embeddings", False):
        return None
    try:
        out = get_output()
    except NotImplementedError:
        return None
    if out is None or getattr(out, "weight", None) is not getattr(embedding, "weight", False):
        return None
    return next((p for p, m in model.named_modules() if m is out), None)
