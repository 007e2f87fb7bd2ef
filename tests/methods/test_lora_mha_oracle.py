"""LoRA on nn.MultiheadAttention itself, against PEFT 0.21 (the oracle).

Targeting the attention module adapts its in_proj (through the module) and its out_proj (a
nested adapted Linear with PEFT's `base_layer.out_proj.lora_*` keys). Cases: a plain module
holding an MHA (called with key, value, masks and need_weights) and nn.TransformerEncoder.
Each case checks both checkpoint directions, the outputs in training mode (torch's inference
fast path, which skips adapters in PEFT too, stays off) and layer-level merge/unmerge.
PEFT 0.21 adds the out_proj delta twice (huggingface/peft#3774); the first test pins that
behaviour, so a PEFT release that fixes it fails here rather than silently diverging.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import surgeon.api as S
from surgeon.methods.lora import mha
from surgeon.planning.planner import PlanError, plan
from surgeon.runtime.wrappers import adapted_layers

ATOL = 1e-5


class Attend(nn.Module):
    """A plain MHA called with every argument PEFT's layer forwards (key, value, masks...)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        mask[:, -1] = True
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        out, weights = self.attn(x, x.flip(1), x, key_padding_mask=mask, need_weights=True,
                                 attn_mask=causal, average_attn_weights=False)
        return self.head(out) + weights.sum()


def attend() -> nn.Module:
    torch.manual_seed(0)
    return Attend().eval()


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor notice
        return nn.TransformerEncoder(layer, 2).eval()


CASES = {"attend": (attend, ["attn"]), "encoder": (encoder, ["self_attn"])}


def inputs() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def run(model: nn.Module) -> torch.Tensor:
    model.train()
    try:
        with torch.no_grad():
            return model(inputs()).clone()
    finally:
        model.eval()


def peft_model(base: nn.Module, targets: list[str], **config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=targets, r=4,
                                                            lora_alpha=8, **config))
    randomize(pm)
    return pm


def quiet_load(base: nn.Module, folder: Path, trainable: bool = False) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the encoder's fast-path notice
        return S.load_adapter(copy.deepcopy(base), folder, is_trainable=trainable)


def test_peft_adds_the_out_proj_delta_twice():
    """The oracle's behaviour surgeon reproduces (mha.PEFT_OUT_PROJ_TIMES), shown by math."""
    base = attend()
    pm = peft_model(base, ["attn"])
    layer = pm.base_model.model.attn
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.attn.in_proj_weight += layer.get_delta_weight("default")
        ref.attn.out_proj.weight += 2 * layer.base_layer.out_proj.get_delta_weight("default")
    assert (run(pm) - run(ref)).abs().max() <= ATOL
    assert mha.PEFT_OUT_PROJ_TIMES == 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoints_cross_both_ways(case: str, tmp_path: Path):
    build, targets = CASES[case]
    base = build()
    pm = peft_model(base, targets)
    pm.save_pretrained(tmp_path / "peft")
    expected = run(pm)
    assert (expected - run(base)).abs().max() > 100 * ATOL
    ours = quiet_load(base, tmp_path / "peft")
    assert (run(ours) - expected).abs().max() <= ATOL
    S.save_pretrained(ours, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(written) == sorted(theirs)
    assert any(".base_layer.out_proj.lora_B.weight" in k for k in written)
    assert all(torch.equal(written[k], theirs[k]) for k in theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (run(back) - expected).abs().max() <= ATOL


def test_language_form_plans_the_attention_as_peft(tmp_path: Path):
    base = attend()
    planned = plan("adapter default = lora(r=4, alpha=8) { target attn }", base)
    assert [(s.path, s.kind) for s in planned.sites] == [("attn", "MultiheadAttention")]
    pm = peft_model(base, ["attn"])
    assert planned.sites[0].params == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    ours = S.apply("adapter default = lora(r=4, alpha=8) { target attn }", copy.deepcopy(base))
    ours_keys = {k for k in ours.state_dict() if "lora_" in k}
    peft_keys = {k.removeprefix("base_model.model.") for k in pm.state_dict() if "lora_" in k}
    assert ours_keys == peft_keys
    assert torch.equal(run(ours), run(base))  # B starts at zero
    torch.manual_seed(3)
    seeded = S.apply("adapter default = lora(r=4, alpha=8) { target attn }", copy.deepcopy(base))
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["attn"], r=4, lora_alpha=8))
    mine = dict(seeded.named_parameters())
    for name, p in twin.named_parameters():
        if "lora_" in name:  # PEFT's RNG order: out_proj, in_proj, out_proj again
            assert torch.equal(p, mine[name.removeprefix("base_model.model.")]), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_merge_and_unmerge_match_peft(case: str, tmp_path: Path):
    build, targets = CASES[case]
    base = build()
    pm = peft_model(base, targets)
    pm.save_pretrained(tmp_path / "peft")
    unmerged = run(pm)
    pm.merge_adapter()
    peft_merged = run(pm)
    ours = quiet_load(base, tmp_path / "peft")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    layers = [layer for _, layer in adapted_layers(ours) if layer.kind == mha.KIND]
    assert layers
    for layer in layers:
        layer.merge()
        assert layer.merged and layer.base_layer.out_proj.merged
    merged = run(ours)
    assert (merged - peft_merged).abs().max() <= ATOL
    assert (merged - unmerged).abs().max() <= 10 * ATOL
    for layer in layers:
        layer.unmerge()
        assert not layer.base_layer.out_proj.merged
    after = ours.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6
    assert (run(ours) - unmerged).abs().max() <= ATOL


