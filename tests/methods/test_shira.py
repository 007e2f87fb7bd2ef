"""SHiRA against PEFT 0.21 (the oracle), with the shared harness (`tests.methods.harness`).

Both directions (the checkpoint's `shira_indices`, which PEFT keeps out of its state_dict,
included), merged vs unmerged vs PEFT merged and unmerge restoring the weights, seeded init
(values and PEFT's random-mask indices, seeded and unseeded) and training steps, two adapters
switching (both active at once), the classic placement, on PEFT's MLP and tiny Llama and BERT.
The sparse forward is checked against `x (W + D)^T` built by hand; refusals: non-Linear layers,
more entries than weights, options PEFT's ShiraConfig lacks, custom mask types.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, ShiraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
    spec_of,
)
from tests.models import CASES

VALUES = ("shira_weight",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}
ROUNDTRIPS = [("mlp", {"r": 1}), ("llama", {"r": 4, "random_seed": 11}), ("bert", {"r": 2})]


def shira(case: str, targets=None, **options) -> ShiraConfig:
    return ShiraConfig(target_modules=targets or TARGETS[case], **options)


@pytest.mark.parametrize("case,options", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path):
    check_roundtrip(CASES[case], shira(case, **options), VALUES, tmp_path)


@pytest.mark.parametrize("init", [True, False])
def test_initialisation_matches_peft(init: bool):
    check_init(CASES["mlp"], shira("mlp", r=1, init_weights=init))


@pytest.mark.parametrize("seed", [None, 0, 123])
def test_mask_indices_match_peft(seed, tmp_path: Path):
    """PEFT's random_mask positions (not in its state_dict), in memory and in the checkpoint."""
    case, config = CASES["llama"], shira("llama", r=2, random_seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), config)
        ours = copy.deepcopy(base)
        S.apply(spec_of(config), ours)
        pm.save_pretrained(tmp_path / "peft")
        S.save_pretrained(ours, tmp_path / "ours")
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "shira_indices")}
    assert layers
    for name, module in layers.items():
        mine = ours.get_submodule(name).shira_indices["default"]
        assert mine.dtype == torch.int32 and torch.equal(mine, module.shira_indices["default"]), name
    theirs, saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    keys = [k for k in theirs if k.endswith(".shira_indices")]
    assert len(keys) == len(layers) and all(torch.equal(saved[k], theirs[k]) for k in keys)


def test_checkpoint_indices_win_over_the_config_seed(tmp_path: Path):
    """A PEFT adapter whose mask came from a user's mask_fn (the config still says random): the
    saved indices are what loads, both ways, not a mask drawn again from the config."""
    from surgeon.methods.shira.layer import random_indices

    case = CASES["mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), shira("mlp", r=1, init_weights=False)).eval()
        layer = pm.base_model.model.seq[2]
        layer.shira_indices["default"] = random_indices(32, 32, 1, seed=99)
        pm.save_pretrained(tmp_path / "peft")
        expected = case.output(pm).detach()
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path / "peft")
        assert torch.equal(ours.seq[2].shira_indices["default"], layer.shira_indices["default"])
        torch.testing.assert_close(case.output(ours), expected)
        S.save_pretrained(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        torch.testing.assert_close(case.output(back), expected)


@pytest.mark.parametrize("case,options", [("mlp", {"r": 1}), ("llama", {"r": 2, "random_seed": 4})])
def test_training_steps_match_peft(case: str, options: dict):
    check_training(CASES[case], shira(case, init_weights=False, **options), VALUES)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (shira("mlp", r=1), ShiraConfig(target_modules=["seq.0", "seq.2"], r=2, random_seed=3))
    check_switching(CASES["mlp"], configs, VALUES, tmp_path)


def test_forward_adds_the_sparse_delta():
    """`x (W + D)^T + b` with D scattered by hand; the graph builds no weight-sized tensor."""
    from surgeon.methods.shira.layer import sparse_delta

    model = nn.Sequential(nn.Linear(12, 7))
    surgeon.apply('adapter a = shira(r=1, init=false, seed=2) { target "0" }', model)
    layer = model[0]
    calls = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert sparse_delta in calls
    values, (rows, cols) = layer.shira_weight["a"].detach(), layer.shira_indices["a"].long()
    assert values.numel() == 19 and len(set(zip(rows.tolist(), cols.tolist()))) == 19
    weight = layer.base_layer.weight.detach().clone()
    weight[rows, cols] += values
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(model(x), nn.functional.linear(x, weight, layer.base_layer.bias))


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(ShiraConfig(r=2), "adapter default = shira(r=2, init=false) { }", tmp_path)


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear layers"):
        surgeon.apply("adapter a = shira(r=1) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="is a Conv1D"):  # GPT-2's attention: not a torch Linear
        surgeon.apply("adapter a = shira(r=1) { target c_attn }", CASES["gpt2"].build())
    with pytest.raises(UserError, match="more SHiRA entries"):
        surgeon.apply("adapter a = shira(r=2) { target seq.4 }", CASES["mlp"].build())
    with pytest.raises(UserError, match="random"):
        surgeon.load_spec("adapter a = shira(mask_type=custom) { target seq.0 }")
    for rule in ("exclude seq.2", "rank 4 on seq.0"):
        with pytest.raises(UserError):
            surgeon.load_spec(f"adapter a = shira(r=1) {{ target seq.0  {rule} }}")
