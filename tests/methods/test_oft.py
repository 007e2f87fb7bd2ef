"""OFT against PEFT 0.21 (the oracle), with the LoHa suite's harness (`tests.methods.test_loha`).

Both directions (PEFT checkpoint -> surgeon, surgeon -> PEFT), merged vs unmerged vs PEFT merged
(unmerge through the inverse rotation), seeded init and training steps (COFT's in-place
projection included), two adapters switching, on PEFT's MLP and tiny Llama and BERT. OFT's
forward rotates the input (`x R`), never the weight: checked against the math directly too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import OFTConfig, PeftModel
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
)
from tests.models import CASES

OFT_R = ("oft_R",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}
CONFIGS = {
    "blocks": {"oft_block_size": 4},
    "rank": {"r": 2, "oft_block_size": 0},
    "adjusted": {"oft_block_size": 6},  # does not divide 20 or 32: PEFT adjusts it per layer
    "share": {"oft_block_size": 4, "block_share": True},
    "solve": {"oft_block_size": 4, "use_cayley_neumann": False},
    "neumann3": {"oft_block_size": 8, "num_cayley_neumann_terms": 3},
    "coft": {"oft_block_size": 4, "coft": True, "eps": 1e-3},
}
ROUNDTRIPS = [("mlp", "blocks"), ("mlp", "rank"), ("mlp", "adjusted"), ("mlp", "share"),
              ("mlp", "solve"), ("mlp", "neumann3"), ("llama", "blocks"), ("bert", "rank")]


@pytest.fixture(autouse=True)
def small_rotations(monkeypatch):
    """The harness's random adapter values at scale 0.05 (not 0.4): with 0.4 the truncated
    Neumann series is far from a rotation and outputs reach the hundreds, where fp32 rounding
    alone exceeds the harness's absolute tolerance."""
    randomize = harness.randomize
    monkeypatch.setattr(harness, "randomize", lambda model, prefixes, seed=7, scale=0.4:
                        randomize(model, prefixes, seed, scale / 8))


def test_surgeon_checkpoint_loads_in_peft_as_written(tmp_path: Path):
    """PEFT 0.21's OFT loader reads peft_version (it fails on null): surgeon states the format."""
    base = CASES["mlp"].build()
    ours = copy.deepcopy(base)
    surgeon.apply("adapter default = oft(oft_block_size=4) { target seq.0 }", ours)
    S.save_pretrained(ours, tmp_path)
    PeftModel.from_pretrained(base, tmp_path)


def oft(case: str, name: str, **extra) -> OFTConfig:
    return OFTConfig(target_modules=TARGETS[case], **{**CONFIGS[name], **extra})


@pytest.mark.parametrize("case,name", ROUNDTRIPS, ids=lambda v: v)
def test_roundtrip_and_merge(case: str, name: str, tmp_path: Path):
    check_roundtrip(CASES[case], oft(case, name), OFT_R, tmp_path)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("name", ["blocks", "share"])
def test_initialisation_matches_peft(name: str, init: bool):
    check_init(CASES["mlp"], oft("mlp", name, init_weights=init))


@pytest.mark.parametrize("case,name", [("mlp", "blocks"), ("mlp", "coft"), ("llama", "share")])
def test_training_steps_match_peft(case: str, name: str):
    check_training(CASES[case], oft(case, name, init_weights=False), OFT_R)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (oft("mlp", "blocks"), OFTConfig(target_modules=["seq.2"], r=4, oft_block_size=0))
    check_switching(CASES["mlp"], configs, OFT_R, tmp_path)


def test_forward_rotates_the_input():
    """The graph applies `x R` before the base call (no weight-sized product) and equals
    `base(x @ blockdiag(R))` computed by hand."""
    from surgeon.methods.oft.layer import METHOD, rotate_input

    model = nn.Sequential(nn.Linear(8, 5))
    surgeon.apply("adapter a = oft(oft_block_size=4, init=false) { target \"0\" }", model)
    layer = model[0]
    targets = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert rotate_input in targets
    x = torch.randn(3, 8)
    rot = METHOD._matrix(layer, "a")
    assert not torch.allclose(rot, torch.eye(8))
    torch.testing.assert_close(rot @ rot.T, torch.eye(8), atol=1e-2, rtol=0)  # near-orthogonal
    expected = nn.functional.linear(x @ rot, layer.base_layer.weight, layer.base_layer.bias)
    torch.testing.assert_close(model(x), expected)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(OFTConfig(oft_block_size=8), "adapter default = oft(oft_block_size=8, init=false) { }", tmp_path)


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="either r"):
        surgeon.load_spec("adapter a = oft(r=2) { target seq.0 }")  # oft_block_size defaults to 32
    with pytest.raises(UserError, match="must be non-zero"):
        surgeon.load_spec("adapter a = oft(oft_block_size=0) { target seq.0 }")
    with pytest.raises(UserError, match="adapts only Linear layers so far"):
        surgeon.apply("adapter a = oft(oft_block_size=3) { target conv1 }", CASES["convnet"].build())
