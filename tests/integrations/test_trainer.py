"""transformers' own save paths on a surgeon-adapted model: `Trainer` end to end (train, checkpoint,
resume, save_model, reload in a fresh process) and `model.save_pretrained`.

peft is the oracle for what a saved folder means: `PeftModel.from_pretrained(base, folder)` must
give the trained model's logits, and the folder must not hold a full model (which
`from_pretrained` would load with the adapted layers missing and random, the bug of issue 16).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import surgeon
from surgeon.peft_format.files import CheckpointError

SPEC = "adapter default = lora(r=4, alpha=8, init=false) { target q_proj, v_proj  save lm_head }"


def _base(folder) -> str:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _adapted(base: str):
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    return surgeon.apply(SPEC, model)


def _batch() -> torch.Tensor:
    return torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(1))


def _trainer(model, out, **extra):
    args = transformers.TrainingArguments(
        str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0, **extra)
    data = [{"input_ids": row, "labels": row} for row in _batch()]
    return transformers.Trainer(model=model, args=args, train_dataset=data)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    model.eval()
    return model(_batch()).logits


def _peft_logits(base: str, folder) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), str(folder))
    return _logits(model)


def test_trainer_end_to_end(tmp_path):
    base = _base(tmp_path / "base")
    model = _adapted(base)
    _trainer(model, tmp_path / "run").train()
    trained = _logits(model)
    assert not torch.allclose(trained, _logits(transformers.LlamaForCausalLM.from_pretrained(base)), atol=1e-3)

    # checkpoints and save_model write PEFT adapter folders, never a full model
    final = tmp_path / "final"
    _trainer(model, tmp_path / "run").save_model(str(final))
    for folder in (tmp_path / "run" / "checkpoint-2", final):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert "model.safetensors" not in names and "config.json" not in names
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    torch.testing.assert_close(_peft_logits(base, final), trained, atol=1e-5, rtol=0)

    # resume from the step-2 checkpoint on a freshly adapted model: the same final weights
    again = _adapted(base)
    _trainer(again, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(_logits(again), trained, atol=1e-5, rtol=0)

    # a fresh process reloads the saved folder with peft and with surgeon: the same logits
    torch.save(trained, tmp_path / "trained.pt")
    script = textwrap.dedent(f"""
        import torch, transformers, peft, surgeon
        ids = torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(1))
        want = torch.load({str(tmp_path / "trained.pt")!r})
        load = lambda: transformers.LlamaForCausalLM.from_pretrained({base!r}).eval()
        with torch.no_grad():
            a = peft.PeftModel.from_pretrained(load(), {str(final)!r})(ids).logits
            b = surgeon.load_adapter(load(), {str(final)!r})(ids).logits
        torch.testing.assert_close(a, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(b, want, atol=1e-5, rtol=0)
        print("fresh process: equal logits")
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "equal logits" in done.stdout


def test_save_pretrained_writes_the_adapter(tmp_path):
    base = _base(tmp_path / "base")
    model = _adapted(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    torch.testing.assert_close(_peft_logits(base, tmp_path / "adapter"), _logits(model), atol=1e-5, rtol=0)
    assert model.active_adapters() == ["default"] and list(model.peft_config) == ["default"]


def test_merged_model_saves_whole_and_reloads(tmp_path):
    """After merge_and_unload the model is plain again: save_pretrained writes a full model."""
    base = _base(tmp_path / "base")
    model = _adapted(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    want = _logits(model)
    plain = surgeon.merge_and_unload(model)
    assert "_hf_peft_config_loaded" not in plain.__dict__ and "peft_config" not in plain.__dict__
    plain.save_pretrained(tmp_path / "full")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(_logits(reloaded), want, atol=1e-5, rtol=0)


def test_load_state_dict_of_a_misfit_adapter_is_an_error(tmp_path):
    """Trainer's resume path (`load_state_dict` of PEFT keys) never loads a partial adapter silently."""
    base = _base(tmp_path / "base")
    model = _adapted(base)
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    tensors.pop(next(k for k in tensors if "lora_A" in k))
    with pytest.raises(CheckpointError, match="missing key"):
        model.load_state_dict(tensors, strict=False)



def test_a_deep_copy_saves_its_own_adapter_and_detaches_alone(tmp_path):
    base = _base(tmp_path / "base")
    model = _adapted(base)
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.normal_()
    twin.save_pretrained(tmp_path / "twin")
    torch.testing.assert_close(_peft_logits(base, tmp_path / "twin"), _logits(twin), atol=1e-5, rtol=0)
    surgeon.unload(twin)
    model.save_pretrained(tmp_path / "model")  # the original still saves its adapter
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    assert not (tmp_path / "model" / "model.safetensors").exists()
    assert len(model._load_state_dict_pre_hooks) == 1 and not twin._load_state_dict_pre_hooks


def test_load_state_dict_of_a_dora_adapter(tmp_path):
    """Trainer's resume path on DoRA: the hook maps PEFT's keys (the magnitude has no `.weight`
    there) and the outputs after a forward that built the caches are the trained model's."""
    base = _base(tmp_path / "base")
    spec = "adapter default = lora(r=4, dora=true, init=false) { target q_proj, v_proj }"
    trained = surgeon.apply(spec, transformers.LlamaForCausalLM.from_pretrained(base))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p))
    trained.save_pretrained(tmp_path / "dora")
    fresh = surgeon.apply(spec, transformers.LlamaForCausalLM.from_pretrained(base))
    _logits(fresh)  # a forward first, so caches exist and would go stale
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(tmp_path / "dora" / "adapter_model.safetensors"), strict=False)
    torch.testing.assert_close(_logits(fresh), _logits(trained), atol=1e-5, rtol=0)
    torch.testing.assert_close(_peft_logits(base, tmp_path / "dora"), _logits(trained), atol=1e-5, rtol=0)


