"""Inputs made up from a transformers model's forward signature and config.

Every input kind transformers uses has a maker here, keyed by the forward parameter's name:
text (`input_ids`, `decoder_input_ids`, `bbox`), images (`pixel_values` in the tower's size,
with grid/size metadata when required), audio (`input_values` as raw samples or spectrogram,
`input_features` as log-mel frames), hidden states (`encoder_hidden_states` for a decoder
loaded alone, `inputs_embeds` or `query_embeds` for towers that take no ids) and masks.
A parameter is filled when the forward requires it, or when it is one of the inputs that
decide which code runs (a decoder's cross-attention is dead without its encoder states).

`input_candidates` returns the calls to try, most complete first: a vision-language (or audio-
language) model is tried with pixels (audio) and text, then with text alone (its tower is then
captured on its own, surgeon.capture.towers). After each call come its variants with one input
in another layout, read from the layer that consumes it (surgeon.models.layouts): configs often
do not say whether a spectrogram is mels-first or how wide a flattened patch is, the first
layer does. `missing_inputs` names the required inputs no maker knows, for errors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgeon.capture.inputs import ExampleInputs
from surgeon.models.layouts import variants

# Token count of synthesized text inputs: small, but longer than any tiny model's window or
# conv stride so that no code path is skipped for short inputs.
SEQ_LEN = 8
AUDIO_SAMPLES = 3200  # 0.2 s at 16 kHz: a dozen frames after wav2vec2's 320x conv stride
Maker = Callable[[Any, "str | torch.device"], "torch.Tensor | None"]


def _ids(length: int) -> Maker:
    return lambda config, device: torch.zeros(1, length, dtype=torch.long, device=device)


def _text_length(config: Any) -> int:
    """SEQ_LEN tokens, plus room for the query tokens a BLIP-2-style model prepends."""
    return SEQ_LEN + int(getattr(config, "num_query_tokens", 0) or 0)


def _input_ids(config: Any, device: Any) -> torch.Tensor:
    """One row of tokens; a codebook decoder loaded alone (MusicGen's) takes one row per codebook."""
    codebooks = getattr(config, "num_codebooks", None)
    rows = codebooks if isinstance(codebooks, int) and config.model_type.endswith("_decoder") else 1
    return torch.zeros(rows, _text_length(config), dtype=torch.long, device=device)


def _sub(config: Any, name: str) -> Any:
    """The sub-config of a tower (`vision_config`; audio under any of its usual names)."""
    names = {"audio_config": (name, "encoder_config", "speech_config"),
             "vision_config": (name, "backbone_config")}.get(name, (name,))  # ViTPose: a ViT backbone
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), config)


def _size(value: Any, default: int = 64) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, list | tuple) and len(value) >= 2:
        return int(value[-2]), int(value[-1])
    if isinstance(value, dict):
        return int(value.get("height", default)), int(value.get("width", default))
    return default, default


def _pixels(config: Any, device: Any) -> torch.Tensor:
    """An image, or a clip of `num_frames` images for a video tower (VideoMAE, TimeSformer)."""
    vision = _sub(config, "vision_config")
    height, width = _size(getattr(vision, "image_size", None) or getattr(vision, "input_size", None))
    channels = getattr(vision, "num_channels", None) or 3
    frames = getattr(vision, "num_frames", None)
    if isinstance(frames, int) and frames > 0:
        return torch.zeros(1, frames, channels, height, width, device=device)
    return torch.zeros(1, channels, height, width, device=device)


def _video(config: Any, device: Any) -> torch.Tensor:
    """`pixel_values_videos`: a clip (batch, frames, channels, height, width), 2 frames by default."""
    pixels = _pixels(config, device)
    return pixels if pixels.dim() == 5 else pixels.unsqueeze(1).expand(-1, 2, -1, -1, -1).contiguous()


def _image_sizes(config: Any, device: Any) -> torch.Tensor:
    height, width = _pixels(config, "meta").shape[-2:]
    return torch.tensor([[height, width]], device=device)


