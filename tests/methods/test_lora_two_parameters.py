"""LoRA on both expert stacks of one module (`@moe.up, @moe.down`), against PEFT 0.21.

transformers 5 MoE models hold `gate_up_proj` and `down_proj` on one `experts` module; PEFT
nests a ParamWrapper per parameter (`target_parameters=[...gate_up_proj, ...down_proj]`).
Cases, on tiny Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss: plan sizes, seeded init and
state_dict keys; both checkpoint directions with equal outputs; merge/unmerge; rank/alpha per
parameter; two adapters switching; gradients; unloading.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import surgeon.api as S
from surgeon.errors import UserError
from surgeon.planning.planner import plan
from surgeon.runtime.wrappers import adapted_layers
from tests.roles.test_moe_roles import ARCHS

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
SPEC = "adapter default = lora(r=2, alpha=4) { target @moe.up, @moe.down }"
RULES = ("adapter default = lora(r=2, alpha=4) {\n  target @moe.up, @moe.down\n"
         "  rank 3 on param down_proj\n  alpha 6 on param gate_up_proj\n}")
PATTERNS = {"rank_pattern": {"down_proj": 3}, "alpha_pattern": {"gate_up_proj": 6}}
ATOL = 1e-4


def base_of(arch: str):
    torch.manual_seed(0)
    return ARCHS[arch]().eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(0))


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def twin(base, seed: int | None = 7, **config):
    """PEFT on both stacks; `seed`: factors drawn from it (B non-zero), else PEFT's init."""
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(
        **{"r": 2, "lora_alpha": 4, "target_modules": [], "target_parameters": TARGETS, **config}))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return pm


def lora_state(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in model.state_dict().items()}


def from_peft(base, folder: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), folder, **kwargs)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_plan_init_and_state_dict_are_peft_s(arch: str):
    base = base_of(arch)
    planned = plan(SPEC, base)
    assert [(s.path, s.option("parameter_name")) for s in planned.sites] == [
        (f"model.layers.{i}.mlp.experts", name) for i in (0, 1) for name in ("gate_up_proj", "down_proj")]
    torch.manual_seed(3)
    ours = S.apply(SPEC, copy.deepcopy(base))
    torch.manual_seed(3)
    theirs = twin(base, seed=None)
    assert planned.trainable_params == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    mine, peft_keys = lora_state(ours), lora_state(theirs, "base_model.model.")
    assert sorted(mine) == sorted(peft_keys)  # the whole state_dict: base keys nest as PEFT's
    assert all(torch.equal(mine[k], peft_keys[k]) for k in peft_keys)
    assert "model.layers.0.mlp.experts.base_layer.lora_A.default.weight" in mine
    assert torch.equal(run(ours), run(base))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpoints_cross_both_ways(arch: str, tmp_path: Path):
    base = base_of(arch)
    pm = twin(base)
    pm.save_pretrained(tmp_path / "peft")
    expected = run(pm)
    assert (expected - run(base)).abs().max() > 100 * ATOL
    ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (run(ours) - expected).abs().max() <= ATOL
    S.save_pretrained(ours, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(written) == sorted(theirs)
    assert all(torch.equal(written[k], theirs[k]) for k in theirs)
    assert (run(from_peft(base, tmp_path / "ours")) - expected).abs().max() <= ATOL


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_merge_unmerge_and_unload_match_peft(arch: str, tmp_path: Path):
    base = base_of(arch)
    pm = twin(base)
    pm.save_pretrained(tmp_path / "peft")
    unmerged = run(pm)
    pm.merge_adapter()
    peft_merged = run(pm)
    ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    S.merge(ours)
    assert all(layer.merged for _, layer in adapted_layers(ours))
    assert (run(ours) - peft_merged).abs().max() <= ATOL
    merged_state = ours.state_dict()
    for k, v in pm.state_dict().items():
        key = k.removeprefix("base_model.model.")
        assert torch.allclose(merged_state[key], v, atol=1e-6), key
    S.unmerge(ours)
    after = ours.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6
    assert (run(ours) - unmerged).abs().max() <= ATOL
    plain = S.merge_and_unload(ours)
    assert set(plain.state_dict()) == set(base.state_dict())
    assert (run(plain) - peft_merged).abs().max() <= ATOL
    untouched = S.unload(S.load_adapter(copy.deepcopy(base), tmp_path / "peft"))
    assert torch.equal(run(untouched), run(base))


def test_rank_and_alpha_per_parameter(tmp_path: Path):
    base = base_of("qwen3_moe")
    planned = plan(RULES, base)
    assert [(s.option("parameter_name"), s.r, s.alpha) for s in planned.sites[:2]] == [
        ("gate_up_proj", 2, 6.0), ("down_proj", 3, 4.0)]
    torch.manual_seed(5)
    ours = S.apply(RULES, copy.deepcopy(base))
    torch.manual_seed(5)
    theirs = twin(base, seed=None, **PATTERNS)
    assert planned.trainable_params == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    mine, peft_keys = lora_state(ours), lora_state(theirs, "base_model.model.")
    assert sorted(mine) == sorted(peft_keys) and all(torch.equal(mine[k], peft_keys[k]) for k in peft_keys)
    assert peft_keys["model.layers.0.mlp.experts.lora_A.default.weight"].shape[0] == 3 * 4  # r=3, 4 experts
    trained = twin(base, **PATTERNS)
    trained.save_pretrained(tmp_path / "peft")
    loaded = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (run(loaded) - run(trained)).abs().max() <= ATOL
    S.save_pretrained(loaded, tmp_path / "ours")
    assert (run(from_peft(base, tmp_path / "ours")) - run(trained)).abs().max() <= ATOL


def test_two_adapters_switch_as_peft(tmp_path: Path):
    base = base_of("mixtral")
    for name, seed in (("one", 7), ("two", 11)):
        twin(base, seed=seed).save_pretrained(tmp_path / name)
    theirs = from_peft(base, tmp_path / "one", adapter_name="one")
    theirs.load_adapter(tmp_path / "two", adapter_name="two")
    ours = S.load_adapter(copy.deepcopy(base), tmp_path / "one", adapter_name="one")
    S.load_adapter(ours, tmp_path / "two", adapter_name="two")
    assert sorted(lora_state(ours)) == sorted(lora_state(theirs, "base_model.model."))
    assert len(list(adapted_layers(ours))) == 4  # one per parameter, adapters sharing them
    for name in ("two", "one", "two"):
        S.set_adapter(ours, name)
        theirs.set_adapter(name)
        assert (run(ours) - run(theirs)).abs().max() <= ATOL
    S.save_pretrained(ours, tmp_path / "ours")
    written = load_file(tmp_path / "ours" / "two" / "adapter_model.safetensors")
    assert sorted(written) == sorted(load_file(tmp_path / "two" / "adapter_model.safetensors"))
    S.delete_adapter(ours, "two")
    assert (run(ours) - run(twin(base))).abs().max() <= ATOL


def test_a_second_adapter_applied_is_seeded_as_peft_s():
    base = base_of("qwen2_moe")
    torch.manual_seed(4)
    ours = S.apply(SPEC, copy.deepcopy(base))
    S.apply(SPEC.replace("default", "other"), ours)
    torch.manual_seed(4)
    theirs = twin(base, seed=None)
    theirs.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS))
    mine, peft_keys = lora_state(ours), lora_state(theirs, "base_model.model.")
    assert sorted(mine) == sorted(peft_keys) and all(torch.equal(mine[k], peft_keys[k]) for k in peft_keys)


