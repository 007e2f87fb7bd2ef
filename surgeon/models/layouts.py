"""Other layouts of a synthesized input, read from the layer that consumes it.

Configs name an input's width under many keys, or not at all (an audio tower's mel count often
lives only in its feature extractor), but the first layer that reads the input cannot be wrong
about it. The first reader is the first Linear or convolution of the tower the input feeds, in
registration order (input layers are registered first): a Conv1d reads (batch, channels,
frames), a Conv2d a spectrogram as an image (CLAP), a Linear the last dimension. Vision towers that take flattened patches
(Qwen-VL-style `pixel_values` of shape (patches, channels x patch x patch)) read them with a
Linear too. A video clip (batch, frames, ...) may also be wanted as a batch of frames.

The forward's docstring gives a layout too where it is not an image's (Hunyuan-VL's flattened
patches, Dia's codebook ids: surgeon.models.documented). Last come layouts no layer or docstring
states: mels first or unbatched, the usual mel counts (80, 128), a mono channel, a larger image,
channels-last patch cubes, patches cut out flat or as small images.

The variants are tried after the config's guess, never instead of it: Speech2Text takes
(batch, frames, features) and transposes before its first Conv1d.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgeon.models.documented import documented_dims, size_of

FRAMES = 32  # audio frames of a synthesized spectrogram (synthesize: 4 x SEQ_LEN)
SAMPLES = 3200  # raw audio samples (synthesize's AUDIO_SAMPLES: 0.2 s at 16 kHz)
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


def audio_frames(config: Any) -> int:
    """Frames of a synthesized spectrogram: FRAMES, rounded up to whole attention chunks where
    the audio config sets `n_window` (Qwen-ASR chunks its frames by 2 x n_window)."""
    window = getattr(config, "n_window", None)
    chunk = 2 * window if isinstance(window, int) and window > 0 else 1
    return -(-FRAMES // chunk) * chunk


def merge_size(config: Any) -> int:
    """Patches merged (or pooled) along each side: a synthesized grid's rows and cols are twice it."""
    merge = getattr(config, "spatial_merge_size", None) or getattr(config, "pooling_kernel_size", None)
    return int(merge) if isinstance(merge, int) and merge > 0 else 1


def variants(model: nn.Module, inputs: Inputs) -> list[Inputs]:
    """Calls like `inputs` with one input in another layout, most plausible first; no repeats."""
    found: list[Inputs] = []
    seen = {_shapes(inputs)}
    for i, (name, tensor) in enumerate(inputs):
        if not isinstance(tensor, torch.Tensor):
            continue  # a list of feature maps: no other layout
        for other in _layouts(model, name, tensor):
            call = (*inputs[:i], (name, other), *inputs[i + 1:])
            if _shapes(call) not in seen:
                seen.add(_shapes(call))
                found.append(call)
    return found


