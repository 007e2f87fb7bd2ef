"""Shrink any transformers config to a tiny one, so `tiny:<model_type>` builds in a blink.

A pure function on the config's dict form: keys are recognised by the names transformers uses
for sizes (hidden, feed-forward, layers, heads, vocabulary, experts, image size), whatever the
architecture, and nested sub-configs (a VLM's text and vision towers, an encoder-decoder's
halves) are shrunk the same way. Sizes stay mutually consistent: hidden = heads x head_dim,
per-layer lists keep one layer of every kind (a hybrid model keeps an attention layer), and a width
that equalled another (a head's, a named width, another tower's hidden size) follows it.
"""

from __future__ import annotations

from typing import Any

from surgeon.models.config_ties import (
    LAYER_COUNTS,
    first_int,
    fit_feature_sizes,
    fit_kind_indices,
    fit_layer_indices,
    fit_sizes_the_code_ties,
    keep_equal_across_towers,
    keep_equal_to_hidden,
    keep_equal_to_other_widths,
    keep_sum_of_widths,
    tower_depths,
)

HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
FFN = 128
LAYERS = 2
VOCAB = 1024
EXPERTS = 4

# key -> tiny value, applied only where the key exists and holds a larger int.
_SIZES: dict[str, int] = {
    **dict.fromkeys(("d_model", "n_embd", "embed_dim", "dim", "word_embed_proj_dim", "projection_dim",
                     "projection_size", "embedding_dim", "text_embed_dim", "vision_embed_dim"), HIDDEN),
    **dict.fromkeys(("ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "hidden_dim",
                     "mlp_dim"), FFN),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                     "decoder_layers", "num_decoder_layers", "num_encoder_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads",
                     "encoder_attention_heads", "decoder_attention_heads"), HEADS),
    **dict.fromkeys(("head_dim", "d_kv", "attention_head_dim", "kv_channels", "v_head_dim",
                     "rotary_dim", "d_head"), HEAD_DIM),
    **dict.fromkeys(("qk_nope_head_dim", "qk_rope_head_dim"), HEAD_DIM // 2),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank"), 2 * HEAD_DIM),
    "vocab_size": VOCAB,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k",
                     "num_selected_experts", "top_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "n_group", "num_expert_group",
                     "topk_group"), 1),
    "image_size": 64,
    # TVP: its image size, and the frame of learned pixels padded inside it (96 of 448 px).
    "max_img_size": 64, "visual_prompt_size": 16,
    # SAM: random Fourier position features, two channels each, as wide as the image embedding.
    "num_pos_feats": HIDDEN // 2,
    # Object queries: DETRs pick their top-k among the encoder's tokens, few in a tiny image.
    "num_queries": 16,
}
_KV_HEADS = ("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")
_HEAD_COUNTS = ("num_attention_heads", "n_head", "num_heads")
# Counts some default configs leave unset (None) although the model needs them.
_UNSET = {"num_experts_per_tok": 2, "head_dim": HEAD_DIM, "vocab_size": VOCAB}
# Media placeholder tokens: the prefixes of the `*_token_id` / `*_token_index` keys that say where
# an image's (video's, audio's) embeddings go in the text.
_MEDIA_TOKENS = ("image_token", "video_token", "audio_token")
# Derived from the layer or stage count; the config recomputes them when they are absent.
_DERIVED = ("stage_names", "out_features", "out_indices", "_out_features", "_out_indices",
            "true_hidden_size")  # MobileBERT: the bottleneck's width or the hidden size