def _input_values(config: Any, device: Any) -> torch.Tensor:
    """Raw audio (wav2vec2), multi-channel audio (EnCodec), or a spectrogram (AST)."""
    audio = _sub(config, "audio_config")
    if getattr(audio, "max_length", None) and getattr(audio, "num_mel_bins", None):
        return torch.zeros(1, audio.max_length, audio.num_mel_bins, device=device)
    channels = getattr(audio, "audio_channels", None)
    if channels:
        return torch.zeros(1, channels, AUDIO_SAMPLES, device=device)
    return torch.zeros(1, AUDIO_SAMPLES, device=device)


def _input_features(config: Any, device: Any) -> torch.Tensor:
    """Log-mel frames: Whisper's (batch, mels, 2 x positions) or Speech2Text's (batch, frames, feats)."""
    audio = _sub(config, "audio_config")
    mels = getattr(audio, "num_mel_bins", None)
    positions = getattr(audio, "max_source_positions", None)
    if mels and positions and not getattr(audio, "input_feat_per_channel", None):
        return torch.zeros(1, mels, 2 * positions, device=device)
    per_channel = getattr(audio, "input_feat_per_channel", None)
    features = (per_channel * getattr(audio, "input_channels", 1) if per_channel
                else getattr(audio, "feature_size", None) or getattr(audio, "feature_projection_input_dim", None)
                or mels or 80)
    return torch.zeros(1, 4 * SEQ_LEN, features, device=device)


def _frames_mask(config: Any, device: Any) -> torch.Tensor:
    """Every frame of `_input_features` valid (in either layout the frames count is the same)."""
    audio = _sub(config, "audio_config")
    positions = getattr(audio, "max_source_positions", None)
    whisper = getattr(audio, "num_mel_bins", None) and positions and not getattr(audio, "input_feat_per_channel", None)
    return torch.ones(1, 2 * positions if whisper else 4 * SEQ_LEN, dtype=torch.long, device=device)


def _hidden(config: Any) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim", "embed_dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return 64


def _encoder_states(config: Any, device: Any) -> torch.Tensor:
    width = getattr(config, "encoder_hidden_size", None) or getattr(config, "cross_attention_hidden_size", None)
    return torch.zeros(1, SEQ_LEN, width or _hidden(config), device=device)


def _embeds(config: Any, device: Any) -> torch.Tensor:
    return torch.zeros(1, SEQ_LEN, _hidden(config), device=device)


def _query_embeds(config: Any, device: Any) -> torch.Tensor:
    return torch.zeros(1, int(getattr(config, "num_query_tokens", 0) or 4), _hidden(config), device=device)


def _grid(config: Any) -> tuple[int, int, int]:
    """A patch grid (frames, rows, cols) whose rows and cols the tower's patch merger divides."""
    merge = int(getattr(config, "spatial_merge_size", 1) or 1)
    return 1, 2 * merge, 2 * merge


def _grid_thw(config: Any, device: Any) -> torch.Tensor:
    return torch.tensor([_grid(config)], dtype=torch.long, device=device)


def _hidden_states(config: Any, device: Any) -> torch.Tensor:
    """A tower fed by another: flattened patches for a Qwen-VL-style vision tower (one row per
    patch of `_grid`), otherwise hidden states of its width."""
    patch = getattr(config, "patch_size", None)
    if patch and getattr(config, "temporal_patch_size", None):
        t, h, w = _grid(config)
        channels = getattr(config, "in_channels", None) or getattr(config, "in_chans", None) or 3
        width = channels * config.temporal_patch_size * patch * patch
        return torch.zeros(t * h * w, width, device=device)
    return _embeds(config, device)


def _spectrogram(config: Any, device: Any) -> torch.Tensor:
    return torch.zeros(1, 4 * SEQ_LEN, getattr(config, "num_mel_bins", None) or 80, device=device)


def _audio_mel(config: Any, device: Any) -> torch.Tensor:
    audio = _sub(config, "audio_config")
    width = getattr(audio, "input_feat_size", None) or getattr(audio, "num_mel_bins", None) or 80
    return torch.zeros(1, 4 * SEQ_LEN, width, device=device)


