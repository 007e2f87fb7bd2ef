"""VeRA against PEFT 0.21 (the oracle), with the LoHa suite's harness (`tests.methods.test_loha`).

Both directions (PEFT checkpoint -> surgeon, surgeon -> PEFT, same outputs and key sets), merged
vs unmerged vs PEFT merged, seeded init and training steps, two adapters switching, on PEFT's MLP
and tiny Llama, BERT and GPT-2 (transformers' Conv1D). VeRA's own point is checked too: the
random projections are one tensor for the whole model, stored once in the checkpoint as PEFT's
`base_model.vera_A` / `base_model.vera_B`, or regenerated from `projection_prng_key` when
`save_projection` is false.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import VeraConfig, get_peft_model
from safetensors.torch import load_file

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from surgeon.runtime.wrappers import adapted_layers
from tests.methods.harness import (
    check_classic_placement,
    check_roundtrip,
    check_switching,
    check_training,
    diff,
    output,
    quiet,
    randomize,
    spec_of,
)
from tests.models import CASES

LAMBDAS = ("vera_lambda_",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "gpt2": ["c_attn", "c_proj"],
}
ROUNDTRIPS = [("mlp", {}), ("mlp", {"save_projection": False}), ("llama", {"projection_prng_key": 5}),
              ("bert", {}), ("gpt2", {"d_initial": 0.3})]


def vera(case: str, **extra) -> VeraConfig:
    return VeraConfig(target_modules=TARGETS[case], **{"r": 4, **extra})


@pytest.mark.parametrize("case,extra", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, extra: dict, tmp_path: Path):
    check_roundtrip(CASES[case], vera(case, **extra), LAMBDAS, tmp_path)


@pytest.mark.parametrize("save", [True, False])
def test_projections_saved_once_as_peft(save: bool, tmp_path: Path):
    """The checkpoint holds the shared pair once, under PEFT's names and values (or not at all)."""
    ctx = quiet()
    try:
        base = CASES["llama"].build()
        config = vera("llama", save_projection=save)
        pm = get_peft_model(copy.deepcopy(base), config)
        pm.save_pretrained(tmp_path / "peft")
        ours = copy.deepcopy(base)
        S.apply(spec_of(config), ours)
        S.save_pretrained(ours, tmp_path / "ours")
        mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert sorted(mine) == sorted(theirs)
        shared = {k for k in mine if ".vera_A" in k or ".vera_B" in k}
        assert shared == ({"base_model.vera_A", "base_model.vera_B"} if save else set())
        for k in shared:
            assert torch.equal(mine[k], theirs[k]), k
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_initialisation_matches_peft_and_projections_are_one_tensor(case: str, init: bool):
    ctx = quiet()
    try:
        base = CASES[case].build()
        config = vera(case, init_weights=init, projection_prng_key=3)
        torch.manual_seed(3)
        pm = get_peft_model(copy.deepcopy(base), config)
        ours = copy.deepcopy(base)
        torch.manual_seed(3)
        S.apply(spec_of(config), ours)
        theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
        mine = ours.state_dict()
        keys = [k for k in mine if ".vera_" in k]
        assert sorted(keys) == sorted(k for k in theirs if ".vera_" in k and "base_model." not in k)
        for k in keys:
            assert torch.equal(mine[k], theirs[k]), k
        layers = [layer for _, layer in adapted_layers(ours)]
        assert len(layers) > 1
        assert all(layer.vera_A is layers[0].vera_A and layer.vera_B is layers[0].vera_B for layer in layers)
        assert len({layer.vera_A["default"].data_ptr() for layer in layers}) == 1
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_training_steps_match_peft(case: str):
    """Seeded SGD steps with dropout: PEFT's losses, gradients and updated lambdas."""
    check_training(CASES[case], vera(case, vera_dropout=0.3, init_weights=False), LAMBDAS)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (vera("mlp"), VeraConfig(target_modules=["seq.2"], r=4, init_weights=False))
    check_switching(CASES["mlp"], configs, LAMBDAS, tmp_path)


def test_second_adapter_is_transactional():
    """A refused second adapter leaves the model, its shared projections included, as it was."""
    ctx = quiet()
    try:
        model = CASES["mlp"].build()
        surgeon.apply("adapter a = vera(r=4) { target seq.0, seq.2 }", model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        shared = model.seq[0].vera_A
        with pytest.raises(UserError, match="saved for all adapters or none"):
            surgeon.apply("adapter b = vera(r=4, save_projection=false) { target seq.2, seq.4 }", model)
        assert model.seq[0].vera_A is shared and sorted(shared) == ["a"]
        assert sorted(model.state_dict()) == sorted(before)
        with pytest.raises(UserError, match="r must be equal"):  # PEFT fails later, in forward
            surgeon.apply("adapter b = vera(r=2) { target seq.2, seq.4 }", model)
        assert sorted(model.state_dict()) == sorted(before)
        surgeon.apply("adapter b = vera(r=4) { target seq.2, seq.4 }", model)
        assert model.seq[4].vera_A is model.seq[0].vera_A and sorted(model.seq[0].vera_A) == ["a", "b"]
        S.delete_adapter(model, "b")
        assert sorted(model.seq[0].vera_A) == ["a"]
    finally:
        ctx.__exit__(None, None, None)


def test_classic_placement_is_peft_default(tmp_path: Path):
    """With no target rule VeRA goes where PEFT's default table puts it (Llama: q and v)."""
    check_classic_placement(VeraConfig(r=4), "adapter default = vera(r=4, init=false) { }", tmp_path)


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear and Conv1D"):
        surgeon.apply("adapter a = vera(r=2) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="rank"):
        surgeon.load_spec("adapter a = vera(r=2) { target seq.0  rank 4 on seq.0 }")
    model = CASES["mlp"].build()
    surgeon.apply("adapter a = vera(r=2) { target seq.0 }", model)
    x = CASES["mlp"].inputs()
    with pytest.raises(UserError, match="adapter_names"):
        CASES["mlp"].output(model, adapter_names=["a"] * len(next(iter(x.values()))))


def test_randomized_lambdas_change_outputs():
    """Sanity of the oracle cases: trained lambdas move the output away from the base model's."""
    ctx = quiet()
    try:
        base = CASES["mlp"].build()
        ours = copy.deepcopy(base)
        S.apply(spec_of(vera("mlp")), ours)
        assert diff(output(CASES["mlp"], ours), output(CASES["mlp"], base)) == 0.0  # lambda_b = 0
        with torch.no_grad():
            randomize(ours, LAMBDAS)
        assert diff(output(CASES["mlp"], ours), output(CASES["mlp"], base)) > 1e-3
    finally:
        ctx.__exit__(None, None, None)
