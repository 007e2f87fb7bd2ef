"""A fixed sample of the zoo sweep (bench/zoo.py), one architecture per class of fix in issue 13.

Oracle: the model's own forward runs on the synthesized inputs (transformers decides), and where
a module's last name segment plainly names a part (q_proj, query, up_proj, down_proj) the
inferred role says the same. The full sweep over every `tiny:` type is a benchmark, not a test.
"""

from __future__ import annotations

import pytest
import torch

from surgeon.capture.infer import infer_roles
from surgeon.capture.inputs import ExampleInputs
from surgeon.capture.synthesize import input_candidates
from surgeon.models.load import load_model

NAMED = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "query": "q", "key": "k", "value": "v",
         "up_proj": "up", "down_proj": "down", "gate_proj": "gate"}
SAMPLE = {
    "apertus": "an activation written with expm1 (xIELU)",
    "afmoe": "gated attention: the attention's gate_proj",
    "mamba": "a state-space mixer, not an MLP",
    "canary_decoder": "a decoder loaded alone: encoder states synthesized",
    "audio-spectrogram-transformer": "audio given as a spectrogram",
    "llava_next": "a VLM run on text, its vision tower captured on its own",
    "qwen3_next": "shared experts behind hand-written norms; mRoPE-free hybrid",
    "glmasr_encoder": "log-mel frames laid out as its first Conv1d reads them (mels first)",
    "videomae": "a video clip: (batch, frames, channels, height, width)",
    "patchtst": "a time series: the context window, one column per channel",
    "siglip2_vision_model": "NaFlex: flattened patches with their grid and mask",
    "pix2struct_vision_model": "flattened patches led by their row and column",
    "llama4_text": "RoPE applied as a complex product: q and k pass through complex tensors",
    "bitnet": "the MLP's gated product is RMS-normalised before down_proj",
    "olmo_hybrid": "linear attention: q, k, v concatenated through one short conv, then split",
    "groupvit_vision_model": "assign attention: a hard assignment renormalised before it weighs v",
    "fsmt": "shapes read from input values: captured on a real copy (draft export)",
    "step3p5_vision": "a tensor made in forward read by .tolist(): meta export fails, real copy retried",
    "qwen3_asr_encoder": "a chunk loop over cu_seqlens no export settles: captured by running it",
    "muse_glimmer_assistant": "k/v read cat(context, hidden); export fails to broadcast: captured by running",
    "bailing_hybrid": "Kimi delta attention: q.k scores as a broadcast product summed over features",
}
# Architectures whose tiny config needed sizes kept consistent across sub-configs: the oracle is
# that the model builds and its own forward runs (their roles are checked by the sweep).
BUILDS = {
    "depth_anything": "the backbone outputs one feature map per neck size",
    "rt_detr": "backbone stages kept; the encoder's input widths follow the narrowed stages",
    "mask2former": "Swin keeps its stage count; windows fit the last stage",
    "bamba": "Mamba-2 heads split the expanded width exactly",
    "dac": "raw audio as (batch, channels, samples) for the codec's first conv",
    "sam": "a tower's width equal to another tower's hidden size (SAM's output_channels) follows it",
    "bros": "a width equal to one head's (BROS's bbox projection) follows the tiny head width",
    "lilt": "six hidden // 6 layout embeddings make up the hidden size",
    "kimi_linear": "expert-group and experts-per-token counts under their own key names",
    "zamba2": "attention reads [hidden, embeddings]; hybrid layer ids read again from the layer kinds",
    "sam2": "feature grids follow the tiny image; [h, w] image sizes shrink too",
    "textnet": "the stem's output channels are the first stage's input",
    "zoedepth": "a width equal to a named hidden width (bottleneck = fusion) follows it",
    "pp_doclayout_v4": "per-level input channels that were each the hidden size follow it",
    "tvp": "the image size and the prompt frame padded inside it shrink together",
    "sapiens2": "per-layer key/value head counts keep the attention kind",
    "eomt": "the last blocks that see the queries fit the tiny layer count",
    "janus_vqgan": "the VQGAN's token grid is the tiny image halved per level",
    "llama4_vision_model": "the projector reads pixel-shuffled patches: hidden / ratio**2 wide",
    "clvp_encoder": "rotary embeddings at least 32 channels wide: heads 32 wide",
    "lw_detr_vit": "a sub-model's class whose forward takes pixel_values (its Backbone, not its Encoder)",
    "blip-2": "a media token left unset gets an id in the tiny vocabulary",
    "step3p7": "token ids fit the text tower's vocabulary; a sliding window the config leaves unset",
    "mllama_vision_model": "tapped layer indices at the same relative depths of the tiny stack",
    "phi4_multimodal_audio": "conv channel counts equal to the hidden size follow it",
    "xcodec": "a width the config derives when unset (codebook_dim) is derived again from tiny sizes",
    "dots3_note_audio_encoder": "an attribute __post_init__ derives (conv_output_size) is derived again",
    "depth_pro": "patches that are its towers' whole images; hooks into the towers' tiny depth",
}