def shrink_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (from `PretrainedConfig.to_dict()`) with tiny sizes.

    Example:
        >>> shrink_config_dict({"hidden_size": 4096, "num_hidden_layers": 32})["hidden_size"]
        64
    """
    before = first_int(config, LAYER_COUNTS)
    depths = config.get("depths")
    if isinstance(depths, list) and before == len(depths):
        before = None  # Swin's `num_layers` counts stages: every stage stays (`depths` shrink each)
    kinds = config.get("layer_types")
    after = max(LAYERS, len(set(map(str, kinds)))) if isinstance(kinds, list) else LAYERS
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in _DERIVED and key not in ("out_indices", "_out_indices"):
            continue
        staged = before is None and key in LAYER_COUNTS and isinstance(depths, list)
        out[key] = value if staged else _shrink_value(key, value, config, before, after)
    _fit_token_ids(out)
    _fit_sliding_window(out)
    _fit_conv_stages(out)
    _drop_stale_indices(out)
    _fit_hybrid_periods(out, after)
    _fit_backbone_outputs(out)
    _fit_backbone_channels(out)
    _fit_layout_embeddings(out)
    _fit_derived_widths(out)
    _fit_ssm_heads(out)
    keep_equal_to_hidden(config, out)
    keep_equal_to_other_widths(config, out)
    keep_equal_across_towers(config, out)
    keep_sum_of_widths(config, out)
    fit_kind_indices(config, out, before)
    fit_layer_indices(out, before, tower_depths(config, out))
    fit_feature_sizes(config, out)
    fit_sizes_the_code_ties(config, out, before, _SIZES["image_size"])
    if config.get("head_dim") is not None and config.get("head_dim") == config.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA: RoPE runs on head_dim channels
    return out


def _shrink_value(key: str, value: Any, config: dict[str, Any], before: int | None, after: int) -> Any:
    if isinstance(value, dict):
        if "model_type" in value:  # a sub-config
            return shrink_config_dict(value)
        if key == "per_layer_config":  # {layer index: overrides}
            return {k: v for k, v in value.items() if str(k).isdigit() and int(k) < after}
        if isinstance(value.get("mrope_section"), list):  # rope_parameters: sections of head_dim / 2
            return {**value, "mrope_section": _fit_sections(value["mrope_section"], HEAD_DIM // 2)}
        return value
    kv_heads = key in _KV_HEADS or ("key_value" in key and "heads" in key)
    if isinstance(value, list):
        shrunk = _shrink_list(key, value, before, after)
        if kv_heads and all(isinstance(v, int) and not isinstance(v, bool) for v in shrunk):
            return [_tiny_kv_heads(key, v, config, before, after) for v in shrunk]  # Sapiens 2: per layer
        return shrunk
    if value is None and key in _UNSET:
        return _UNSET[key]  # some default configs leave them unset and do not build without them
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if kv_heads:
        return _tiny_kv_heads(key, value, config, before, after)
    if "feature_layer" in key:  # a layer index into a vision tower (-2 stays -2)
        return value if value < after else -1
    if key in LAYER_COUNTS or key in ("num_decoder_layers", "num_encoder_layers", "decoder_layers"):
        return min(value, after)
    if key == "hidden_dim" and "width_coefficient" in config:
        return value  # EfficientNet: the top conv's width, fixed by the code as 1280 x width_coefficient
    return min(value, _tiny_size(key, value))


def _tiny_kv_heads(key: str, value: int, config: dict[str, Any], before: int | None, after: int) -> int:
    """Keep the attention kind: MHA stays MHA, MQA stays MQA, GQA becomes 2 groups. The query
    heads are the same-named count (`decoder_num_attention_heads`) where there is one."""
    partner = key.replace("key_value", "attention").removesuffix("_per_layer")
    heads_key = partner if partner != key and isinstance(config.get(partner), int) else \
        next((k for k in _HEAD_COUNTS if isinstance(config.get(k), int)), None)
    if value <= 1:
        return value
    if heads_key is not None and value == config[heads_key]:
        return _shrink_value(heads_key, value, config, before, after)
    return 2


def _tiny_size(key: str, value: int) -> int:
    tiny = _SIZES.get(key)
    if tiny is not None:
        return tiny
    # `encoder_hidden_size`, `out_hidden_size`, `moe_intermediate_size`, ...: widths of a tower
    # that another tower must match, so they shrink to the same sizes.
    if "hidden_size" in key and not key.startswith("num_"):
        return HIDDEN
    if "vocab_size" in key:  # per-layer-input vocabularies (Gemma 3n/4) as well
        return VOCAB
    if "intermediate_size" in key:
        return HIDDEN if ("moe" in key or "expert" in key) else FFN
    return value


def _shrink_list(key: str, value: list, before: int | None, after: int) -> list:
    if key in _HEAD_COUNTS and all(isinstance(v, int) for v in value):
        return [min(v, 2) for v in value]  # heads per stage (Swin, PVT): divide any stage width
    if key == "image_size" and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [min(v, _SIZES["image_size"]) for v in value]  # (height, width): SAM 2's Hiera
    if "feature_layer" in key and all(isinstance(v, int) for v in value):
        return [v if v < after else -1 - i for i, v in enumerate(value)]
    # Per-layer lists (layer_types, ...) follow the layer count and keep every kind of layer.
    if before and len(value) == before and before > after:
        return _keep_kinds(value, after)
    return value


def _fit_sections(sections: list, total: int) -> list:
    """Multimodal RoPE sections (t, h, w) rescaled to sum to `total`, each at least 1."""
    if not sections or not all(isinstance(v, int) and v > 0 for v in sections):
        return sections
    scaled = [max(1, v * total // sum(sections)) for v in sections]
    scaled[-1] += total - sum(scaled)
    return scaled if scaled[-1] > 0 else sections


def _keep_kinds(values: list, n: int) -> list:
    """`n` entries of a per-layer list, in order, holding every distinct value it can."""
    first: dict[str, int] = {}
    for i, v in enumerate(values):
        first.setdefault(repr(v), i)
    chosen = sorted(first.values())[:n]
    for i in range(len(values)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return [values[i] for i in sorted(chosen)]


def _fit_token_ids(config: dict[str, Any]) -> None:
    """Special token ids past the new vocabulary move to distinct ids at its top. The vocabulary
    is the text tower's where the config has none of its own (Step3's `text_config`). A media
    token left unset (BLIP-2's `image_token_index`: its processor adds it) gets one too: without
    it the model cannot tell where the image's embeddings go."""
    text = config.get("text_config")
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) and isinstance(text, dict):
        vocab = text.get("vocab_size")
    if not isinstance(vocab, int):
        return
    taken: dict[int, int] = {}
    for key, value in config.items():
        if not key.endswith(("_token_id", "_token_index")):
            continue
        if value is None and key.startswith(_MEDIA_TOKENS):
            config[key] = vocab - 1 - len(taken)
            taken[-1 - len(taken)] = config[key]
        elif isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
            config[key] = taken.setdefault(value, vocab - 1 - len(taken))
        elif isinstance(value, list):
            config[key] = [taken.setdefault(v, vocab - 1 - len(taken))
                           if isinstance(v, int) and v >= vocab else v for v in value]


