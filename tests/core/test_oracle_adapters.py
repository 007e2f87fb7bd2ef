"""Several adapters against PEFT: switching, several active, disabling, mixed batches, deleting.

PEFT holds two adapters on different module sets (q/v at rank 4 and all-linear at rank 2, so
some layers carry one adapter and some both); surgeon loads PEFT's two checkpoints into one
plain model, and every step is done on both and compared.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import surgeon.api as S
from tests.core.test_oracle import ATOL, max_diff, output, quiet, randomize
from tests.models import HF_CASES, PLAIN_CASES, ModelCase


def _pair(case: ModelCase, tmp_path: Path):
    base = case.build()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=list(case.qv), r=4, lora_alpha=8))
    pm.add_adapter("other", LoraConfig(target_modules="all-linear", r=2, lora_alpha=4, use_rslora=True))
    randomize(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")  # default at the top, `other` in other/
    ours = copy.deepcopy(base)
    S.load_adapter(ours, tmp_path / "peft")
    S.load_adapter(ours, tmp_path / "peft" / "other", "other")
    return base, pm, ours


def _same(case, pm, ours, **extra) -> bool:
    """Same outputs; or, where PEFT refuses (OPT flattens rows before fc1), the same error and
    False (PEFT's model is left unusable after that error, ours is not)."""
    try:
        expected = output(case, pm, **extra)
    except ValueError as err:
        assert "Length of `adapter_names`" in str(err)
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            output(case, ours, **extra)
        return False
    assert max_diff(output(case, ours, **extra), expected) <= ATOL
    return True


@pytest.mark.parametrize("case", HF_CASES + PLAIN_CASES, ids=lambda c: c.name)
def test_adapters_follow_peft(case: ModelCase, tmp_path: Path):
    ctx = quiet()
    try:
        base, pm, ours = _pair(case, tmp_path)
        plain = output(case, base)
        assert S.active_adapters(ours) == ("default",)
        _same(case, pm, ours)

        pm.set_adapter("other")
        S.set_adapter(ours, "other")
        _same(case, pm, ours)

        pm.base_model.set_adapter(["default", "other"])
        S.set_adapter(ours, ["default", "other"])
        _same(case, pm, ours)

        with pm.disable_adapter(), S.disable_adapters(ours):
            assert max_diff(output(case, ours), plain) <= ATOL
            _same(case, pm, ours)
        _same(case, pm, ours)

        pm.set_adapter("default")
        S.set_adapter(ours, "default")
        # saving both adapters writes PEFT's layout: default on top, `other` in a subfolder
        S.save_pretrained(ours, tmp_path / "ours")
        for sub in ("", "other"):
            keys = sorted(load_file(tmp_path / "ours" / sub / "adapter_model.safetensors"))
            assert keys == sorted(load_file(tmp_path / "peft" / sub / "adapter_model.safetensors"))

        pm.eval()  # PEFT's set_adapter leaves the model in training mode; mixed rows need eval
        assert not ours.training
        rows = ["other", "default"] if case.name != "mlp" else ["other", "__base__", "default", "other"]
        if not _same(case, pm, ours, adapter_names=rows):
            assert max_diff(output(case, ours), plain) > 0  # ours still runs after the refusal
            return
        _same(case, pm, ours)  # the row routing ends with the call

        pm.delete_adapter("default")
        S.delete_adapter(ours, "default")
        # PEFT takes the new active set from its first LoRA layer, which may hold no adapter at
        # all (convnet's conv1): its model-level record is then stale while its layers run
        # `other`. Surgeon applies the per-layer rule model-wide, so the outputs agree.
        assert S.active_adapters(ours) == ("other",)
        # (PeftModel.forward itself then fails on the stale record: run its layers directly)
        assert max_diff(output(case, ours), output(case, pm.base_model.model)) <= ATOL
        assert not any(".default" in k for k in ours.state_dict())
    finally:
        ctx.__exit__(None, None, None)


def test_mixed_batch_rejects_unknown_names_and_training(tmp_path: Path):
    case = PLAIN_CASES[0]
    _, _, ours = _pair(case, tmp_path)
    with pytest.raises(ValueError, match="unknown adapter"):
        case.output(ours, adapter_names=["nope"] * 4)
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        case.output(ours, adapter_names=["default"] * 4)
    ours.eval()
    assert case.output(ours).shape == (4, 2)  # nothing left over from the failed calls


def test_mixed_batch_on_a_deep_copy(tmp_path: Path):
    case = PLAIN_CASES[0]
    _, pm, ours = _pair(case, tmp_path)
    twin = copy.deepcopy(ours)
    rows = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        assert max_diff(case.output(twin, adapter_names=rows), case.output(pm, adapter_names=rows)) <= ATOL


def test_saved_modules_follow_peft(tmp_path: Path):
    """Two adapters each with their own copy of the head: switching and mixed rows."""
    case = PLAIN_CASES[0]  # the MLP; seq.4 is its head
    ctx = quiet()
    try:
        base = case.build()
        config = LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"])
        pm = get_peft_model(copy.deepcopy(base), config)
        pm.add_adapter("other", LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
        randomize(pm)
        pm.eval()
        pm.save_pretrained(tmp_path)
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path)
        S.load_adapter(ours, tmp_path / "other", "other")
        assert "seq.4.modules_to_save.other.weight" in ours.state_dict()
        _same(case, pm, ours)
        _same(case, pm, ours, adapter_names=["other", "default", "__base__", "other"])
        pm.set_adapter("other")
        S.set_adapter(ours, "other")
        _same(case, pm, ours)
        with pm.disable_adapter(), S.disable_adapters(ours):
            _same(case, pm, ours)
    finally:
        ctx.__exit__(None, None, None)