def test_gradients_match_peft(tmp_path: Path):
    base = base_of("gpt_oss")
    pm = twin(base)
    pm.save_pretrained(tmp_path / "peft")
    ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    pm(ids()).logits.square().sum().backward()
    ours(ids()).logits.square().sum().backward()
    mine = dict(ours.named_parameters())
    grads = [(n.removeprefix("base_model.model."), p.grad) for n, p in pm.named_parameters() if "lora_" in n]
    assert len(grads) == 8
    for name, grad in grads:
        assert torch.allclose(mine[name].grad, grad, atol=1e-4, rtol=1e-3), name



def test_adapters_targeting_different_parameter_sets_are_refused_as_by_peft():
    """PEFT refuses a second adapter whose target_parameters differ from the first's."""
    base = base_of("mixtral")
    one = "adapter one = lora(r=2) { target @moe.up }"
    ours = S.apply(one, copy.deepcopy(base))
    before = run(ours)
    with pytest.raises(UserError, match="same parameters"):
        S.apply(SPEC.replace("default", "two"), ours)
    assert torch.equal(run(ours), before)
    with pytest.raises(UserError, match="same parameters"):
        S.apply(one + "\n" + SPEC.replace("default", "two"), copy.deepcopy(base))
    theirs = twin(base, target_parameters=TARGETS[:1])
    with pytest.raises(ValueError, match="must target the same set"):
        theirs.add_adapter("two", LoraConfig(target_modules=[], target_parameters=TARGETS))


def test_a_nest_emptied_by_deletion_takes_a_new_adapter_at_peft_s_keys():
    """Deleting every adapter keeps the nest (each layer remembers its parameter, as PEFT's
    ParamWrapper its `parameter_name`); a new adapter lands at PEFT's keys."""
    base = base_of("mixtral")
    ours = S.apply(SPEC, copy.deepcopy(base))
    S.delete_adapter(ours, "default")
    torch.manual_seed(2)
    S.apply(SPEC.replace("default", "b"), ours)
    torch.manual_seed(2)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS), adapter_name="b")
    mine, peft_keys = lora_state(ours), lora_state(theirs, "base_model.model.")
    assert sorted(mine) == sorted(peft_keys) and all(torch.equal(mine[k], peft_keys[k]) for k in peft_keys)
