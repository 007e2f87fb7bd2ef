"""Makers: one example input per forward parameter name transformers uses, sized from the config.

`MAKERS[name](config, device)` returns the tensor for parameter `name` (None when the config
cannot size it); `LISTS` the same for parameters typed `list[Tensor]` (a feature pyramid).
`surgeon.capture.synthesize` decides which parameters a forward needs and calls these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from surgeon.models.layouts import audio_frames, merge_size

# Token count of synthesized text inputs: small, but longer than any tiny model's window or
# conv stride so that no code path is skipped for short inputs.
SEQ_LEN = 8
AUDIO_SAMPLES = 3200  # 0.2 s at 16 kHz: a dozen frames after wav2vec2's 320x conv stride
Maker = Callable[[Any, "str | torch.device"], "torch.Tensor | None"]


def _ids(length: int) -> Maker:
    return lambda config, device: torch.zeros(1, length, dtype=torch.long, device=device)


def _text_length(config: Any) -> int:
    """SEQ_LEN tokens, plus room for the query tokens a BLIP-2-style model prepends (Kosmos-2's
    image embeddings take `latent_query_num` token positions)."""
    queries = getattr(config, "num_query_tokens", None) or getattr(config, "latent_query_num", None)
    return SEQ_LEN + int(queries if isinstance(queries, int) else 0)


def _input_ids(config: Any, device: Any) -> torch.Tensor:
    """One row of tokens; a codebook decoder loaded alone (MusicGen's) takes one row per codebook."""
    codebooks = getattr(config, "num_codebooks", None)
    rows = codebooks if isinstance(codebooks, int) and config.model_type.endswith("_decoder") else 1
    return torch.zeros(rows, _text_length(config), dtype=torch.long, device=device)


def _sub(config: Any, name: str) -> Any:
    """The sub-config of a tower (`vision_config`; audio under any of its usual names)."""
    # X-Codec 2: its semantic tower (a w2v-BERT) reads the log-mels beside the raw audio
    names = {"audio_config": (name, "encoder_config", "speech_config", "semantic_model_config"),
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
    height, width = _size(getattr(vision, "image_size", None) or getattr(vision, "input_size", None)
                          or _scaled_patch_side(vision))
    channels = getattr(vision, "num_channels", None) or 3
    frames = getattr(vision, "num_frames", None)
    tiles = getattr(vision, "max_num_tiles", None)
    if isinstance(tiles, int) and tiles > 0:  # Mllama: (batch, images, tiles, ...), one image
        return torch.zeros(1, 1, tiles, channels, height, width, device=device)
    if isinstance(frames, int) and frames > 0:
        return torch.zeros(1, frames, channels, height, width, device=device)
    return torch.zeros(1, channels, height, width, device=device)


def _scaled_patch_side(config: Any) -> int | None:
    """Depth Pro: the image is cut into `patch_size` patches at each of its `scaled_images_ratios`,
    so its smallest scale must hold a patch."""
    patch, ratios = getattr(config, "patch_size", None), getattr(config, "scaled_images_ratios", None)
    if isinstance(patch, int) and isinstance(ratios, list | tuple) and ratios and min(ratios) > 0:
        return round(patch / min(ratios))
    return None


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
    # Whole tokens of samples where the model embeds fixed spans (Muse Spark: 1920 per token)
    span = getattr(audio, "samples_per_token", None)
    samples = -(-AUDIO_SAMPLES // span) * span if isinstance(span, int) and span > 0 else AUDIO_SAMPLES
    ratios = getattr(config, "downsampling_ratios", None)
    if getattr(config, "semantic_model_config", None) is not None and isinstance(ratios, list) and ratios \
            and all(isinstance(r, int) and r > 0 for r in ratios):
        # X-Codec 2: its acoustic frames (samples / the product of its strides) are concatenated
        # with its semantic tower's log-mel frames, so the two must count alike
        samples = _feature_frames(config) * math.prod(ratios)
    channels = getattr(audio, "audio_channels", None)
    if channels:
        return torch.zeros(1, channels, samples, device=device)
    return torch.zeros(1, samples, device=device)


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
    return torch.zeros(1, _feature_frames(config), features, device=device)


def _feature_frames(config: Any) -> int:
    """Frames of synthesized log-mels; where each text token carries a fixed span of frames added
    to it (Voxtral Realtime's `audio_length_per_tok`), as many frames as the text's tokens take."""
    per_token = getattr(config, "audio_length_per_tok", None)
    if isinstance(per_token, int) and per_token > 0:
        return _text_length(config) * per_token
    return audio_frames(_sub(config, "audio_config"))


def _frames_mask(config: Any, device: Any) -> torch.Tensor:
    """Every frame of `_input_features` valid (in either layout the frames count is the same)."""
    audio = _sub(config, "audio_config")
    positions = getattr(audio, "max_source_positions", None)
    whisper = getattr(audio, "num_mel_bins", None) and positions and not getattr(audio, "input_feat_per_channel", None)
    return torch.ones(1, 2 * positions if whisper else _feature_frames(config), dtype=torch.long, device=device)


def hidden_width(config: Any) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim", "embed_dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return 64


def _encoder_states(config: Any, device: Any) -> torch.Tensor:
    width = getattr(config, "encoder_hidden_size", None) or getattr(config, "cross_attention_hidden_size", None)
    return torch.zeros(1, SEQ_LEN, width or hidden_width(config), device=device)


def _embeds(config: Any, device: Any) -> torch.Tensor:
    return torch.zeros(1, SEQ_LEN, hidden_width(config), device=device)


def _query_embeds(config: Any, device: Any) -> torch.Tensor:
    return torch.zeros(1, int(getattr(config, "num_query_tokens", 0) or 4), hidden_width(config), device=device)


def _grid(config: Any) -> tuple[int, int, int]:
    """A patch grid (frames, rows, cols) whose rows and cols the tower's patch merger divides (or
    its pooling kernel: Gemma 4's tower averages k x k patches into one)."""
    merge = merge_size(config)
    return 1, 2 * merge, 2 * merge


def _grid_thw(config: Any, device: Any) -> torch.Tensor:
    return torch.tensor([_grid(config)], dtype=torch.long, device=device)


def _hidden_states(config: Any, device: Any) -> torch.Tensor:
    """A tower fed by another: flattened patches for a Qwen-VL-style vision tower (one row per
    patch of `_grid`), mel frames for an audio encoder whose config sizes its input (Phi-4's
    `input_size`), otherwise hidden states of its width."""
    mels = getattr(config, "input_size", None)
    if isinstance(mels, int) and "audio" in str(getattr(config, "model_type", "")):
        return torch.zeros(1, 4 * SEQ_LEN, mels, device=device)
    if isinstance(getattr(config, "mel_dim", None), int):  # a code-to-mel DiT denoises mel frames
        return _mel_frames("mel_dim")(config, device)
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


def _state(config: Any, device: Any) -> torch.Tensor:
    """A robot policy's proprioceptive state (PI0): one row of `max_state_dim` values."""
    return torch.zeros(1, int(getattr(config, "max_state_dim", None) or 32), device=device)


def _rows(width_key: str | None, default: int) -> Maker:
    """SEQ_LEN rows, each `config.<width_key>` wide: a trajectory's steps (Decision Transformer's
    states, actions, rewards) or an image's detected regions (LXMERT's features and boxes)."""
    return lambda config, device: torch.zeros(
        1, SEQ_LEN, int(getattr(config, width_key or "", None) or default), device=device)


def _feature_map(config: Any, side: int) -> torch.Tensor:
    return torch.zeros(1, hidden_width(config), side, side)


def _vision_tokens(config: Any, device: Any) -> torch.Tensor:
    """A DETR decoder's flattened image features (SAM 3's): a 4 x 4 map, (batch, 16, hidden)."""
    return _feature_map(config, 4).flatten(2).transpose(1, 2).to(device)


def _feature_levels(config: Any, device: Any) -> list[torch.Tensor]:
    """Feature maps of a pyramid, finest first, the coarsest 2 x 2 so that its tokens fit in the
    SEQ_LEN encoder states read beside them (SAM 3's mask decoder: one level per upsampling)."""
    levels = int(getattr(config, "num_upsampling_stages", None) or 0) + 1
    return [_feature_map(config, 2 ** (levels - i)).to(device) for i in range(levels)]


def _code_frames(config: Any) -> int:
    """Mel frames of a code-to-mel DiT (Qwen2.5-Omni's): `repeats` per code of SEQ_LEN codes."""
    return SEQ_LEN * int(getattr(config, "repeats", None) or 1)


def _mel_frames(width_key: str) -> Maker:
    """Qwen2.5-Omni's DiT: mel-rate frames `config.<width_key>` wide (noisy mels, the speaker's
    reference mels, the speaker embedding per frame)."""
    return lambda config, device: torch.zeros(1, _code_frames(config), int(getattr(config, width_key)),
                                              device=device)


def _dit(config: Any) -> Any:
    return getattr(config, "dit_config", None) or config


def _docs(config: Any) -> int:
    return int(getattr(config, "n_docs", None) or 1)


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
    "state": _state,
    "lang_ids": lambda config, device: torch.zeros(1, dtype=torch.long, device=device),  # X-MOD's adapters
    # Moshi's depth decoder: the main decoder's states (`input_size` wide) that condition it
    "last_hidden_state": lambda config, device: torch.zeros(
        1, SEQ_LEN, int(getattr(config, "input_size", None) or hidden_width(config)), device=device),
    # Towers of a detector loaded alone (SAM 3's DETR encoder/decoder, mask decoder)
    "vision_features": _vision_tokens,
    "text_features": _embeds,
    "decoder_queries": _query_embeds,
    # RAG without a retriever: the retrieved passages (`n_docs` per question) and their scores
    "context_input_ids": lambda config, device: torch.zeros(_docs(config), SEQ_LEN, dtype=torch.long, device=device),
    "context_attention_mask": lambda config, device: torch.ones(
        _docs(config), SEQ_LEN, dtype=torch.long, device=device),
    "doc_scores": lambda config, device: torch.zeros(1, _docs(config), device=device),
    # Qwen2.5-Omni's code-to-mel DiT: codes, the speaker's reference mels and embedding, a time
    "quantized_code": _ids(SEQ_LEN),
    "condition_vector": _mel_frames("mel_dim"),
    "speaker_embedding": _mel_frames("enc_emb_dim"),
    "time_step": lambda config, device: torch.zeros(1, device=device),
    # ... and the whole Token2Wav (DiT, then BigVGAN): codes, the speaker's vector, reference mels
    "code": _ids(SEQ_LEN),
    "conditioning": lambda config, device: torch.zeros(1, _dit(config).enc_emb_dim, device=device),
    "reference_mel": lambda config, device: _mel_frames("mel_dim")(_dit(config), device),
    "visual_feats": _rows("visual_feat_dim", 2048),
    "visual_pos": _rows("visual_pos_dim", 4),
    "states": _rows("state_dim", 17),
    "actions": _rows("act_dim", 4),
    "rewards": _rows(None, 1),
    "returns_to_go": _rows(None, 1),
    "timesteps": lambda config, device: torch.zeros(1, SEQ_LEN, dtype=torch.long, device=device),
}
# Parameters typed `list[Tensor]`: multi-level feature maps (a tensor maker's value is then the
# one level of a list).
LISTS: dict[str, Callable[[Any, Any], list[torch.Tensor]]] = {
    "vision_features": lambda config, device: [_feature_map(config, 4).to(device)],
    "backbone_features": _feature_levels,
}
# A trajectory model (Decision Transformer) reads all of these or none.