def test_no_adapter_left_is_a_clear_error(tmp_path):
    model = _adapted(_base(tmp_path / "base"))
    surgeon.delete_adapter(model, "default")
    from surgeon.errors import UserError

    with pytest.raises(UserError, match="surgeon.unload"):
        model.save_pretrained(tmp_path / "x")


def test_transformers_adapter_methods_act_on_surgeon_adapters(tmp_path):
    """`model.load_adapter/set_adapter/disable_adapters/delete_adapter` (transformers' names) on a
    surgeon-adapted model, checked against peft holding the same two adapters."""
    base = _base(tmp_path / "base")
    other = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    other.save_pretrained(tmp_path / "other")
    model = _adapted(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "first")
    model.load_adapter(str(tmp_path / "other"), "other")
    model.set_adapter("other")
    oracle = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), str(tmp_path / "first"))
    oracle.load_adapter(str(tmp_path / "other"), "other")
    oracle.set_adapter("other")
    torch.testing.assert_close(_logits(model), _logits(oracle), atol=1e-5, rtol=0)
    model.disable_adapters()
    torch.testing.assert_close(_logits(model), _logits(transformers.LlamaForCausalLM.from_pretrained(base)),
                               atol=1e-6, rtol=0)
    model.enable_adapters()
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]


def test_a_pickled_model_loads_and_keeps_its_adapter_protocol(tmp_path):
    """`torch.save(model)` pickles the whole module: the protocol methods bound on the instance
    must come back as surgeon's (a bound function would unpickle as `getattr(model, name)`, which
    failed: `_active_adapters`), and the loaded model must compute and save as the original."""
    import io

    base = _base(tmp_path / "base")
    model = _adapted(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.active_adapters() == ["default"] and loaded.active_adapters.model is loaded
    loaded.save_pretrained(tmp_path / "loaded")
    torch.testing.assert_close(_peft_logits(base, tmp_path / "loaded"), _logits(model), atol=1e-5, rtol=0)
