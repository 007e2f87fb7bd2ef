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
}
# Architectures whose tiny config needed sizes kept consistent across sub-configs: the oracle is
# that the model builds and its own forward runs (their roles are checked by the sweep).
BUILDS = {
    "depth_anything": "the backbone outputs one feature map per neck size",
    "rt_detr": "backbone stages kept; the encoder's input widths follow the narrowed stages",
    "mask2former": "Swin keeps its stage count; windows fit the last stage",
    "bamba": "Mamba-2 heads split the expanded width exactly",
    "dac": "raw audio as (batch, channels, samples) for the codec's first conv",
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
