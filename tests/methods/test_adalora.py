"""AdaLoRA against PEFT 0.21 (the oracle).

1. Checkpoints both ways and merging, on PEFT's MLP, a conv net (Conv2d), GPT-2 (transformers'
   Conv1D) and Llama (the harness of `tests/methods/test_loha.py`).
2. Seeded initialisation equals PEFT's, tensor for tensor.
3. A short training schedule side by side with PEFT's `update_and_allocate`, from the same seed:
   the loss with the orthogonality term (PEFT adds it in `AdaLoraModel.forward`), the `E`
   tensors and the rank masks agree at every step; the finalised adapter saves PEFT's files
   (rank_pattern and resized tensors), and each side loads the other's with the same outputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from surgeon.methods import adalora
from tests.methods.harness import case_of, check_roundtrip, diff, quiet, spec_of
from tests.models import MLP

LORA = ("lora_",)
TARGETS = {"mlp": ["seq.0", "seq.2"], "convnet": ["conv1", "head"], "gpt2": ["c_attn", "c_fc"],
           "llama": ["q_proj", "v_proj", "down_proj"]}


def config(case: str, **extra) -> AdaLoraConfig:
    return AdaLoraConfig(target_modules=TARGETS[case], **{"init_r": 6, "target_r": 2, "total_step": 10,
                                                          "lora_alpha": 4, **extra})


@pytest.mark.parametrize("case", list(TARGETS))
def test_roundtrip_and_merge(case: str, tmp_path: Path):
    check_roundtrip(case_of(case), config(case), LORA, tmp_path)


@pytest.mark.parametrize("init", [True, False])
def test_initialisation_matches_peft(init: bool):
    ctx = quiet()
    try:
        base = case_of("convnet").build()
        torch.manual_seed(5)
        pm = get_peft_model(copy.deepcopy(base), config("convnet", init_lora_weights=init))
        ours = copy.deepcopy(base)
        torch.manual_seed(5)
        S.apply(spec_of(pm.peft_config["default"]), ours)
    finally:
        ctx.__exit__(None, None, None)
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items() if ".default" in k}
    mine = {k: v for k, v in ours.state_dict().items() if ".default" in k}
    assert sorted(mine) == sorted(k for k in theirs if ".ranknum." not in k)  # PEFT never saves it
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k
    assert ours.conv1.ranknum["default"].item() == theirs["conv1.ranknum.default"].item() == 6


class WithLoss(nn.Module):
    """PEFT's MLP returning an output with `.loss`, so PEFT's forward adds the orthogonality term."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, X):
        return SimpleNamespace(loss=self.mlp(X).pow(2).mean() * 10)


SCHEDULE = {"init_r": 4, "target_r": 2, "total_step": 10, "tinit": 2, "tfinal": 3, "deltaT": 2, "beta1": 0.8, "beta2": 0.7,
                "orth_reg_weight": 0.3, "lora_alpha": 8, "lora_dropout": 0.1}


def _side_by_side():
    torch.manual_seed(0)
    base = WithLoss().eval()
    cfg = AdaLoraConfig(target_modules=["seq.0", "seq.2", "seq.4"], **SCHEDULE)
    ctx = quiet()
    try:
        torch.manual_seed(1)
        pm = get_peft_model(copy.deepcopy(base), cfg)
        ours = copy.deepcopy(base)
        torch.manual_seed(1)
        S.apply(spec_of(cfg), ours)
    finally:
        ctx.__exit__(None, None, None)
    return base, pm, ours


def test_rank_allocation_follows_peft(tmp_path: Path):
    base, pm, ours = _side_by_side()
    pm.train(), ours.train()
    allocator = adalora.RankAllocator(ours)
    assert allocator.init_bgt == 12 and allocator.target_bgt == 6
    params = {"ours": [p for p in ours.parameters() if p.requires_grad],
              "peft": [p for p in pm.parameters() if p.requires_grad]}
    assert len(params["ours"]) == len(params["peft"]) == 9
    sgd = {k: torch.optim.SGD(v, lr=0.5) for k, v in params.items()}
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(3))
    masks, budgets = [], []
    for step in range(SCHEDULE["total_step"]):
        torch.manual_seed(step)  # the same dropout masks on both sides
        theirs = pm.base_model(X=x).loss  # AdaLoraModel.forward adds the orthogonality term
        torch.manual_seed(step)
        mine = ours(x).loss + adalora.orth_loss(ours)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        for loss, key in ((mine, "ours"), (theirs, "peft")):
            loss.backward()
            sgd[key].step()
        pm.base_model.update_and_allocate(step)
        allocator.update_and_allocate(step)
        for optimizer in sgd.values():
            optimizer.zero_grad()
        pattern = pm.peft_config["default"].rank_pattern
        assert allocator.rank_pattern == pattern
        if pattern:
            masks.append(pattern)
            budgets.append(sum(map(sum, pattern.values())))
        for path in ("seq.0", "seq.2", "seq.4"):
            e = pm.base_model.model.mlp.get_submodule(path).lora_E["default"]
            assert diff(ours.mlp.get_submodule(path).lora_E["default"], e) <= 1e-6
            assert torch.equal(ours.mlp.get_submodule(path).lora_E["default"] == 0, e == 0)
    # the budget fell from 12 on the cubic schedule to target_r per module, masks are final
    assert budgets[0] < 12 and budgets[-1] == 6 and len(set(map(str, masks[-3:]))) == 1
    assert any(0 < sum(m) < 4 for m in masks[-1].values()) or len({sum(m) for m in masks[-1].values()}) > 1

    pm.eval(), ours.eval()
    with torch.no_grad():
        expected = pm.base_model.model.mlp(x)
        before = ours.mlp(x)
    pm.save_pretrained(tmp_path / "peft")
    S.save_pretrained(ours, tmp_path / "ours")  # no finalize needed: saved as PEFT saves it
    full = ours.mlp.seq[0].lora_A["default"].shape[0]
    saved = allocator.finalize()  # optional: the modules shrink to the kept triplets
    assert ours.mlp.seq[0].lora_A["default"].shape[0] == sum(saved["mlp.seq.0.lora_E"]) < full
    S.save_pretrained(ours, tmp_path / "finalized")
    with torch.no_grad():
        assert diff(ours.mlp(x), before) <= 1e-6 and diff(before, expected) <= 1e-5
    folders = ("peft", "ours", "finalized")
    written = {k: json.loads((tmp_path / k / "adapter_config.json").read_text()) for k in folders}
    assert written["ours"]["rank_pattern"] == written["peft"]["rank_pattern"] == saved
    assert written["finalized"]["rank_pattern"] == saved
    tensors = {k: load_file(tmp_path / k / "adapter_model.safetensors") for k in folders}
    for mine in ("ours", "finalized"):
        assert sorted(tensors[mine]) == sorted(tensors["peft"])
        for key, value in tensors["peft"].items():
            assert tensors[mine][key].shape == value.shape
            assert diff(tensors[mine][key], value) <= 1e-5, key

    ctx = quiet()
    try:
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        with torch.no_grad():
            assert diff(back.base_model.model.mlp(x), expected) <= 1e-5
        again = copy.deepcopy(base)
        S.load_adapter(again, tmp_path / "peft")
        with torch.no_grad():
            assert diff(again.mlp(x), expected) <= 1e-5
        assert again.mlp.seq[0].ranknum["default"].item() == 4  # PEFT keeps the initial rank
    finally:
        ctx.__exit__(None, None, None)