def test_disabled_and_second_adapter_follow_peft(tmp_path: Path):
    base = attend()
    pm = peft_model(base, ["attn"])
    pm.save_pretrained(tmp_path / "one")
    other = peft_model(base, ["attn"], lora_dropout=0.0)
    randomize(other, seed=11)
    other.save_pretrained(tmp_path / "two")
    ours = quiet_load(base, tmp_path / "one")
    S.load_adapter(ours, tmp_path / "two", adapter_name="two")
    S.set_adapter(ours, "two")
    assert (run(ours) - run(other)).abs().max() <= ATOL
    with S.disable_adapters(ours):
        assert torch.equal(run(ours), run(base))


def test_refusals_are_peft_s():
    base = attend()
    with pytest.raises(ValueError, match="does not support DoRA"):
        S.apply("adapter default = lora(dora=true) { target attn }", copy.deepcopy(base))
    with pytest.raises(PlanError, match="out_proj of a MultiheadAttention") as info:
        plan("adapter default = lora() { target out_proj }", base)
    assert "target the MultiheadAttention `attn` itself" in str(info.value)
    ours = S.apply("adapter default = lora() { target attn }", copy.deepcopy(base))
    with pytest.raises(TypeError, match="mixed adapter batches"):
        ours.attn(inputs(), inputs(), inputs(), adapter_names=["default", "default"])


def test_gradients_match_peft_and_copies_run(tmp_path: Path):
    """Training: the deltas reach the factors through the substituted call, as through PEFT's
    merged weights; a deep copy (pickling state) keeps working."""
    base = attend()
    pm = peft_model(base, ["attn"])
    pm.save_pretrained(tmp_path / "peft")
    ours = quiet_load(base, tmp_path / "peft", trainable=True)
    for model in (pm, ours):
        model.train()
        model(inputs()).square().sum().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters()
             if "lora_" in n}
    mine = {n: p.grad for n, p in ours.named_parameters() if "lora_" in n}
    assert sorted(grads) == sorted(mine)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert torch.allclose(mine[name], grad, atol=1e-4, rtol=1e-4), name
    twin = copy.deepcopy(ours)
    assert torch.equal(run(twin), run(ours))


def test_a_failed_apply_leaves_the_attention_untouched():
    """Building the MHA layer nests an adapter on out_proj inside the user's MHA; when a later
    site of the same apply fails, that must be undone (apply is a transaction)."""
    import surgeon

    model = attend()
    out_proj = model.attn.out_proj
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the second adapter's `save attn` fails in prepare, after the first one built the MHA layer
    with pytest.raises(surgeon.PlanError, match="cannot also be saved whole"):
        surgeon.apply("adapter a = lora(r=4) { target attn }\n"
                      "adapter b = lora(r=4) { target head  save attn }", model)
    assert model.attn.out_proj is out_proj
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("case", ["attend", "encoder"])
def test_model_level_merge_and_unmerge_keep_the_outputs(case: str):
    """`surgeon.merge` / `unmerge` / `merge_and_unload` on a model whose MHA is adapted: the
    merged model computes what the unmerged one did (the nested out_proj merged once, by its MHA)."""
    import surgeon

    # the encoder in train mode (dropout 0): in eval mode torch's fast path skips adapters
    model = attend() if case == "attend" else encoder().train()
    x = torch.randn(2, 5, 16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    surgeon.apply("adapter default = lora(r=4, init=false) { target %s }" % (
        "attn" if case == "attend" else "self_attn"), model)
    with torch.no_grad():
        before = model(x)
        surgeon.merge(model)
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)
        surgeon.unmerge(model)
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)
        plain = surgeon.merge_and_unload(model)
        torch.testing.assert_close(plain(x), before, atol=ATOL, rtol=0)
    assert set(plain.state_dict()) == set(original)