def _documented(model: nn.Module, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """`name` in the shape the forward's docstring gives it, where that shape is not an image's
    (Hunyuan-VL documents `pixel_values` as `(num_patches, num_channels * patch_size * patch_size)`,
    Unlimited-OCR `patch_embeds` as `(batch_size, hidden_size, grid_height, grid_width)`, Dia its
    `input_ids` as `(batch_size, sequence_length, num_codebooks)`)."""
    dims = documented_dims(model, name)
    if not dims:
        return []
    if dims[1:] in (["num_channels", "image_size", "image_size"], ["num_channels", "height", "width"]):
        return []  # the generic image docstring, what the config's guess already made
    if tensor.is_floating_point():
        config = _tower_config(model, "vision")
        known = _grid_sizes(config)
    else:
        config = getattr(model, "config", None)
        # Inkling's audio ids: `(num_audios, max_num_frames, n_mel_bins)`, one id per mel bin
        known = {"batch_size": 1, "num_audios": 1, "sequence_length": tensor.shape[-1],
                 "max_num_frames": tensor.shape[-1], "target_sequence_length": tensor.shape[-1],
                 # Dia documents `num_codebooks` and configures them as audio `num_channels`
                 "num_codebooks": _codebooks(config) or _codebooks(getattr(config, "decoder_config", None))}
    sizes = [size_of(config, d, known) for d in dims]
    return [tensor.new_zeros(sizes)] if all(isinstance(n, int) and n > 0 for n in sizes) else []


def _codebooks(config: Any) -> int | None:
    return getattr(config, "num_codebooks", None) or getattr(config, "num_channels", None)


def _grid_sizes(config: Any) -> dict[str, Any]:
    """Names a vision docstring sizes patches by, for synthesize's (1, 2m, 2m) patch grid."""
    rows = 2 * merge_size(config)
    channels = getattr(config, "num_channels", None) or 3
    return {"batch_size": 1, "num_images": 1, "patch_size": getattr(config, "patch_size", None) or 16,
            "grid_height": rows, "grid_width": rows, "num_patches": rows * rows,
            "num_image_tokens": rows * rows,  # Inkling 2: the grid counted in merged tokens
            "sequence_length": rows * rows, "num_channels": channels, "image_channels": channels}


def _shapes(inputs: Inputs) -> tuple:
    return tuple((name, tuple(t.shape) if isinstance(t, torch.Tensor) else len(t)) for name, t in inputs)


def _layouts(model: nn.Module, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    if name == "input_features" and tensor.dim() == 3 and tensor.shape[0] == 1:
        # Mels first (Qwen-ASR reads them through a Conv2d after a Linear is registered), and
        # unbatched (mels, frames): Qwen-Omni's audio encoder takes one clip's frames, last
        return _reader_layouts(model, name, tensor) + [tensor.transpose(1, 2), tensor[0]] \
            + _usual_mel_counts(tensor)
    if name in ("pixel_values", "pixel_values_videos") and tensor.dim() == 5:
        return [tensor.flatten(0, 1)]  # a clip as a batch of frames (X-CLIP's vision tower)
    if name == "input_values" and tensor.dim() == 2:  # mono samples with their channel (X-Codec)
        return _reader_layouts(model, name, tensor) + [tensor.unsqueeze(1)]
    if name == "pixel_values" and tensor.dim() == 4:  # images per sample: Idefics' one, SuperGlue's pair
        images = [tensor.unsqueeze(1), tensor.unsqueeze(1).expand(-1, 2, -1, -1, -1).contiguous()]
        # Last, an image twice as large: a deep conv stack (PP-OCRv5's text recogniser pools
        # after a 32x downsampling) needs more than the default 64 x 64 where no size is set
        larger = tensor.new_zeros(*tensor.shape[:2], 2 * tensor.shape[2], 2 * tensor.shape[3])
        return images + _reader_layouts(model, name, tensor) + [larger] + _patch_cubes(model, tensor) \
            + _flat_patches(model, tensor)
    return _reader_layouts(model, name, tensor)


# Mel counts of the usual feature extractors (Whisper's 80; 128 for Whisper v3 and most newer
# ones): the count some towers fix only in their code or a sub-config no key names (Gemma 4's
# audio tower reads `subsampling_conv_channels[0]` mels, Nemotron's its ASR config's).
_USUAL_MELS = (128, 80)


def _usual_mel_counts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Frames-last log-mels (batch, frames, mels) with each usual mel count the guess did not use."""
    return [tensor.new_zeros(*tensor.shape[:-1], mels) for mels in _USUAL_MELS if mels != tensor.shape[-1]]


def _reader_layouts(model: nn.Module, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    return _documented(model, name, tensor) + _first_read_layouts(model, name, tensor)


def _first_read_layouts(model: nn.Module, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
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
    if isinstance(layer, nn.Conv1d) and layer.in_channels == 1 and name == "hidden_states":
        # Raw mono samples under another name (VibeVoice's acoustic tokenizer): a waveform
        return [new(1, 1, SAMPLES)]
    if isinstance(layer, nn.Conv1d) and name != "pixel_values":
        # The frame count stays: a (batch, frames, features) guess has FRAMES rows (masks match it).
        audio = _tower_config(model, "audio")
        frames = tensor.shape[1] if tensor.shape[1] in (FRAMES, audio_frames(audio)) \
            or tensor.shape[-1] == layer.in_channels else tensor.shape[-1]
        return [new(1, layer.in_channels, frames)]
    if isinstance(layer, nn.Conv2d) and name == "input_features" and tensor.dim() == 3:
        # CLAP: spectrogram images; Dots3: (chunks, mels, frames), unsqueezed to one channel
        return [new(1, layer.in_channels, *tensor.shape[1:]), tensor.transpose(1, 2).contiguous()]
    if isinstance(layer, nn.Conv2d) and name == "hidden_states":
        # An image under another name (PP-OCRv5's detector, Florence's DaViT: a Conv2d(3, ...) first)
        side = _image_side(_tower_config(model, "vision"))
        return [new(1, layer.in_channels, side, side)]
    if not isinstance(layer, nn.Linear):
        return []
    rows = _patch_rows(model)
    if name == "flattened_patches":  # Pix2Struct: each patch led by its row and column
        return [new(1, rows, layer.in_features + 2), new(1, rows, layer.in_features)]
    if name == "pixel_values":  # (patches, features), or one image's
        return [new(rows, layer.in_features), new(1, rows, layer.in_features)]
    if name == "hidden_states":  # or flattened patches, a row each, beside their grid (ERNIE-VL's)
        return [new(*tensor.shape[:-1], layer.in_features), new(rows, layer.in_features)]
    return [new(1, FRAMES, layer.in_features)]


def _image_side(config: Any) -> int:
    """The side of the config's square `image_size` (64, synthesize's default, without one)."""
    size = getattr(config, "image_size", None)
    size = size[0] if isinstance(size, list | tuple) and size else size
    return size if isinstance(size, int) and 0 < size <= 1024 else 64


def _flat_patches(model: nn.Module, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Patches cut out where no Linear reads them first (a conv patch embedding after a view):
    the (1, 2m, 2m) grid's rows of channels x [frames x] patch x patch values (Dots3's tower
    views them as (-1, 3, 14, 14)), the same rows as small images (Kimi-K2.5's), and one image's
    patches at the configured image size (Molmo 2's, one learned position each)."""
    config = _tower_config(model, "vision")
    patch = getattr(config, "patch_size", None)
    if not isinstance(patch, int) or patch <= 0:
        return []
    frames = getattr(config, "temporal_patch_size", None)
    channels, rows = tensor.shape[1], _patch_rows(model)
    width = channels * (frames if isinstance(frames, int) else 1) * patch * patch
    side = max(1, _image_side(config) // patch)
    return [tensor.new_zeros(rows, width), tensor.new_zeros(rows, channels, patch, patch),
            tensor.new_zeros(1, side * side, width)]


def _patch_cubes(model: nn.Module, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Unflattened channels-last patches (patches, frames, patch, patch, channels) where the vision
    config sets a temporal patch size: Inkling's tower folds them layer by layer."""
    config = _tower_config(model, "vision")
    frames, patch = getattr(config, "temporal_patch_size", None), getattr(config, "patch_size", None)
    if not (isinstance(frames, int) and isinstance(patch, int)):
        return []
    return [tensor.new_zeros(_patch_rows(model), frames, patch, patch, tensor.shape[1])]


def _patch_rows(model: nn.Module) -> int:
    """Patches of a (1, 2m, 2m) grid, m the spatial merge size (as synthesize's `image_grid_thw`)."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None) or config
    merge = merge_size(vision)
    return 4 * merge * merge


def _tower_config(model: nn.Module, kind: str) -> Any:
    """The model's `kind` sub-config, or its own config when it has none."""
    config = getattr(model, "config", None)
    return next((getattr(config, n) for n in _TOWERS.get(kind, ()) if getattr(config, n, None) is not None),
                config)


def _tower(model: nn.Module, kind: str) -> nn.Module:
    """The submodule built from the model's `kind` sub-config (the model itself when it has none)."""
    config = getattr(model, "config", None)
    sub = _tower_config(model, kind)
    if sub is None or sub is config:
        return model
    return next((m for m in model.modules()
                 if m is not model and isinstance(getattr(m, "config", None), type(sub))), model)


def _first_reader(module: nn.Module) -> Any:
    return next((m for m in module.modules() if isinstance(m, _READERS)), None)
