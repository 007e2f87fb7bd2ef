"""adapter_config.json from a newer peft: unknown fields left off load with one warning naming
them (as peft loads them: ignored, with a warning), and give peft's outputs; an unknown field
switched on, or a known field whose variant surgeon does not implement, is refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import surgeon
from surgeon.errors import UserError


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def _checkpoint(folder, **extra):
    """A peft-written LoRA checkpoint with `extra` fields added to its adapter_config.json."""
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    model.save_pretrained(folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    return folder


IDS = torch.arange(12).reshape(2, 6)


def test_unknown_fields_that_are_off_load_with_one_warning(tmp_path):
    folder = _checkpoint(tmp_path / "a", use_zeta=False, zeta_config=None, zeta_modules=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = surgeon.load_adapter(_model(), folder)
    ours = [str(w.message) for w in caught if "does not know" in str(w.message)]
    assert len(ours) == 1 and all(f"`{k}`" in ours[0] for k in ("use_zeta", "zeta_config", "zeta_modules"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns too ("Unexpected keyword arguments ...")
        oracle = peft.PeftModel.from_pretrained(_model(), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, oracle(IDS).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("extra", [{"use_zeta": True}, {"zeta_rank": 4}])
def test_unknown_fields_that_are_on_are_refused(tmp_path, extra):
    folder = _checkpoint(tmp_path / "a", **extra)
    model = _model()
    with pytest.raises(UserError, match=f"`{next(iter(extra))}` is not a field"):
        surgeon.load_adapter(model, folder)
    assert not any(type(m).__module__.startswith("surgeon") for m in model.modules())


@pytest.mark.parametrize("extra", [{"use_qalora": True}, {"alora_invocation_tokens": [1, 2]},
                                   {"layer_replication": [[0, 2], [1, 2]]}])
def test_known_variants_surgeon_does_not_implement_are_refused(tmp_path, extra):
    with pytest.raises(UserError, match=next(iter(extra))):
        surgeon.load_adapter(_model(), _checkpoint(tmp_path / "a", **extra))
