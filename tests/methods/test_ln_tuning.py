"""LN tuning against PEFT 0.21 (the oracle), with the method harness (`tests.methods.harness`).

Both directions, merged (PEFT's module swap) vs unmerged vs PEFT merged and unmerge restoring
the modules, seeded init (copies of the base, value for value) and training steps, two adapters
switching (two active at once raise in both), classic placement from PEFT's per-architecture
name table, on tiny Llama and BERT and a plain network whose norms are torch's LayerNorm,
RMSNorm, GroupNorm and BatchNorm, plus a Linear and a whole container (the "Module" kind: PEFT's
LN tuning copies any module). A local helper covers what the harness assumes of other methods
(a `.weight` on every adapted layer, several active adapters running).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LNTuningConfig, PeftModel, get_peft_model
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from surgeon.runtime.wrappers import adapted_layers
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_training,
    diff,
    output,
    quiet,
    randomize,
    spec_of,
)
from tests.models import CASES, ModelCase, _plain, tensor_input

COPIES = ("ln_tuning_layers",)


class NormNet(nn.Module):
    """torch's norm layers between Linear layers, and a container (`block`)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm1d(8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.rms(self.ln(self.inp(x)))
        h = self.bn(self.gn(h))
        return self.head(self.block(h))


NORMNET = ModelCase("normnet", _plain(NormNet), tensor_input("x", 4, 6), ("ln", "rms"), hf=False)
TARGETS = {
    "normnet": ["ln", "rms", "gn", "bn", "head"],
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bert": ["LayerNorm"],
}


def case_of(name: str) -> ModelCase:
    return NORMNET if name == "normnet" else CASES[name]


def ln(case: str, **extra) -> LNTuningConfig:
    return LNTuningConfig(target_modules=TARGETS[case], **extra)


@pytest.mark.parametrize("case", ["normnet", "llama", "bert"])
def test_roundtrip_and_merge(case: str, tmp_path: Path):
    check_roundtrip(case_of(case), ln(case), COPIES, tmp_path)


def test_initialisation_matches_peft():
    check_init(NORMNET, ln("normnet"))
    check_init(CASES["llama"], ln("llama"))


@pytest.mark.parametrize("case", ["normnet", "llama"])
def test_training_steps_match_peft(case: str):
    check_training(case_of(case), ln(case), COPIES)


def test_kinds_norm_for_norms_module_for_the_rest():
    model = NormNet()
    surgeon.apply('adapter a = ln_tuning() { target ln, rms, gn, bn, head, block }', model)
    kinds = {path: layer.kind for path, layer in adapted_layers(model)}
    assert kinds == {"ln": "Norm", "rms": "Norm", "gn": "Norm", "bn": "Norm", "head": "Module",
                     "block": "Module"}


