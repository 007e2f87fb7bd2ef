"""OFT against PEFT 0.21 (the oracle), with the LoHa suite's harness (`tests.methods.test_loha`).

Both directions (PEFT checkpoint -> surgeon, surgeon -> PEFT), merged vs unmerged vs PEFT merged
(unmerge through the inverse rotation), seeded init and training steps (COFT's in-place
projection included), two adapters switching, on PEFT's MLP and tiny Llama and BERT. OFT's
forward rotates the input (`x R`), never the weight: checked against the math directly too.

Conv2d: PEFT rotates the input's k x k patches and folds them back (summing overlaps), which
for k > 1 is not what its merged weight computes; `check_conv_states` (a local helper) compares
each state with PEFT's same state, and the harness's roundtrip runs on 1 x 1 convolutions, where
the two agree.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import OFTConfig, PeftModel, get_peft_model
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
from tests.models import BATCH, CASES, ModelCase, _plain, tensor_input

OFT_R = ("oft_R",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "convnet": ["conv1", "conv2", "head"],
    "pointwise": ["conv1", "conv2"],
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
    with pytest.raises(UserError, match="adapts only Linear and Conv2d layers so far"):
        surgeon.plan("adapter a = oft(oft_block_size=4) { target embed_tokens }", CASES["llama"].build())


class Pointwise(nn.Module):
    """1 x 1 convolutions: PEFT's patch fold is the identity there, so merged = unmerged."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 1)
        self.conv2 = nn.Conv2d(8, 6, 1, stride=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))).flatten(1)


POINTWISE = ModelCase("pointwise", _plain(Pointwise), tensor_input("x", BATCH, 4, 5, 5), ("conv1",),
                      hf=False)


@pytest.mark.parametrize("name", ["blocks", "rank", "share"])
def test_conv_1x1_roundtrip_and_merge(name: str, tmp_path: Path):
    check_roundtrip(POINTWISE, oft("pointwise", name), OFT_R, tmp_path)


def check_conv_states(config: OFTConfig, tmp_path: Path) -> None:
    """Each state against PEFT's same state on the 3 x 3 conv net: unmerged (both directions
    through the checkpoints), merged, and unmerged again with the weights restored."""
    case, ctx = CASES["convnet"], harness.quiet()
    try:
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), config)
        harness.randomize(pm, OFT_R)
        pm.eval()
        pm.save_pretrained(tmp_path / "peft")
        expected = harness.output(case, pm)
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path / "peft")
        assert harness.diff(harness.output(case, ours), expected) <= harness.ATOL
        S.save_pretrained(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        assert harness.diff(harness.output(case, back), expected) <= harness.ATOL
        weight = ours.conv1.base_layer.weight.detach().clone()
        S.merge(ours)
        pm.merge_adapter()
        assert harness.diff(harness.output(case, ours), harness.output(case, pm)) <= harness.ATOL
        S.unmerge(ours)
        assert harness.diff(ours.conv1.base_layer.weight, weight) <= 1e-6
        assert harness.diff(harness.output(case, ours), expected) <= harness.ATOL
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("name", ["blocks", "rank", "share", "solve"])
def test_conv_states_match_peft(name: str, tmp_path: Path):
    check_conv_states(oft("convnet", name), tmp_path)


def test_conv_initialisation_and_training_match_peft():
    check_init(CASES["convnet"], oft("convnet", "blocks", init_weights=False))
    check_training(CASES["convnet"], oft("convnet", "coft", init_weights=False), OFT_R)


def test_conv_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (oft("convnet", "blocks"), OFTConfig(target_modules=["conv2"], r=4, oft_block_size=0))
    check_switching(CASES["convnet"], configs, OFT_R, tmp_path)


def test_conv_forward_rotates_the_input_patches():
    from surgeon.methods.oft.layer import rotate_patches

    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    surgeon.apply('adapter a = oft(oft_block_size=6) { target "0" }', model)
    targets = [n.target for n in model[0].graph_module.graph.nodes if n.op == "call_function"]
    assert rotate_patches in targets


@pytest.mark.parametrize("conv,match", [(nn.Conv2d(2, 4, 3, dilation=2), "dilation > 1"),
                                        (nn.Conv2d(2, 4, (1, 3)), "non-square kernel")])
def test_refuses_convolutions_peft_cannot_adapt(conv: nn.Module, match: str):
    with pytest.raises(UserError, match=match):
        surgeon.plan('adapter a = oft(oft_block_size=2) { target "0" }', nn.Sequential(conv))
