"""`tokens` rules (PEFT's trainable_token_indices) against PEFT 0.21: checkpoints both ways,
trainable parameters, merge_and_unload, and a failed apply leaving the model unchanged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

import surgeon.api as S
from surgeon.peft_format import files
from tests.core.test_oracle import ATOL, max_diff, quiet
from tests.models import CASES

SPECS = {
    "dict": "adapter default = lora(r=4) { target q_proj, v_proj  tokens embed_tokens [1, 3, 5] }",
    "list": "adapter default = lora(r=4) { target q_proj, v_proj  tokens [1, 3, 5] }",
}
IDS = torch.tensor([[1, 2, 3, 4, 5, 6], [5, 3, 1, 0, 7, 9]])  # rows 1, 3, 5 are used


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int = 3) -> None:
    """Random lora_B and token rows, so both parts change the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name or "trainable_tokens_delta" in name:
            p.copy_(torch.randn(p.shape, generator=g))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.detach().clone()


def trainable(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("form", sorted(SPECS))
def test_surgeon_checkpoint_loads_in_peft(tmp_path: Path, form: str):
    case = CASES["llama"]
    base = case.build()
    model = S.apply(SPECS[form], copy.deepcopy(base))
    scramble(model)
    assert all("lora_" in n or n.endswith("token_adapter.trainable_tokens_delta.default")
               for n in trainable(model))
    assert "model.embed_tokens.token_adapter.trainable_tokens_delta.default" in trainable(model)
    assert logits(model).sub(logits(base)).abs().max() > 1e-3
    S.save_pretrained(model, tmp_path)
    ctx = quiet()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ctx.__exit__(None, None, None)
    assert trainable(pm) == set()  # loaded for inference in both
    assert max_diff(logits(pm), logits(model)) <= ATOL
    tensors = files.read_checkpoint(tmp_path)[1]
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in tensors
    ctx = quiet()
    pm_full = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 3, 5]))
    ctx.__exit__(None, None, None)
    assert set(tensors) == set(get_peft_model_state_dict(pm_full))  # no missing / unexpected keys


def test_peft_checkpoint_loads_in_surgeon(tmp_path: Path):
    case = CASES["llama"]
    base = case.build()
    ctx = quiet()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 3, 5]))
    ctx.__exit__(None, None, None)
    scramble(pm)
    want_trainable = trainable(pm)
    pm.save_pretrained(tmp_path)
    model = S.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert max_diff(logits(model), logits(pm)) <= ATOL
    # the rows train as in PEFT's is_trainable=True (LoRA's own flags are checked elsewhere)
    assert {n for n in trainable(model) if "token" in n} == {n for n in want_trainable if "token" in n}
    assert "model.embed_tokens.token_adapter.trainable_tokens_delta.default" in want_trainable


def test_merge_and_unload_matches_peft():
    case = CASES["llama"]
    base = case.build()
    model = S.apply(SPECS["dict"], copy.deepcopy(base))
    scramble(model)
    ctx = quiet()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": [1, 3, 5]}))
    ctx.__exit__(None, None, None)
    pm.load_state_dict({f"base_model.model.{k}": v for k, v in model.state_dict().items()})
    assert max_diff(logits(pm), logits(model)) <= ATOL
    plain = S.merge_and_unload(model)
    theirs = pm.merge_and_unload()
    assert type(plain.model.embed_tokens) is torch.nn.Embedding
    assert max_diff(plain.model.embed_tokens.weight, theirs.model.embed_tokens.weight) == 0
    assert max_diff(logits(plain), logits(theirs)) <= ATOL


def test_disable_and_failed_apply_leave_base():
    case = CASES["llama"]
    base = case.build()
    model = S.apply(SPECS["list"], copy.deepcopy(base))
    scramble(model)
    with S.disable_adapters(model):
        assert max_diff(logits(model), logits(base)) <= ATOL
    fresh = copy.deepcopy(base)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(Exception):  # the second rule cannot also adapt the embedding
        S.apply("adapter default = lora(r=4) { target embed_tokens  tokens embed_tokens [1] }", fresh)
    assert type(fresh.model.embed_tokens) is torch.nn.Embedding
    after = fresh.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_error_during_commit_rolls_back(monkeypatch):
    import surgeon.runtime.transaction as T

    base = CASES["llama"].build()
    model = copy.deepcopy(base)
    embedding = model.model.embed_tokens

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(T, "install_hooks", boom)
    with pytest.raises(RuntimeError, match="boom"):
        S.apply(SPECS["dict"], model)
    assert model.model.embed_tokens is embedding
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert max_diff(logits(model), logits(base)) == 0


def test_tied_output_embedding_follows_rows(tmp_path: Path):
    from tests.models import tiny_llama

    base = tiny_llama(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = S.apply(SPECS["dict"], copy.deepcopy(base))
    scramble(model)
    assert type(model.lm_head).__name__ == "TokenWrapper"  # shares the embedding's rows
    assert max_diff(model.lm_head.weight, model.model.embed_tokens.weight) == 0
    S.save_pretrained(model, tmp_path)
    ctx = quiet()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ctx.__exit__(None, None, None)
    assert type(pm.base_model.model.lm_head).__name__ == "TrainableTokensWrapper"
    assert max_diff(logits(pm), logits(model)) <= ATOL
    assert set(files.read_checkpoint(tmp_path)[1]) == set(get_peft_model_state_dict(pm))
    plain, theirs = S.merge_and_unload(model), pm.merge_and_unload()
    assert max_diff(logits(plain), logits(theirs)) <= ATOL
