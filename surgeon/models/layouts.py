"""Other layouts of a synthesized input, read from the layer that consumes it.

Configs name an input's width under many keys, or not at all (an audio tower's mel count often
lives only in its feature extractor), but the first layer that reads the input cannot be wrong
about it. The first reader is the first Linear or convolution of the tower the input feeds, in
registration order (input layers are registered first): a Conv1d reads (batch, channels,
frames), a Conv2d a spectrogram as an image (CLAP), a Linear the last dimension. Vision towers that take flattened patches
(Qwen-VL-style `pixel_values` of shape (patches, channels x patch x patch)) read them with a
Linear too. A video clip (batch, frames, ...) may also be wanted as a batch of frames.

The variants are tried after the config's guess, never instead of it: Speech2Text takes
(batch, frames, features) and transposes before its first Conv1d.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FRAMES = 32  # audio frames of a synthesized spectrogram (synthesize: 4 x SEQ_LEN)
_TOWERS = {
    "audio": ("audio_config", "encoder_config", "speech_config"),
    "vision": ("vision_config",),
}
# Input name -> the tower that reads it ("" for the model itself).
_READ_BY = {
    "input_features": "audio", "spectrogram": "audio", "mel_spectrogram": "audio", "input_values": "audio",
    "hidden_states": "", "pixel_values": "vision", "flattened_patches": "vision", "audio_mel": "audio",
}
_READERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Inputs = tuple[tuple[str, torch.Tensor], ...]


def variants(model: nn.Module, inputs: Inputs) -> list[Inputs]:
    """Calls like `inputs` with one input in another layout, most plausible first; no repeats."""
    found: list[Inputs] = []
    seen = {_shapes(inputs)}
    for i, (name, tensor) in enumerate(inputs):
        for other in _layouts(model, name, tensor):
            call = (*inputs[:i], (name, other), *inputs[i + 1:])
            if _shapes(call) not in seen:
                seen.add(_shapes(call))
                found.append(call)
    return found


def _shapes(inputs: Inputs) -> tuple:
    return tuple((name, tuple(t.shape)) for name, t in inputs)


def _layouts(model: nn.Module, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    if name in ("pixel_values", "pixel_values_videos") and tensor.dim() == 5:
        return [tensor.flatten(0, 1)]  # a clip as a batch of frames (X-CLIP's vision tower)
    if name == "pixel_values" and tensor.dim() == 4:  # images per sample: Idefics' one, SuperGlue's pair
        images = [tensor.unsqueeze(1), tensor.unsqueeze(1).expand(-1, 2, -1, -1, -1).contiguous()]
        return images + _reader_layouts(model, name, tensor)
    return _reader_layouts(model, name, tensor)


def _reader_layouts(model: nn.Module, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    tower = _READ_BY.get(name)
    if tower is None or not tensor.is_floating_point():
        return []
    readers = [_first_reader(_tower(model, tower)), _first_reader(model)]
    return [t for r in dict.fromkeys(r for r in readers if r is not None)
            for t in _read_by(r, name, tensor, model)]


def _read_by(layer: nn.Module, name: str, tensor: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """`tensor` reshaped for `layer`: channels-first for a Conv1d, last dimension for a Linear."""
    new = tensor.new_zeros
    if name == "input_values":  # raw samples: (batch, channels, samples) for a codec's first conv
        return [new(1, layer.in_channels, tensor.shape[-1])] if isinstance(layer, nn.Conv1d) else []
    if isinstance(layer, nn.Conv1d) and name != "pixel_values":
        # The frame count stays: a (batch, frames, features) guess has FRAMES rows (masks match it).
        return [new(1, layer.in_channels, FRAMES if tensor.shape[1] == FRAMES else tensor.shape[-1])]
    if isinstance(layer, nn.Conv2d) and name == "input_features" and tensor.dim() == 3:
        return [new(1, layer.in_channels, *tensor.shape[1:])]  # CLAP: spectrogram images
    if not isinstance(layer, nn.Linear):
        return []
    rows = _patch_rows(model)
    if name == "flattened_patches":  # Pix2Struct: each patch led by its row and column
        return [new(1, rows, layer.in_features + 2), new(1, rows, layer.in_features)]
    if name == "pixel_values":  # (patches, features), or one image's
        return [new(rows, layer.in_features), new(1, rows, layer.in_features)]
    if name == "hidden_states":
        return [new(*tensor.shape[:-1], layer.in_features)]
    return [new(1, FRAMES, layer.in_features)]


def _patch_rows(model: nn.Module) -> int:
    """Patches of a (1, 2m, 2m) grid, m the spatial merge size (as synthesize's `image_grid_thw`)."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None) or config
    merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
    return 4 * merge * merge


def _tower(model: nn.Module, kind: str) -> nn.Module:
    """The submodule built from the model's `kind` sub-config (the model itself when it has none)."""
    config = getattr(model, "config", None)
    sub = next((getattr(config, n) for n in _TOWERS.get(kind, ()) if getattr(config, n, None) is not None),
               None)
    if sub is None or sub is config:
        return model
    return next((m for m in model.modules()
                 if m is not model and isinstance(getattr(m, "config", None), type(sub))), model)


def _first_reader(module: nn.Module) -> Any:
    return next((m for m in module.modules() if isinstance(m, _READERS)), None)