def _fit_sliding_window(config: dict[str, Any]) -> None:
    """A sliding window left unset although the config has sliding layers (in `layer_types`) or
    sizes them (Step 3.5's `num_sliding_attention_heads`; its model builds the sliding mask
    whatever the layers): a window shorter than the synthesized text, so its masking runs."""
    kinds = config.get("layer_types")
    sliding = (isinstance(kinds, list) and any("sliding" in str(kind) for kind in kinds)) or any(
        "sliding" in key and isinstance(value, int) and not isinstance(value, bool) for key, value in config.items())
    if "sliding_window" in config and config["sliding_window"] is None and sliding:
        config["sliding_window"] = 4


def _fit_conv_stages(config: dict[str, Any]) -> None:
    """Convnets (ResNet, ConvNeXt, ...): narrow every stage and keep one block per stage."""
    sizes = config.get("hidden_sizes")
    if isinstance(sizes, list) and sizes and all(isinstance(s, int) for s in sizes):
        config["hidden_sizes"] = [16 * 2 ** min(i, 2) for i in range(len(sizes))]
        if isinstance(config.get("stage_out_channels"), list):  # HGNet: the widths its stages produce
            config["hidden_sizes"] = config["stage_out_channels"]
        if isinstance(config.get("embedding_size"), int):
            config["embedding_size"] = 16
        for key, value in list(config.items()):  # TextNet: the stem makes the first stage's input
            if key.startswith("stem") and key.endswith("channels") and value == sizes[0]:
                config[key] = config["hidden_sizes"][0]
    depths = config.get("depths")
    if isinstance(depths, list) and depths and all(isinstance(d, int) for d in depths):
        config["depths"] = [1] * len(depths)
        if isinstance(config.get("embed_dim"), int):  # Swin: the first stage's width, doubled per stage
            config["embed_dim"] = 16
        image, patch, window = (config.get(k) for k in ("image_size", "patch_size", "window_size"))
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (image, patch, window)):
            # Swin: windows fit the last stage's patch grid (2 x 2 for a 64-pixel image and 4 stages).
            config["window_size"] = min(window, max(1, image // patch // 2 ** (len(depths) - 1)))


def _fit_hybrid_periods(config: dict[str, Any], layers: int) -> None:
    """Jamba-style `attn_layer_period=8, attn_layer_offset=4`: keep one such layer in `layers`."""
    for key, value in list(config.items()):
        if key.endswith("_layer_period") and isinstance(value, int) and value > layers:
            config[key] = layers
            offset_key = key.replace("_period", "_offset")
            if isinstance(config.get(offset_key), int):
                config[offset_key] = min(config[offset_key], layers - 1)


def _drop_stale_indices(config: dict[str, Any]) -> None:
    """A backbone's `out_indices` stay while they name stages the tiny model keeps (a convnet keeps
    every stage: RT-DETR's [2, 3, 4] of ResNet's 4); layer indices past the tiny depth go (the
    config then defaults to the last stage)."""
    depths = config.get("depths")
    for key in ("out_indices", "_out_indices"):
        value = config.get(key)
        if key in config and not (isinstance(depths, list) and isinstance(value, list | tuple)
                                  and all(isinstance(i, int) and i <= len(depths) for i in value)):
            del config[key]


def _fit_backbone_channels(config: dict[str, Any]) -> None:
    """RT-DETR-style `encoder_in_channels`: the widths of the backbone stages it reads, which the
    tiny backbone narrowed (stage i of `out_indices` is `hidden_sizes[i - 1]`)."""
    wanted, backbone = config.get("encoder_in_channels"), config.get("backbone_config")
    if not isinstance(wanted, list) or not isinstance(backbone, dict):
        return
    sizes = backbone.get("stage_out_channels") or backbone.get("hidden_sizes")  # HGNet names them apart
    indices = backbone.get("out_indices")
    if isinstance(sizes, list) and isinstance(indices, list) and len(indices) >= len(wanted):
        config["encoder_in_channels"] = [sizes[i - 1] for i in indices[len(indices) - len(wanted):]]


def _fit_backbone_outputs(config: dict[str, Any]) -> None:
    """A DPT-style neck (Depth Anything, ZoeDepth, CHM) takes one feature map per entry of
    `neck_hidden_sizes` from its backbone: the tiny backbone keeps that many layers and outputs
    the last ones."""
    neck = config.get("neck_hidden_sizes") or config.get("post_process_channels")
    backbone = config.get("backbone_config")
    if not isinstance(neck, list) or not isinstance(backbone, dict):
        return
    depths = backbone.get("depths")
    if isinstance(depths, list) and len(depths) >= len(neck):  # a staged convnet or Swin
        backbone["out_indices"] = list(range(len(depths) - len(neck) + 1, len(depths) + 1))
        return
    key = next((k for k in LAYER_COUNTS if isinstance(backbone.get(k), int)), None)
    if key is not None:
        backbone[key] = max(backbone[key], len(neck))
        backbone["out_indices"] = list(range(backbone[key] - len(neck) + 1, backbone[key] + 1))


def _fit_layout_embeddings(config: dict[str, Any]) -> None:
    """LayoutLMv2/v3 (and LiLT) concatenate 4 coordinate and 2 shape embeddings into one hidden
    vector."""
    hidden = config.get("hidden_size")
    if isinstance(hidden, int) and isinstance(config.get("coordinate_size"), int) \
            and isinstance(config.get("shape_size"), int):
        config["coordinate_size"] = hidden // 6
        config["shape_size"] = (hidden - 4 * (hidden // 6)) // 2
    elif isinstance(hidden, int) and "max_2d_position_embeddings" in config and hidden % 6:
        # LiLT states no such sizes: six hidden_size // 6 embeddings must make up the hidden size.
        config["hidden_size"] = 6 * 2 * HEADS


def _fit_derived_widths(config: dict[str, Any]) -> None:
    """Sizes some configs state although they follow from others: SAM's prompt grid is the image's
    patch grid; Hiera's (SAM 2) patch embedding is its first stage, whose width it states apart."""
    image, patch = config.get("image_size"), config.get("patch_size")
    if isinstance(config.get("image_embedding_size"), int) and isinstance(image, int) and isinstance(patch, int):
        config["image_embedding_size"] = image // patch
    stages = config.get("embed_dim_per_stage")
    if isinstance(stages, list) and stages and isinstance(config.get("hidden_size"), int):
        config["hidden_size"] = stages[0]


def _fit_ssm_heads(config: dict[str, Any]) -> None:
    """Mamba-2 (and hybrids: Bamba, Granite 4): the heads split the SSM width exactly, so the
    head count follows the tiny sizes. The width is hidden x expand unless stated (Falcon-H1's
    `mamba_d_ssm`)."""
    hidden = config.get("hidden_size")
    for expand_key, heads_key, dim_key in (("expand", "num_heads", "head_dim"),
                                           ("mamba_expand", "mamba_n_heads", "mamba_d_head"),
                                           ("mamba_expand", "n_mamba_heads", "mamba_headdim")):
        expand, dim = config.get(expand_key), config.get(dim_key)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (hidden, expand, dim)) \
                or not isinstance(config.get(heads_key), int):
            continue
        width = config.get("mamba_d_ssm") if expand_key.startswith("mamba") else None
        width = width if isinstance(width, int) else hidden * expand
        if width % dim == 0:
            config[heads_key] = width // dim
        elif width % config[heads_key] == 0:  # a head wider than the tiny width (Zamba 2's 640)
            config[dim_key] = width // config[heads_key]


def fit_mrope(config: dict[str, Any], sections: list[int]) -> dict[str, Any]:
    """Multimodal RoPE whose sections default in the modeling code (Qwen2-VL's [16, 24, 24], made
    for head_dim 128): state those sections, rescaled to the rotary half of the tiny head_dim
    (a partial rotary factor rotates only part of it), in every `rope_parameters`."""
    out = dict(config)
    for key, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = fit_mrope(value, sections)
        elif key == "rope_parameters" and isinstance(value, dict) and "mrope_section" not in value:
            partial = value.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
            total = max(len(sections), int(HEAD_DIM * partial) // 2)
            out[key] = {**value, "mrope_section": _fit_sections(sections, total)}
    return out