def _runs(model: torch.nn.Module) -> bool:
    return any(_calls(model, inputs) for inputs in input_candidates(model, "cpu"))


def _calls(model: torch.nn.Module, inputs: ExampleInputs) -> bool:
    args, kwargs = inputs.split(inputs.flat())
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the next, less complete call may run
        return False
    return True


@pytest.mark.parametrize("model_type", sorted(BUILDS))
def test_tiny_config_builds_and_runs(model_type: str) -> None:
    assert _runs(load_model(f"tiny:{model_type}").model), BUILDS[model_type]


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_sample_runs_and_roles_agree_with_plain_names(model_type: str) -> None:
    model = load_model(f"tiny:{model_type}").model
    assert _runs(model), SAMPLE[model_type]
    roles = infer_roles(model)
    checked = 0
    for path, role in roles.items():
        part = NAMED.get(path.rsplit(".", 1)[-1])
        if part is None:
            continue
        assert not role.uncertain, (path, role.uncertain)
        family, _, have = str(role).partition(".")
        assert have == part and family in ("attn", "xattn", "mlp"), (path, str(role), role.evidence)
        checked += 1
    if model_type == "mamba":
        assert roles["backbone.layers.0.mixer.in_proj"] == "mixer.in"
        assert roles["backbone.layers.0.mixer.out_proj"] == "mixer.out"
    else:
        assert checked >= 4


# Inputs a config alone does not size (issue 13, helper zinputs): the input named here is in the
# call that runs (the model's own forward is the oracle; without that input it does not run).
INPUTS = {
    "deepseek_ocr2_encoder": ("num_patches", "an int sized by another input: half the tokens are patches"),
    "qwen3_asr_encoder": ("input_features_mask", "log-mel frames in whole 2 x n_window chunks, mels first"),
    "qwen2_5_omni_audio_encoder": ("feature_lens", "one clip's (mels, frames), unbatched, with its length"),
    "muse_spark_audio": ("input_values", "raw samples a multiple of samples_per_token"),
    "hunyuan_vl_vision": ("grid_thw", "flattened patches in the docstring's shape, with their grid"),
    "minicpm_ocr_vision": ("target_sizes", "the patch grid of the pixels"),
    "kosmos-2": ("image_embeds_position_mask", "latent_query_num token positions for the image"),
    "idefics": ("image_attention_mask", "images per sample, each token attending to them"),
    "sam3_detr_encoder": ("vision_pos_embeds", "list-typed feature maps with position encodings alike"),
    "sam3_mask_decoder": ("backbone_features", "a feature pyramid, one level per upsampling stage"),
    "lxmert": ("visual_feats", "detected regions: features and boxes"),
    "decision_transformer": ("returns_to_go", "a trajectory: states, actions, rewards, returns"),
    "molmo2_adapter": ("pooled_patches_idx", "required inputs shaped from the forward's docstring"),
    "xmod": ("lang_ids", "the language adapter to run"),
    "qwen3_omni_moe_talker_code_predictor": ("inputs_embeds", "a decoder that takes embeddings only"),
    "rag": ("context_input_ids", "retrieved passages in place of a retriever"),
    "dia_decoder": ("input_ids", "codebook ids in the docstring's (batch, sequence, codebooks)"),
    "moshi_depth": ("last_hidden_state", "the main decoder's states that condition a depth decoder"),
    "blt_local_encoder": ("patch_ids", "bytes pooled into patches"),
    "pp_ocrv5_mobile_rec": ("pixel_values", "an image larger than 64 x 64 for a deep conv stack"),
    "pi0": ("pixel_attention_mask", "one image per camera, each present"),
    "inkling_vision": ("pixel_values", "channels-last patch cubes (patches, frames, patch, patch, channels)"),
    "qwen2_5_omni_dit": ("speaker_embedding", "a code-to-mel DiT's codes, speaker and mel frames"),
    "voxtral_realtime": ("input_features", "audio_length_per_tok mel frames per text token, mels first"),
    "gemma4_audio": ("input_features", "a usual mel count (128) the code fixes, no config key names"),
    "inkling_audio": ("audio_input_ids", "ids per mel bin in the docstring's (audios, frames, mels)"),
    "florence_vision": ("hidden_states", "an image under another name: its first layer is a Conv2d"),
    "vibevoice_acoustic_tokenizer_encoder": ("hidden_states", "raw mono samples for a Conv1d(1, ...)"),
    "dia": ("decoder_input_ids", "codebook ids in the docstring's last layout (batch, seq, codebooks)"),
    "dots3_note_vision_encoder": ("grid_thw", "flattened patches a conv embedding views as (-1, 3, p, p)"),
    "kimi_k25_vision": ("grid_thw", "patches as small images (patches, channels, patch, patch)"),
    "molmo2_vision": ("pixel_values", "one image's patches at the configured image size"),
    "gemma4_vision": ("pixel_position_ids", "a patch grid its pooling kernel divides"),
    "inkling2_vision": ("image_grid_thw", "patches the docstring counts in merged image tokens"),
    "ernie4_5_vl_moe_vision": ("grid_thw", "hidden_states that are flattened patches, one row each"),
    "xcodec2": ("input_values", "raw audio as long as its semantic tower's mel frames; concatenated widths"),
}


