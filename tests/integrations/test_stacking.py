"""A model that already carries peft's adapters (peft.get_peft_model, or transformers' adapter
integration, which injects the same peft layers) is refused with one clear PlanError instead of
having peft's own lora_A/lora_B adapted as if they were the model's layers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import surgeon
from surgeon.errors import UserError

SPEC = "adapter s = lora(r=2) { target all-linear }"


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def _peft_model():
    return peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _target(which: str):
    if which == "injected":  # what transformers' `model.add_adapter(LoraConfig(...))` does inside
        return peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["q_proj"]), _llama())
    peft_model = _peft_model()
    return peft_model if which == "peft_model" else peft_model.base_model.model


@pytest.mark.parametrize("which", ["peft_model", "inner_model", "injected"])
@pytest.mark.parametrize("call", ["apply", "plan"])
def test_a_model_with_peft_layers_is_refused(which, call):
    target = _target(which)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError, match="already carries peft adapters") as caught:
        getattr(surgeon, call)(SPEC, target)
    assert "merge_and_unload" in str(caught.value)
    # untouched: peft's layers are still peft's, no surgeon module anywhere
    assert target.state_dict().keys() == before.keys()
    assert not any(type(m).__module__.startswith("surgeon") for m in target.modules())


def test_load_adapter_onto_a_peft_model_is_refused(tmp_path):
    peft_model = _peft_model()
    peft_model.save_pretrained(tmp_path / "a")
    with pytest.raises(UserError, match="already carries peft adapters"):
        surgeon.load_adapter(peft_model.base_model.model, tmp_path / "a")


def test_after_merge_and_unload_surgeon_adapts_the_model():
    """What the message suggests works: the merged plain model takes surgeon's adapters."""
    plain = _peft_model().merge_and_unload()
    linear = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    surgeon.apply(SPEC, plain)
    assert {n for n in plain.state_dict() if ".lora_A." in n} == {f"{n}.lora_A.s.weight" for n in linear}