def test_a_container_is_copied_whole_as_peft(tmp_path: Path):
    """`block` (a Sequential) as PEFT: its copy trains, keys and outputs match both ways."""
    ctx = quiet()
    try:
        base, config = NORMNET.build(), LNTuningConfig(target_modules=["block"])
        pm = get_peft_model(copy.deepcopy(base), config)
        randomize(pm, COPIES)
        pm.eval().save_pretrained(tmp_path / "peft")
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path / "peft")
        assert diff(output(NORMNET, ours), output(NORMNET, pm)) <= 1e-6
        assert diff(output(NORMNET, ours), output(NORMNET, base)) > 1e-3
        S.save_pretrained(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        assert diff(output(NORMNET, back), output(NORMNET, pm)) <= 1e-6
        S.merge(ours), pm.merge_adapter()
        mine = ours.state_dict()
        theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
        assert sorted(mine) == sorted(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # the same swap as PEFT's
    finally:
        ctx.__exit__(None, None, None)


def _pair(case: ModelCase, tmp_path: Path):
    """PEFT with two LN tuning adapters on the same modules (PEFT's layer cannot run an adapter
    absent from it), and surgeon with both loaded from PEFT's checkpoints."""
    base = case.build()
    pm = get_peft_model(copy.deepcopy(base), ln("llama"))
    pm.add_adapter("other", ln("llama"))
    randomize(pm, COPIES)
    pm.eval().save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    S.load_adapter(ours, tmp_path)
    S.load_adapter(ours, tmp_path / "other", "other")
    return base, pm, ours


def test_two_adapters_switch_as_peft(tmp_path: Path):
    ctx = quiet()
    try:
        case = CASES["llama"]
        base, pm, ours = _pair(case, tmp_path)
        first = output(case, ours)
        assert diff(first, output(case, pm)) <= 1e-5
        for active in ("other", "default"):
            pm.base_model.set_adapter(active)
            S.set_adapter(ours, active)
            assert diff(output(case, ours), output(case, pm)) <= 1e-5
        assert diff(output(case, ours), first) == 0
        pm.base_model.set_adapter(["default", "other"])
        S.set_adapter(ours, ["default", "other"])
        with pytest.raises(ValueError, match="more than one adapter"):
            output(case, pm)
        with pytest.raises(UserError, match="more than one adapter"):
            output(case, ours)
        S.set_adapter(ours, "default")
        with pm.disable_adapter(), S.disable_adapters(ours):
            assert diff(output(case, ours), output(case, base)) == 0
        with pytest.raises(UserError, match="adapter_names"):
            case.output(ours, adapter_names=["default", "other"])
    finally:
        ctx.__exit__(None, None, None)


def test_merging_two_adapters_at_once_is_refused_as_peft(tmp_path: Path):
    ctx = quiet()
    try:
        _, pm, ours = _pair(CASES["llama"], tmp_path)
        with pytest.raises(ValueError, match="more than one adapter at a time"):
            pm.base_model.merge_adapter(["default", "other"])
        with pytest.raises(UserError, match="more than one adapter at a time"):
            S.merge(ours, ["default", "other"])
        S.merge(ours, ["other"])
        pm.base_model.merge_adapter(["other"])
        assert diff(output(CASES["llama"], ours), output(CASES["llama"], pm)) <= 1e-5
    finally:
        ctx.__exit__(None, None, None)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(LNTuningConfig(), "adapter default = ln_tuning() { }", tmp_path)


def test_classic_placement_follows_the_model_type():
    """Qwen2's entry in PEFT's table is `post_attention_layernorm` alone."""
    ctx = quiet()
    try:
        base = CASES["qwen2"].build()
        pm = get_peft_model(copy.deepcopy(base), LNTuningConfig())
        plan = surgeon.plan("adapter default = ln_tuning() { }", base)
        expected = {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}
        assert {s.path for s in plan.sites} == expected
        assert all(p.endswith("post_attention_layernorm") for p in expected)
        assert plan.trainable_params == pm.get_nb_trainable_parameters()[0]
    finally:
        ctx.__exit__(None, None, None)


def test_half_precision_copies_keep_the_base_dtype():
    """PEFT skips adapter autocasting for LN tuning: the copies stay bf16."""
    ctx = quiet()
    try:
        base = CASES["llama"].build().to(torch.bfloat16)
        pm = get_peft_model(copy.deepcopy(base), ln("llama"))
        ours = copy.deepcopy(base)
        S.apply(spec_of(ln("llama")), ours)
        theirs = {k.removeprefix("base_model.model."): v.dtype for k, v in pm.state_dict().items()}
        mine = {k: v.dtype for k, v in ours.state_dict().items() if "ln_tuning_layers" in k}
        assert mine and all(theirs[k] == torch.bfloat16 == d for k, d in mine.items())
    finally:
        ctx.__exit__(None, None, None)


def test_refusals():
    with pytest.raises(UserError, match="has no parameters"):
        surgeon.apply("adapter a = ln_tuning() { target act }", _with_act())
    with pytest.raises(UserError, match="rank"):
        surgeon.load_spec("adapter a = ln_tuning() { target norm  rank 4 on norm }")
    with pytest.raises(UserError, match="classic placement"):
        surgeon.apply("adapter a = ln_tuning() { }", NormNet())


def _with_act() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2))
    model.add_module("act", nn.ReLU())
    return model


def test_merge_and_unload_and_delete_as_peft(tmp_path: Path):
    """merge_and_unload leaves the tuned copies in place of the modules (PEFT's swap); deleting
    an adapter leaves the other one running."""
    ctx = quiet()
    try:
        case = CASES["llama"]
        base, pm, ours = _pair(case, tmp_path)
        S.delete_adapter(ours, "other")
        pm.delete_adapter("other")
        assert diff(output(case, ours), output(case, pm)) <= 1e-5
        merged_ours, merged_peft = S.merge_and_unload(ours), pm.merge_and_unload()
        mine, theirs = merged_ours.state_dict(), merged_peft.state_dict()
        assert sorted(mine) == sorted(theirs) == sorted(base.state_dict())
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert diff(output(case, merged_ours), output(case, base)) > 1e-3
    finally:
        ctx.__exit__(None, None, None)