def _series(config: Any, device: Any) -> torch.Tensor:
    """A time series (PatchTST, TimesFM): the whole context window, one column per channel; the
    window is what the patching and position tables are sized for."""
    length = int(getattr(config, "context_length", None) or 4 * SEQ_LEN)
    channels = getattr(config, "num_input_channels", None)
    shape = (1, length, channels) if channels else (1, length)
    return torch.zeros(shape, device=device)


def _series_padding(config: Any, device: Any) -> torch.Tensor:
    return torch.zeros(_series(config, "meta").shape[:2], dtype=torch.long, device=device)


def _patch_grid(config: Any, device: Any) -> torch.Tensor:
    """NaFlex `spatial_shapes`: the (rows, cols) patch grid of flattened-patch `pixel_values`
    (surgeon.models.layouts makes those with `_grid`'s rows x cols patches)."""
    _, rows, cols = _grid(_sub(config, "vision_config"))
    return torch.tensor([[rows, cols]], dtype=torch.long, device=device)


def _patch_mask(config: Any, device: Any) -> torch.Tensor:
    rows, cols = _patch_grid(config, "cpu")[0].tolist()
    return torch.ones(1, rows * cols, dtype=torch.long, device=device)


def _patch_positions(config: Any, device: Any) -> torch.Tensor:
    """(row, col) of every patch of `_patch_grid`, in row-major order."""
    rows, cols = _patch_grid(config, "cpu")[0].tolist()
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
    return grid.reshape(1, rows * cols, 2).to(device)


# Parameter name -> maker. Order is the order inputs are passed in.
MAKERS: dict[str, Maker] = {
    "input_ids": _input_ids,
    "bbox": lambda config, device: torch.zeros(1, _text_length(config), 4, dtype=torch.long, device=device),
    "pixel_values": _pixels,
    "image": _pixels,
    "images": _pixels,
    "image_sizes": _image_sizes,
    "pixel_values_videos": _video,
    "input_values": _input_values,
    "input_features": _input_features,
    "input_features_mask": _frames_mask,
    "feature_attention_mask": _frames_mask,
    "decoder_input_ids": _ids(SEQ_LEN),
    "encoder_hidden_states": _encoder_states,
    "query_embeds": _query_embeds,
    "inputs_embeds": _embeds,
    "hidden_states": _hidden_states,
    "patch_embeds": _embeds,
    "grid_thw": _grid_thw,
    "image_grid_thw": _grid_thw,
    "spectrogram": _spectrogram,
    "mel_spectrogram": _spectrogram,
    "past_values": _series,
    "past_values_padding": _series_padding,
    "freq": lambda config, device: torch.zeros(1, 1, dtype=torch.long, device=device),
    "spatial_shapes": _patch_grid,
    "pixel_attention_mask": _patch_mask,
    "pixel_position_ids": _patch_positions,
    # Second inputs some architectures require beside their main one.
    "qformer_input_ids": _ids(SEQ_LEN),  # InstructBLIP's Q-Former reads the prompt too
    "task_inputs": lambda config, device: _ids(int(getattr(config, "task_seq_len", SEQ_LEN)))(config, device),
    "prompt_pixel_values": _pixels,  # SegGPT: a prompt image and its mask, as big as the input
    "prompt_masks": _pixels,
    "merge_sizes": lambda config, device: torch.tensor(
        [int(getattr(_sub(config, "vision_config"), "spatial_merge_size", 1) or 1)], device=device),
    # Towers loaded alone, under their own input names.
    "flattened_patches": _embeds,  # Pix2Struct: its width is read from its patch projection
    "audio_mel": _audio_mel,  # Gemma 3n's audio encoder: frames and their padding mask
    "audio_mel_mask": lambda config, device: torch.zeros(1, 4 * SEQ_LEN, dtype=torch.bool, device=device),
    "context": _embeds,  # a perceiver resampler's media embeddings
    "inputs": _embeds,  # Perceiver without a preprocessor
    "audio_input_ids": _ids(SEQ_LEN),
    "attention_mask": lambda config, device: torch.ones(1, SEQ_LEN, dtype=torch.long, device=device),
}
# Optional inputs worth passing: each decides whether a part of the model runs at all.
_WANTED = ("input_ids", "bbox", "pixel_values", "input_values", "input_features", "flattened_patches")
# Mask -> the input it masks: passed with that input, left out without it.
_MASKS = {"input_features_mask": "input_features", "feature_attention_mask": "input_features"}
# Pixels or audio beside text: tried first, then text alone (media tokens must match features).
_MODALITIES = ("pixel_values", "image", "images", "image_sizes", "input_features", "input_values")