@pytest.mark.parametrize("model_type", sorted(INPUTS))
def test_inputs_a_config_does_not_size_run(model_type: str) -> None:
    name, why = INPUTS[model_type]
    model = load_model(f"tiny:{model_type}").model
    running = next((c for c in input_candidates(model, "cpu") if _calls(model, c)), None)
    assert running is not None, why
    assert name in {n for n, _ in (*running.kwargs, *running.options)}, why


def test_missing_inputs_name_an_object_no_config_sizes() -> None:
    from surgeon.capture.synthesize import missing_inputs

    model = load_model("tiny:sam2_video").model  # its forward steps a processor-made session
    assert missing_inputs(model) == ("inference_session (of type Sam2VideoInferenceSession, not a tensor)",)


def test_shrunk_sizes_keep_the_relations_the_modeling_code_needs() -> None:
    """Oracle: the relation each architecture's code imposes between two config sizes."""
    from surgeon.models.tiny import shrink_config_dict

    sam = shrink_config_dict({"vision_config": {"model_type": "v", "hidden_size": 768, "output_channels": 256},
                              "prompt_encoder_config": {"model_type": "p", "hidden_size": 256}})
    assert sam["vision_config"]["output_channels"] == sam["prompt_encoder_config"]["hidden_size"] < 256

    kv = shrink_config_dict({"num_attention_heads": 16, "num_hidden_layers": 4,
                             "num_key_value_heads_per_layer": [16, 8, 8, 16]})
    per_layer = kv["num_key_value_heads_per_layer"]
    assert per_layer[0] == kv["num_attention_heads"] and all(kv["num_attention_heads"] % h == 0 for h in per_layer)

    zamba = shrink_config_dict({"hidden_size": 2560, "attention_hidden_size": 5120, "num_hidden_layers": 6,
                                "layers_block_type": ["m", "m", "h", "m", "m", "h"], "hybrid_layer_ids": [2, 5]})
    assert zamba["attention_hidden_size"] == 2 * zamba["hidden_size"]
    assert zamba["hybrid_layer_ids"] == [i for i, kind in enumerate(zamba["layers_block_type"]) if kind == "h"]

    grids = shrink_config_dict({"image_size": 1008, "patch_size": 14,
                                "backbone_feature_sizes": [[288, 288], [144, 144], [72, 72]]})
    side = grids["image_size"] // grids["patch_size"]
    assert grids["backbone_feature_sizes"] == [[4 * side] * 2, [2 * side] * 2, [side] * 2]

    lilt = shrink_config_dict({"hidden_size": 768, "max_2d_position_embeddings": 1024})
    assert 6 * (lilt["hidden_size"] // 6) == lilt["hidden_size"]


def test_shrunk_configs_keep_what_the_code_reads_unset_or_tapped() -> None:
    """Oracle: the value the modeling code indexes or compares with (Mllama, Step3, BLIP-2)."""
    from surgeon.models.tiny import shrink_config_dict

    mllama = shrink_config_dict({"hidden_size": 1280, "num_hidden_layers": 32, "vision_output_dim": 7680,
                                 "intermediate_layers_indices": [3, 7, 15, 23, 30]})
    indices = mllama["intermediate_layers_indices"]
    assert len(indices) == 5 and max(indices) <= mllama["num_hidden_layers"]  # hidden_states has layers + 1
    assert mllama["vision_output_dim"] == mllama["hidden_size"] * (len(indices) + 1)

    step = shrink_config_dict({"image_token_id": 151679, "text_config": {
        "model_type": "t", "vocab_size": 128815, "sliding_window": None, "num_sliding_attention_heads": 64}})
    assert step["image_token_id"] < step["text_config"]["vocab_size"]
    assert 0 < step["text_config"]["sliding_window"]

    blip = shrink_config_dict({"image_token_index": None, "text_config": {"model_type": "t", "vocab_size": 50272}})
    assert 0 <= blip["image_token_index"] < blip["text_config"]["vocab_size"]
