"""Inputs sized by another input of the same call (surgeon.capture.synthesize makes them last).

Some inputs only make sense beside another: the mel lengths of the frames passed (Qwen-Omni's
`feature_lens`), the patch grid of the pixels (MiniCPM-V's `target_sizes`), the tiles of an
image (Mllama's aspect ratios), position encodings shaped like the features (SAM 3). Each maker
reads the inputs already made for the call, after their layout variants, so it matches the
layout actually tried. A maker returns None where the call's inputs give it nothing to go by.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _frames_of(made: dict[str, torch.Tensor]) -> int:
    """Frames of synthesized log-mels in the frames-last layout (Whisper's, Qwen-Omni's 2-D one)."""
    return int(made["input_features"].shape[-1])


def _feature_lens(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor:
    """Qwen-Omni audio: the mel length of each clip, all frames valid."""
    return torch.full((1,), _frames_of(made), dtype=torch.long, device=made["input_features"].device)


def _chunk_sample_lengths(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor:
    """Waveform samples behind each chunk of log-mels: frames x hop length, every chunk full."""
    features = made["input_features"]
    samples = _frames_of(made) * int(getattr(config, "hop_length", None) or 160)
    return torch.full((features.shape[0],), samples, dtype=torch.long, device=features.device)


def _aspect_ratio_ids(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mllama: every image its first supported aspect ratio (id 1, 0 is padding)."""
    pixels = made["pixel_values"]
    return torch.ones(pixels.shape[:2], dtype=torch.long, device=pixels.device)


def _aspect_ratio_mask(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mllama: every tile of every image valid."""
    pixels = made["pixel_values"]
    return torch.ones(pixels.shape[:3], dtype=torch.long, device=pixels.device)


def _target_sizes(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor:
    """MiniCPM-V's tower: the (rows, cols) patch grid of each image."""
    pixels = made["pixel_values"]
    patch = int(getattr(config, "patch_size", None) or 14)
    grid = [pixels.shape[-2] // patch, pixels.shape[-1] // patch]
    return torch.tensor([grid] * pixels.shape[0], dtype=torch.int32, device=pixels.device)


def _positions_like(config: Any, made: dict[str, Any]) -> Any:
    """Position encodings of SAM 3's vision features: the same shapes (a list for a list)."""
    features = made["vision_features"]
    if isinstance(features, list):
        return [torch.zeros_like(f) for f in features]
    return torch.zeros_like(features)


def _camera_mask(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """PI0: which of the images of each sample (one per camera) are present, all of them."""
    pixels = made["pixel_values"]
    return torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device) if pixels.dim() == 5 else None


def _image_attention_mask(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """IDEFICS: which images each token attends to (batch, tokens, images), all of them; only for
    pixels given as images per sample (batch, images, channels, height, width)."""
    pixels, ids = made["pixel_values"], made["input_ids"]
    if pixels.dim() != 5:
        return None
    return torch.ones(*ids.shape, pixels.shape[1], dtype=torch.long, device=ids.device)


def _image_embeds_position_mask(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Kosmos-2: the `latent_query_num` token positions (after the first) its image embeddings
    replace (Kosmos-2.5's, of its flattened patches); synthesize's text length makes room for them."""
    ids, latent = made["input_ids"], getattr(config, "latent_query_num", None)
    if not ("pixel_values" in made or "flattened_patches" in made):
        return None
    if not isinstance(latent, int) or ids.shape[-1] <= latent:
        return None
    mask = torch.zeros(ids.shape, dtype=torch.long, device=ids.device)
    mask[..., 1:1 + latent] = 1
    return mask


def _tokens(made: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return made.get("inputs_embeds", made.get("input_ids"))


def _num_patches(config: Any, made: dict[str, torch.Tensor]) -> int | None:
    """Half the tokens: DeepSeek-OCR 2's encoder takes that many leading image patches (the rest
    are queries), BLT's byte encoder pools its bytes two per patch (`_patch_ids`)."""
    tokens = _tokens(made)
    return None if tokens is None else int(tokens.shape[1]) // 2


def _patch_ids(config: Any, made: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """BLT: the patch of each byte, two bytes per patch (`_num_patches` patches)."""
    tokens = _tokens(made)
    if tokens is None:
        return None
    return (torch.arange(tokens.shape[1], device=tokens.device) // 2).unsqueeze(0)


Derived = Callable[[Any, dict[str, torch.Tensor]], Any]
# Inputs sized by another input of the same call (made after it, and after its layout variants):
# parameter name -> (the inputs it needs, maker). A value that is not a tensor is passed as is.
DERIVED: dict[str, tuple[tuple[str, ...], Derived]] = {
    "feature_lens": (("input_features",), _feature_lens),
    "chunk_sample_lengths": (("input_features",), _chunk_sample_lengths),
    "aspect_ratio_ids": (("pixel_values",), _aspect_ratio_ids),
    "aspect_ratio_mask": (("pixel_values",), _aspect_ratio_mask),
    "num_patches": ((), _num_patches),
    "patch_ids": ((), _patch_ids),
    "target_sizes": (("pixel_values",), _target_sizes),
    "vision_pos_embeds": (("vision_features",), _positions_like),
    "vision_pos_encoding": (("vision_features",), _positions_like),
    "image_attention_mask": (("pixel_values", "input_ids"), _image_attention_mask),
    "image_embeds_position_mask": (("input_ids",), _image_embeds_position_mask),
    "pixel_attention_mask": (("pixel_values",), _camera_mask),
}
# Derived inputs tried only after the same call without them: their layout is a guess that
# other models sharing the name do not take (PI0's per-camera mask, Idefics 2's per-pixel one).
AFTER_WITHOUT = ("pixel_attention_mask",)