def input_candidates(model: nn.Module, device: torch.device | str = "meta") -> list[ExampleInputs]:
    """The calls worth trying for a transformers model, most complete first; [] for others."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    params = _parameters(model)
    names = [n for n in MAKERS if n in params and _wanted(n, params, config, model)]
    if not names:
        return []
    options = (("use_cache", False),) if "use_cache" in params else ()
    calls = [names]
    optional = [n for n in _MODALITIES if n in names and not params[n]]
    if "input_ids" in names and optional:
        calls.append([n for n in names if n not in optional])
    if "input_values" in names and "input_features" in names and not params["input_features"]:
        calls += [[n for n in call if n != "input_features"] for call in list(calls)]  # either audio form
    if "encoder_hidden_states" in names and not params["encoder_hidden_states"]:
        calls += [[n for n in call if n != "encoder_hidden_states"] for call in list(calls)]
    found = []
    for call in calls:
        call = [n for n in call if _MASKS.get(n, n) in call]
        tensors = tuple((n, t) for n in call if (t := MAKERS[n](config, device)) is not None)
        found += [ExampleInputs((), kwargs, options) for kwargs in (tensors, *variants(model, tensors))]
    return found


def synthesize_inputs(model: nn.Module, device: torch.device | str = "meta") -> ExampleInputs | None:
    """The most complete call `input_candidates` finds, or None."""
    found = input_candidates(model, device)
    return found[0] if found else None


def missing_inputs(model: nn.Module) -> tuple[str, ...]:
    """Required forward parameters no maker knows how to make (named in capture errors)."""
    params = _parameters(model)
    return tuple(n for n, required in params.items() if required and n not in MAKERS)


def _parameters(model: nn.Module) -> dict[str, bool]:
    """Forward parameter name -> whether it is required (no default, not *args/**kwargs)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name: p.default is inspect.Parameter.empty for p in params if p.kind not in variadic}


def _wanted(name: str, params: dict[str, bool], config: Any, model: nn.Module) -> bool:
    if params[name]:
        return True
    if name in _WANTED:
        return True
    if name in _MASKS:
        return _MASKS[name] in params
    if name in ("spatial_shapes", "pixel_attention_mask"):  # NaFlex (SigLIP 2): patches need their grid
        return "spatial_shapes" in params and "pixel_values" in params
    if name == "decoder_input_ids":
        return bool(getattr(config, "is_encoder_decoder", False))
    if name == "encoder_hidden_states":
        return _decoder_alone(config, model)
    if name in ("inputs_embeds", "query_embeds", "pixel_values_videos"):  # a tower fed by another tower
        return not any(n in params for n in ("input_ids", *_WANTED))
    if name == "image_sizes":
        return "pixel_values" in params and "image_sizes" in params and params["image_sizes"]
    return False


def _decoder_alone(config: Any, model: nn.Module) -> bool:
    """A decoder (or a Q-Former) loaded without its encoder: its cross-attention runs only when
    given the encoder's states. The config says so where it can (`add_cross_attention`: GPT-2
    refuses the states without it); otherwise the states are tried first, then left out."""
    if "decoder_input_ids" in _parameters(model):
        return False
    return bool(getattr(config, "add_cross_attention", True))
