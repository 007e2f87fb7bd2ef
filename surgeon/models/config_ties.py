"""Sizes a modeling code ties together, kept consistent while a config shrinks (`surgeon.models.tiny`).

Each rule compares the config before shrinking with the shrunk one (`before`, `after`, dict
forms) and fixes a size in `after` that no key-by-key rule could get right: a width stated apart
that must equal another (the hidden size, a head's, another tower's), per-layer indices at the
same relative depth, grids that follow the image size.
"""

from __future__ import annotations

from typing import Any

LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                 "decoder_layers", "depth")


def first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def keep_equal_to_hidden(before: dict[str, Any], after: dict[str, Any]) -> None:
    """A width the config states apart but that must equal the hidden size (WavTokenizer's
    `codebook_dim`): one that equalled it and no rule shrank stays equal to it."""
    old, new = before.get("hidden_size"), after.get("hidden_size")
    if not isinstance(old, int) or not isinstance(new, int) or old == new:
        return
    for key, value in before.items():
        if key.endswith(("_dim", "_size", "_channels", "_channel")) and "vocab" not in key and value == old \
                and after.get(key) == old:  # Phi-4's audio convs: `nemo_conv_channels`, ...
            after[key] = new
        elif key.endswith("_channels") and isinstance(value, list) and value and after.get(key) == value \
                and all(v == old for v in value):  # PP-DocLayout: the encoder's outputs, each hidden wide
            after[key] = [new] * len(value)
    for key, value in before.items():  # Mllama: `vision_output_dim`, hidden x (tapped layers + 1)
        if key.endswith("output_dim") and isinstance(value, int) and value > old and value % old == 0 \
                and after.get(key) == value:
            after[key] = new * (value // old)
    attention = before.get("attention_hidden_size")  # Zamba: attention reads [hidden, embeddings]
    if isinstance(attention, int) and attention % old == 0 and attention > old:
        after["attention_hidden_size"] = new * (attention // old)
    _keep_equal_to_head_width(before, after)


def keep_equal_to_other_widths(before: dict[str, Any], after: dict[str, Any]) -> None:
    """The same for a named tower's width (ZoeDepth's `bottleneck_features` is its
    `fusion_hidden_size`): a width key that equalled it and no rule shrank follows it."""
    for name, old in before.items():
        new = after.get(name)
        if name == "hidden_size" or "hidden_size" not in name or name.startswith("num_") \
                or not isinstance(old, int) or not isinstance(new, int) or old == new:
            continue
        for key, value in before.items():
            if key.endswith(("_features", "_dim", "_channels")) and value == old and after.get(key) == old:
                after[key] = new


def _keep_equal_to_head_width(before: dict[str, Any], after: dict[str, Any]) -> None:
    """A width stated apart that must equal one head's (BROS's `dim_bbox_projection`, added to
    each head's keys): one that equalled hidden / heads and no rule shrank follows the tiny one."""
    old_heads, new_heads = before.get("num_attention_heads"), after.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (old_heads, new_heads)) \
            or isinstance(before.get("head_dim"), int):
        return
    old, new = before["hidden_size"] // old_heads, after["hidden_size"] // new_heads
    for key, value in before.items():
        if key.endswith(("_dim", "_projection")) and value == old and after.get(key) == old:
            after[key] = new


def fit_sizes_the_code_ties(before: dict[str, Any], after: dict[str, Any], layers: int | None,
                            image_side: int) -> None:
    """Relations no config key states but the modeling code imposes, each read from the keys that
    name the feature (`image_side`: the tiny image's)."""
    if after.get("use_rotary_embedding") is True and isinstance(after.get("hidden_size"), int) \
            and isinstance(after.get("num_attention_heads"), int) and "head_dim" not in after:
        # CLVP: the rotary width is max(projection_dim // (2 x heads), 32), so heads are 32 wide.
        after["num_attention_heads"] = max(1, min(after["num_attention_heads"], after["hidden_size"] // 32))
    ratio, hidden = after.get("pixel_shuffle_ratio"), after.get("hidden_size")
    if isinstance(ratio, float) and 0 < ratio < 1 and isinstance(hidden, int) and "projector_input_dim" in after:
        after["intermediate_size"] = int(hidden / ratio**2)  # Llama 4: the projector reads shuffled patches
    levels = after.get("channel_multiplier")
    if isinstance(after.get("num_patches"), int) and isinstance(levels, list) and levels:
        # Janus's VQGAN: its token grid is the image halved at each level but the first.
        after["num_patches"] = max(1, image_side // 2 ** (len(levels) - 1))
    old_side, new_side, patch = _image_side(before), _image_side(after), after.get("patch_size")
    if isinstance(patch, int) and patch > 0 and old_side and new_side \
            and before.get("num_position_embeddings") == (old_side // patch) ** 2:
        # Molmo 2: one learned position per patch of the image, the count stated apart.
        after["num_position_embeddings"] = (new_side // patch) ** 2
    patch = before.get("patch_size")
    towers = [k for k, v in before.items() if isinstance(v, dict) and isinstance(after.get(k), dict)
              and isinstance(v.get("image_size"), int)]
    if isinstance(patch, int) and towers and all(before[k]["image_size"] == patch for k in towers):
        # Depth Pro: each patch of the image is a whole image of its ViT towers
        after["patch_size"] = after[towers[0]]["image_size"]
    blocks, tiny_layers = before.get("num_blocks"), first_int(after, LAYER_COUNTS)
    if isinstance(blocks, int) and isinstance(layers, int) and tiny_layers is not None and blocks <= layers:
        after["num_blocks"] = min(blocks, tiny_layers)  # EoMT: the last layers, those that see the queries


def fit_feature_sizes(before: dict[str, Any], after: dict[str, Any]) -> None:
    """SAM 2/3's `backbone_feature_sizes`: the feature grids of the image the tiny model sees, each
    level as many times the last one's as before (SAM 3: [288, 144, 72] of 1008 px -> [16, 8, 4])."""
    sizes = before.get("backbone_feature_sizes")
    old, new = _image_side(before), _image_side(after)
    if not isinstance(sizes, list) or not sizes or old is None or new is None or old == new \
            or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)
                       for s in sizes):
        return
    last = sizes[-1]
    grid = [max(1, side * new // old) for side in last]
    after["backbone_feature_sizes"] = [[s[0] // last[0] * grid[0], s[1] // last[1] * grid[1]] for s in sizes]


def _image_side(config: dict[str, Any]) -> int | None:
    """The image size a config (or its backbone's config) states, one side of it."""
    for holder in (config, config.get("backbone_config")):
        size = holder.get("image_size") if isinstance(holder, dict) else None
        if isinstance(size, list) and size and isinstance(size[0], int):
            size = size[0]
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


def fit_kind_indices(before: dict[str, Any], after: dict[str, Any], layers: int | None) -> None:
    """A list of the layers of one kind (Zamba 2's `hybrid_layer_ids`: where `layers_block_type`
    says "hybrid") is read again from the shrunk per-layer list."""
    lists = {k: v for k, v in before.items() if isinstance(v, list) and layers and len(v) == layers
             and isinstance(after.get(k), list) and len(after[k]) < layers}
    for key, value in before.items():
        if not isinstance(value, list) or not value or not all(isinstance(i, int) for i in value):
            continue
        for kinds_key, kinds in lists.items():
            kind = kinds[value[0]] if 0 <= value[0] < len(kinds) else None
            if kind is not None and value == [i for i, v in enumerate(kinds) if v == kind]:
                after[key] = [i for i, v in enumerate(after[kinds_key]) if v == kind]
                break


def fit_layer_indices(config: dict[str, Any], layers: int | None, towers: tuple[int, int] | None) -> None:
    """Layers whose outputs a tower taps (Mllama's `intermediate_layers_indices` [3, 7, 15, 23, 30]
    of 32; Depth Pro's `intermediate_hook_ids` into its ViT towers): as many indices, at the same
    relative depths of the tiny stack, so that the width of their concatenation keeps its ratio
    to the hidden size (`vision_output_dim`, in `keep_equal_to_hidden`)."""
    tiny = first_int(config, LAYER_COUNTS)
    if not layers or tiny is None:
        layers, tiny = towers or (None, None)  # the towers' depth, where the config has none
    if not layers or tiny is None or tiny >= layers:
        return
    for key, value in list(config.items()):
        if (("layer" in key and key.endswith("_indices")) or key.endswith("_hook_ids")) and isinstance(value, list) \
                and value and all(isinstance(i, int) and 0 <= i for i in value) and max(value) > tiny:
            config[key] = [i * tiny // layers for i in value]


def tower_depths(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int] | None:
    """(old, tiny) layer count shared by every sub-config that states one, or None."""
    pairs = {(first_int(v, LAYER_COUNTS), first_int(after[k], LAYER_COUNTS)) for k, v in before.items()
             if isinstance(v, dict) and isinstance(after.get(k), dict) and first_int(v, LAYER_COUNTS)}
    return next(iter(pairs)) if len(pairs) == 1 else None


def keep_sum_of_widths(before: dict[str, Any], after: dict[str, Any]) -> None:
    """A width that was the config's hidden size plus its towers' (X-Codec 2's `quantization_dim`:
    its acoustic and semantic features concatenated), which no rule shrank, follows their tiny sum."""
    def total(config: dict[str, Any]) -> int | None:
        widths = [config.get("hidden_size")] + [v.get("hidden_size") for k, v in config.items()
                                                if isinstance(v, dict) and "model_type" in v]
        widths = [w for w in widths if isinstance(w, int) and not isinstance(w, bool)]
        return sum(widths) if len(widths) >= 2 else None

    old, new = total(before), total(after)
    if old is None or new is None or old == new:
        return
    for key, value in before.items():
        if key.endswith("_dim") and value == old and after.get(key) == old:
            after[key] = new


def keep_equal_across_towers(before: dict[str, Any], after: dict[str, Any]) -> None:
    """A tower's width that equalled another tower's hidden size is the width that tower reads
    (SAM's vision `output_channels` is the prompt encoder's and mask decoder's hidden size): one
    no rule shrank follows that tower's tiny hidden size."""
    towers = [k for k, v in before.items() if isinstance(v, dict) and isinstance(after.get(k), dict)
              and "model_type" in v]
    for reader in towers:
        old, new = before[reader].get("hidden_size"), after[reader].get("hidden_size")
        if not isinstance(old, int) or not isinstance(new, int) or old == new:
            continue
        for writer in towers:
            if writer != reader:
                _follow(before[writer], after[writer], old, new)


# Keys that name a width (not a count or a length: `codebook_size`, `sliding_window_size`).
_WIDTHS = ("_dim", "_channels", "hidden_size", "proj_size", "head_size")


def _follow(before: dict[str, Any], after: dict[str, Any], old: int, new: int) -> None:
    for key, value in before.items():
        if key.endswith(_WIDTHS) and value == old and after.get(key) == old:
            after[key] = new
