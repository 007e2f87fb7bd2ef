"""MiSS against PEFT 0.21 (the oracle), with the shared harness (`tests.methods.harness`).

Both directions, merged vs unmerged vs PEFT merged and unmerge restoring the weights, seeded
init and training steps, switching two adapters (both active at once), the classic placement,
for every `init_weights` variant (true, false, bat, mini) and an input width that r does not
divide (PEFT's padding and remainder merge), on PEFT's MLP and tiny Llama and BERT. The
unmerged forward is checked against the math (`x W'^T` with `W'` built by hand), and the
refusals: non-Linear layers, PEFT's size checks, mixing variants on one layer.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
from peft import MissConfig, get_peft_model
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from tests.methods import harness
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
    diff,
    randomize,
)
from tests.models import CASES

BLOCK = ("miss_block",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}
ROUNDTRIPS = [
    ("mlp", {"r": 3}),  # 20 inputs: PEFT pads the input, merges a remainder chunk
    ("mlp", {"r": 4, "init_weights": False}),
    ("mlp", {"r": 2, "init_weights": "mini", "mini_r": 2}),
    ("llama", {"r": 4, "init_weights": "bat"}),
    ("llama", {"r": 8, "miss_dropout": 0.1}),
    ("bert", {"r": 4, "init_weights": "mini", "mini_r": 4}),
]


def miss(case: str, targets=None, **options) -> MissConfig:
    return MissConfig(target_modules=targets or TARGETS[case], **options)


@pytest.mark.parametrize("case,options", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path, monkeypatch):
    if options.get("init_weights") == "bat":
        # bat's unmerge multiplies by (I + B)^-1 (as PEFT, bit for bit): the harness's 0.4-scale
        # random blocks make I + B ill-conditioned enough to miss its 1e-6 restore bound
        monkeypatch.setattr(harness, "randomize", functools.partial(harness.randomize, scale=0.1))
    check_roundtrip(CASES[case], miss(case, **options), BLOCK, tmp_path)


@pytest.mark.parametrize("init", [True, False, "bat", "mini"])
def test_initialisation_matches_peft(init):
    targets = ["seq.2"] if init == "bat" else None
    check_init(CASES["mlp"], miss("mlp", targets, r=4, init_weights=init, mini_r=2))


@pytest.mark.parametrize("case,options", [
    ("mlp", {"r": 3, "miss_dropout": 0.2}),
    ("llama", {"r": 4, "init_weights": "bat"}),
    ("llama", {"r": 4, "init_weights": "mini", "mini_r": 8}),
])
def test_training_steps_match_peft(case: str, options: dict):
    check_training(CASES[case], miss(case, **options), BLOCK)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    """Different r on one layer: PEFT pads the shared input for the later adapter too."""
    configs = (miss("mlp", r=3), MissConfig(target_modules=["seq.0", "seq.2"], r=8))
    check_switching(CASES["mlp"], configs, BLOCK, tmp_path)


def test_two_bat_adapters_chain_as_peft(tmp_path: Path):
    """Bat adapters transform the weight in turn: the second reads the first's result."""
    configs = (miss("llama", r=4, init_weights="bat"), miss("llama", ["q_proj"], r=2, init_weights="bat"))
    check_switching(CASES["llama"], configs, BLOCK, tmp_path)


def test_dropout_draws_as_peft_with_two_adapters():
    """Two active adapters with dropout, widths 20 -> 21 (r=3) -> 25 (r=5, alone 20): PEFT's masks."""
    case = CASES["mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), miss("mlp", ["seq.0"], r=3, miss_dropout=0.5))
        pm.add_adapter("b", miss("mlp", ["seq.0"], r=5, miss_dropout=0.5))
        pm.base_model.set_adapter(["default", "b"])
        randomize(pm, BLOCK)
        ours = copy.deepcopy(base)
        spec = ('adapter default = miss(r=3, dropout=0.5) { target seq.0 }\n'
                'adapter b = miss(r=5, dropout=0.5) { target seq.0 }')
        S.apply(spec, ours)
        S.set_adapter(ours, ["default", "b"])
        ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
        pm.train(), ours.train()
        torch.manual_seed(5)
        expected = case.output(pm)
        torch.manual_seed(5)
        assert diff(case.output(ours), expected) <= 1e-5


def test_forward_is_the_block_shared_weight():
    """`x W'^T + b` with `W'[:, c] = W[:, c] + B[c mod r]^T`, and no weight-sized tensor built."""
    from surgeon.methods.miss.layer import chunk_sum_delta

    model = nn.Sequential(nn.Linear(10, 6))
    surgeon.apply('adapter a = miss(r=4, init=false) { target "0" }', model)
    layer = model[0]
    calls = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert chunk_sum_delta in calls and torch.mm not in calls
    block = layer.miss_block["a"].detach()
    assert block.abs().sum() > 0
    weight = layer.base_layer.weight.detach().clone()
    for c in range(10):
        weight[:, c] += block[c % 4]
    x = torch.randn(3, 10)
    torch.testing.assert_close(model(x), nn.functional.linear(x, weight, layer.base_layer.bias))


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(MissConfig(r=4), "adapter default = miss(r=4, init=false) { }", tmp_path)


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear layers"):
        surgeon.apply("adapter a = miss(r=2) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="is a Conv1D"):  # GPT-2's attention: not a torch Linear
        surgeon.apply("adapter a = miss(r=2) { target c_attn }", CASES["gpt2"].build())
    with pytest.raises(UserError, match="in_features"):
        surgeon.apply("adapter a = miss(r=64) { target seq.0 }", CASES["mlp"].build())
    with pytest.raises(UserError, match=r"\[r, r\] blocks"):
        surgeon.apply("adapter a = miss(r=4, init=bat) { target seq.4 }", CASES["mlp"].build())
    with pytest.raises(UserError, match="mini_r"):
        surgeon.apply("adapter a = miss(r=4, init=mini, mini_r=3) { target seq.2 }", CASES["mlp"].build())
    with pytest.raises(UserError, match="'bat', 'mini'"):
        surgeon.apply("adapter a = miss(init=gaussian) { target seq.2 }", CASES["mlp"].build())
    with pytest.raises(UserError, match="rank"):
        surgeon.load_spec("adapter a = miss(r=2) { target seq.0  rank 4 on seq.0 }")


def test_refuses_two_variants_on_one_layer():
    """PEFT runs a layer's adapters with the first one's variant (wrong or failing for others)."""
    model = CASES["mlp"].build()
    surgeon.apply("adapter a = miss(r=4) { target seq.2 }", model)
    with pytest.raises(UserError, match="first one's init_weights"):
        surgeon.apply("adapter b = miss(r=4, init=bat) { target seq.2 }", model)
