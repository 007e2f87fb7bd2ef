"""`apply` and `merge` through the command line, with PEFT as the oracle.

- `apply` writes a checkpoint that `peft.PeftModel.from_pretrained` loads with no missing or
  unexpected keys and the same outputs as PEFT with the same (zero-B) initialisation.
- `merge` folds a checkpoint *written by PEFT* (random non-zero B) into the model, and the saved
  model's logits equal PEFT's own `merge_and_unload`.
- Failures (unwritable output, missing adapter folder, internal errors) leave nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.cli.runner import EXAMPLES, assert_user_error, listing, surgeon

IDS = torch.arange(12)[None]


def tiny_llama():
    from surgeon.models.load import load_model

    return load_model("tiny:llama").model


def test_apply_writes_a_checkpoint_peft_loads(tmp_path: Path):
    from peft import PeftModel

    result = surgeon("apply", EXAMPLES / "two_adapters.peft", "--model", "tiny:llama", "-o", "out",
                     "--seed", "3", cwd=tmp_path)
    assert result.rc == 0, result
    assert "18 sites" in result.out and "trainable%" in result.out, result
    assert listing(tmp_path / "out") == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                         "summarise", "summarise/adapter_config.json",
                                         "summarise/adapter_model.safetensors"]
    base = tiny_llama()
    with torch.no_grad():
        expected = base(IDS).logits
    loaded = PeftModel.from_pretrained(base, tmp_path / "out")
    loaded.load_adapter(tmp_path / "out" / "summarise", adapter_name="summarise")
    assert set(loaded.peft_config) == {"default", "summarise"}
    with torch.no_grad():  # LoRA starts with B = 0: the adapted model computes the base model
        assert torch.allclose(loaded(IDS).logits, expected, atol=1e-6)
    a_weights = [n for n, _ in loaded.named_parameters() if "lora_A.default" in n]
    assert len(a_weights) == 4  # q and v in two layers, as the spec's roles say


def test_merge_a_peft_checkpoint_equals_peft_merge(tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft_ckpt")
    with torch.no_grad():
        expected = peft_model.merge_and_unload()(IDS).logits

    result = surgeon("merge", "--model", "tiny:llama", "--adapter", "peft_ckpt", "-o", "merged", cwd=tmp_path)
    assert result.rc == 0, result
    assert "merging ..." in result.err and "wrote merged" in result.out, result
    assert listing(tmp_path / "merged") == ["config.json", "generation_config.json", "model.safetensors"]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, expected, atol=1e-5)


def test_failures_leave_no_partial_output(tmp_path: Path):
    (tmp_path / "a_file").write_text("x")
    before = listing(tmp_path)
    unwritable = surgeon("apply", EXAMPLES / "lora_qv.peft", "--model", "tiny:llama", "-o", "a_file/out",
                         cwd=tmp_path)
    assert_user_error(unwritable, "cannot write", "not a directory")
    no_adapter = surgeon("merge", "--model", "tiny:llama", "--adapter", "nowhere", "-o", "merged",
                         cwd=tmp_path)
    assert_user_error(no_adapter, "--adapter 'nowhere'", "no such directory")
    unknown = surgeon("apply", EXAMPLES / "lora_qv.peft", "--model", "tiny:llama", "-o", "out",
                      "--adapter", "nope", cwd=tmp_path)
    assert_user_error(unknown, "--adapter 'nope'", "'default'")
    assert listing(tmp_path) == before


def test_an_error_while_writing_removes_the_partial_directory(tmp_path: Path, monkeypatch, capsys):
    """An internal error mid-write: exit 1, a short message, no traceback, no leftovers."""
    import surgeon.api
    from surgeon.cli.main import main

    def fail_halfway(model, path, **kwargs):
        (Path(path) / "adapter_config.json").write_text("{}")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(surgeon.api, "save_pretrained", fail_halfway)
    spec = tmp_path / "names.peft"
    spec.write_text("adapter default = lora(r=2) { target fc1 }")
    model = f"py:{Path(__file__).with_name('factories.py')}:tiny_net"
    rc = main(["apply", str(spec), "--model", model, "-o", str(tmp_path / "deep" / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "internal error: RuntimeError: disk on fire" in err and "--debug" in err, err
    assert "Traceback" not in err
    assert listing(tmp_path) == ["names.peft"]
    rc = main(["apply", str(spec), "--model", model, "-o", str(tmp_path / "out"), "--debug"])
    assert rc == 1 and "Traceback" in capsys.readouterr().err


def test_convert_with_a_model_writes_exact_targets(tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    result = surgeon("convert", EXAMPLES / "lora_qv.peft", "--model", "tiny:llama", "-o", "cfg", cwd=tmp_path)
    assert result.rc == 0, result
    config = LoraConfig.from_pretrained(tmp_path / "cfg")
    peft_model = get_peft_model(tiny_llama(), config)
    adapted = sorted(n.removesuffix(".lora_A.default.weight").removeprefix("base_model.model.")
                     for n, _ in peft_model.named_parameters() if n.endswith("lora_A.default.weight"))
    assert adapted == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]
    assert json.loads((tmp_path / "cfg" / "adapter_config.json").read_text())["r"] == 8
