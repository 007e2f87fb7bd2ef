"""`tiny:<model_type>` builds a small, seeded model of many architectures, and it runs.

Oracle: the shrunk sizes are consistent enough for transformers itself to build the model and
run a forward pass on inputs made from its config; the same seed gives the same weights.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from surgeon.models.load import InputShape, ModelError, load_model

ARCHITECTURES = ("llama", "gpt2", "t5", "bert", "whisper", "vit", "clip", "blip-2", "mixtral",
                 "qwen2_vl", "deepseek_v3", "jamba", "falcon", "resnet", "swin", "opt", "bart")


def example_inputs(model) -> dict[str, torch.Tensor]:
    """Inputs from the model's own config: token ids, images or log-mel features."""
    config, ids = model.config, torch.zeros(1, 8, dtype=torch.long)
    if config.model_type == "whisper":
        frames = 2 * config.max_source_positions
        return {"input_features": torch.zeros(1, config.num_mel_bins, frames), "decoder_input_ids": ids}
    takes = inspect.signature(model.forward).parameters
    if "pixel_values" in takes and "input_ids" not in takes:
        size = getattr(config, "image_size", 64)
        return {"pixel_values": torch.zeros(1, config.num_channels, size, size)}
    return {"input_ids": ids, **({"decoder_input_ids": ids} if config.is_encoder_decoder else {})}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_tiny_models_build_small_and_run(model_type: str):
    model = load_model(f"tiny:{model_type}").model
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    if model_type not in ("clip", "blip-2", "qwen2_vl"):  # multimodal: need paired inputs
        with torch.no_grad():
            model(**example_inputs(model))


def test_tiny_models_are_reproducible_and_named_classes_work():
    first, second = (load_model("tiny:llama").model.state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    cls = load_model("tiny:bert:BertForSequenceClassification").model
    assert type(cls).__name__ == "BertForSequenceClassification"
    with pytest.raises(ModelError, match="no class 'NoSuchClass'"):
        load_model("tiny:bert:NoSuchClass")


def test_input_shapes():
    assert InputShape.parse("2x16") == InputShape((2, 16), "float32")
    assert InputShape.parse("1x8:int64").tensor().dtype == torch.int64
    for bad in ("2x", "x3", "2x-1", "2x3:float13", "abc", ""):
        with pytest.raises(ValueError):
            InputShape.parse(bad)
    loaded = load_model("py:torch.nn:Identity", inputs=(InputShape.parse("2x4"), InputShape.parse("3:int32")))
    assert [t.shape for t in loaded.example_inputs] == [torch.Size([2, 4]), torch.Size([3])]


# Input kinds (issue 13): the synthesized call names the kind, and transformers runs it.
INPUT_KINDS = {
    "layoutlm": "bbox",
    "wav2vec2": "input_values",
    "audio-spectrogram-transformer": "input_values",
    "canary_decoder": "encoder_hidden_states",
    "speech_to_text": "input_features",
    "qwen2_vl": "input_ids",  # multimodal RoPE sections shrunk with the head size
}


@pytest.mark.parametrize("model_type", sorted(INPUT_KINDS))
def test_synthesized_inputs_run(model_type: str):
    from surgeon.capture.synthesize import input_candidates

    model = load_model(f"tiny:{model_type}").model
    calls = input_candidates(model, "cpu")
    assert any(INPUT_KINDS[model_type] in dict(c.kwargs) for c in calls)
    errors = []
    for call in calls:  # most complete first, as capture tries them
        args, kwargs = call.split(call.flat())
        try:
            with torch.no_grad():
                model(*args, **kwargs)
            return
        except Exception as error:  # noqa: BLE001
            errors.append(error)
    raise AssertionError(f"no synthesized call runs: {errors}")
