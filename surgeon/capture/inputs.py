"""Example inputs synthesized from a model's config and forward signature.

Capture needs one call of the model to trace. Hugging Face models say what they take in their
config (vocabulary, image size, mel bins) and their forward signature (`decoder_input_ids`,
`pixel_values`, `input_features`), so shapes can be made up without the user's help. Values
never matter: capture runs on the meta device, where tensors have shapes and no data.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Token count of synthesized text inputs: small, but longer than any tiny model's window or
# conv stride so that no code path is skipped for short inputs.
SEQ_LEN = 8


@dataclass(frozen=True)
class ExampleInputs:
    """One forward call: positional tensors, keyword tensors, constant keyword options."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: tuple[tuple[str, torch.Tensor], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # non-tensor keywords passed as they are

    def flat(self) -> tuple[torch.Tensor, ...]:
        """Every tensor, positional first: what the export wrapper takes."""
        return (*self.args, *(t for _, t in self.kwargs))

    def names(self) -> tuple[str, ...]:
        """How each tensor of `flat()` is passed: `args[i]` or its keyword."""
        return (*(f"args[{i}]" for i in range(len(self.args))), *(k for k, _ in self.kwargs))

    def split(self, flat: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """`flat` back into (args, kwargs) for calling the model, options included."""
        n = len(self.args)
        names = (name for name, _ in self.kwargs)
        return tuple(flat[:n]), {**dict(zip(names, flat[n:])), **dict(self.options)}

    def to(self, device: torch.device | str) -> ExampleInputs:
        """The same inputs as empty tensors on `device` (shapes and dtypes kept)."""
        args = tuple(_empty_like(t, device) for t in self.args)
        kwargs = tuple((k, _empty_like(t, device)) for k, t in self.kwargs)
        return ExampleInputs(args, kwargs, self.options)


def _empty_like(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=device)


def forward_parameters(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's forward parameters, in order."""
    return tuple(inspect.signature(model.forward).parameters)


def synthesize_inputs(model: nn.Module, device: torch.device | str = "meta") -> ExampleInputs | None:
    """Inputs for a transformers model built from its config; None for other modules.

    Text models get `input_ids` (and `decoder_input_ids` when encoder-decoder), vision models
    `pixel_values`, speech models `input_features`. Every model that takes `use_cache` gets
    `use_cache=False`, so no cache object enters the traced graph.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    params = forward_parameters(model)
    found: dict[str, torch.Tensor] = {}
    if "input_ids" in params:
        found["input_ids"] = torch.zeros(1, _text_length(config), dtype=torch.long, device=device)
    if "pixel_values" in params:
        found["pixel_values"] = _pixels(config, device)
    if "input_features" in params:
        found["input_features"] = _features(config, device)
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
        found["decoder_input_ids"] = torch.zeros(1, SEQ_LEN, dtype=torch.long, device=device)
    if not found:
        return None
    options = (("use_cache", False),) if "use_cache" in params else ()
    return ExampleInputs((), tuple(found.items()), options)


def _text_length(config: Any) -> int:
    """SEQ_LEN tokens, plus room for the image tokens a vision-language model expects."""
    return SEQ_LEN + int(getattr(config, "num_query_tokens", 0) or 0)


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def _pixels(config: Any, device: torch.device | str) -> torch.Tensor:
    vision = _vision_config(config)
    size = getattr(vision, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(vision, "num_channels", 3)
    return torch.zeros(1, channels, height, width, device=device)


def _features(config: Any, device: torch.device | str) -> torch.Tensor:
    """Whisper-style log-mel frames: the encoder's two convs halve `2 * max_source_positions`."""
    frames = 2 * getattr(config, "max_source_positions", SEQ_LEN)
    return torch.zeros(1, getattr(config, "num_mel_bins", 80), frames, device=device)
