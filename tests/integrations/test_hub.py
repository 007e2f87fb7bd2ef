"""`surgeon.load_adapter(model, "user/repo", revision=...)` and `--adapter user/repo` go through
huggingface_hub's cache, offline, with peft (loading the same ids from the same cache) as the
oracle. The test builds the Hub cache itself (refs/<branch> -> snapshots/<commit>/files)."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
hub_constants = pytest.importorskip("huggingface_hub.constants")

import surgeon
from surgeon.cli.arguments import adapter_arg, add_adapter_arguments
from surgeon.errors import UserError
from surgeon.integrations.hub import adapter_folder, is_hub_id

IDS = torch.arange(12).reshape(2, 6)
COMMITS = {"main": "a" * 40, "v2": "b" * 40}


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A Hub cache holding `user/lora` at `main` (r=4, seed 1) and `v2` (r=2, seed 2), offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--user--lora"
    for (branch, commit), r in zip(COMMITS.items(), (4, 2), strict=True):
        torch.manual_seed(r)
        model = peft.get_peft_model(_model(), peft.LoraConfig(r=r, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
        model.save_pretrained(tmp_path / branch)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(tmp_path / branch / name, snapshot / name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("revision", [None, "v2", COMMITS["v2"]])
def test_load_adapter_from_a_hub_id(offline_cache, revision):
    ours = surgeon.load_adapter(_model(), "user/lora", revision=revision)
    oracle = peft.PeftModel.from_pretrained(_model(), "user/lora", revision=revision or "main").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, oracle(IDS).logits, atol=1e-6, rtol=0)
    r = next(p for n, p in ours.named_parameters() if "lora_A" in n).shape[0]
    assert r == (4 if revision is None else 2)


def test_adapter_argument_resolves_hub_ids(offline_cache):
    parser = argparse.ArgumentParser()
    add_adapter_arguments(parser)
    args = parser.parse_args(["--adapter", "user/lora", "--revision", "v2"])
    assert adapter_arg(args) == offline_cache / "models--user--lora" / "snapshots" / COMMITS["v2"]


def test_missing_repo_offline_is_one_clear_error(offline_cache):
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        surgeon.load_adapter(_model(), "user/absent")
    with pytest.raises(UserError, match="no revision|not in the local cache"):
        surgeon.load_adapter(_model(), "user/lora", revision="v9")


def test_local_paths_stay_local(tmp_path):
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("adapter") and not is_hub_id("./a/b")
    assert is_hub_id("user/repo") and is_hub_id("Org-1/model.v2_x")
    assert adapter_folder(tmp_path) == tmp_path
    with pytest.raises(UserError, match="revision"):
        adapter_folder(str(tmp_path), revision="v2")