def test_orth_loss_is_peft_regularizer_on_a_transformer():
    case = case_of("llama")
    base = case.build()
    cfg = config("llama", orth_reg_weight=0.7, task_type="CAUSAL_LM")  # PEFT adds the term there
    ctx = quiet()
    try:
        pm = get_peft_model(copy.deepcopy(base), cfg)
        ours = copy.deepcopy(base)
        S.apply(spec_of(cfg), ours)
        ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()},
                             strict=False)
        inputs = case.inputs()
        labels = inputs["input_ids"]
        with_reg = pm(**inputs, labels=labels).loss
        plain = pm.base_model.model(**inputs, labels=labels).loss
    finally:
        ctx.__exit__(None, None, None)
    mine = adalora.orth_loss(ours)
    torch.testing.assert_close(mine, with_reg - plain, rtol=1e-5, atol=1e-6)
    assert mine.item() > 0.1  # the factors start far from orthonormal


def test_refusals():
    with pytest.raises(UserError, match="adapts only Linear, Conv1D, Conv2d"):
        surgeon.apply("adapter a = adalora(total_step=10) { target embed }", case_of("nested").build())
    with pytest.raises(surgeon.SpecError, match="'rank' rules apply only"):
        surgeon.load_spec("adapter a = adalora(total_step=10) { target fc  rank 2 on fc }")
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    surgeon.apply("adapter default = adalora(total_step=10) { target Linear }", model)
    with pytest.raises(UserError, match="adapter_names"):
        model(torch.randn(2, 4), adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="no rank pattern yet"):
        adalora.RankAllocator(model).finalize()


def test_one_trainable_adapter_as_peft(tmp_path: Path):
    """PEFT's AdaLoraModel refuses a second trainable adapter; one loaded for inference is fine."""
    case = case_of("mlp")
    ctx = quiet()
    try:
        pm = get_peft_model(case.build(), config("mlp"))
        with pytest.raises(ValueError, match="supports only 1 trainable adapter"):
            pm.add_adapter("other", config("mlp"))
        pm.save_pretrained(tmp_path)
    finally:
        ctx.__exit__(None, None, None)
    model = case.build()
    surgeon.apply(spec_of(config("mlp")), model)
    with pytest.raises(UserError, match="one adapter at a time"):
        surgeon.apply(spec_of(config("mlp")), model, adapter_name="other")
    S.load_adapter(model, tmp_path, "frozen")  # is_trainable=False: inference mode
    assert sorted(S.active_adapters(model)) == ["default"]


def test_rank_pattern_sizes_modules_as_peft_resize():
    """A spec carrying a saved rank_pattern builds the modules PEFT's
    `resize_modules_by_rank_pattern` leaves (kept rank, initial ranknum), and plans JSON-able."""
    case = case_of("mlp")
    pattern = {"seq.0.lora_E": [True, False, True, False, False, False], "seq.2.lora_E": [False] * 6}
    cfg = config("mlp", rank_pattern=pattern)
    ctx = quiet()
    try:
        pm = get_peft_model(case.build(), config("mlp"))
        pm.base_model.resize_modules_by_rank_pattern(pattern, "default")
    finally:
        ctx.__exit__(None, None, None)
    plan = surgeon.plan(spec_of(cfg), case.build())
    assert json.loads(json.dumps(plan.to_json()))["trainable_params"] == plan.trainable_params
    assert plan.trainable_params == pm.get_nb_trainable_parameters()[0]
    ours = case.build()
    S.apply(spec_of(cfg), ours)
    for path in ("seq.0", "seq.2"):
        theirs, mine = pm.base_model.model.get_submodule(path), ours.get_submodule(path)
        for name in ("lora_A", "lora_B", "lora_E"):
            assert mine._modules[name]["default"].shape == theirs._modules[name]["default"].shape
        assert mine.ranknum["default"].item() == theirs.ranknum["default"].item()
    assert ours.seq[0].ranknum["default"].item() == 6 and ours.seq[2].ranknum["default"].item() == 0
