"""HRA against PEFT 0.21 (the oracle), with the LoHa suite's harness (`tests.methods.test_loha`).

Both directions, merged vs unmerged vs PEFT merged (unmerge by the reversed reflections), seeded
init (PEFT's symmetric pairs for even r) and training steps, two adapters switching (both active
at once included: their reflections compose in PEFT's order), with and without Gram-Schmidt, on
PEFT's MLP and tiny Llama and BERT. The forward reflects the input, never builds `W H`: checked
against the math directly too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import HRAConfig
from torch import nn

import surgeon
from surgeon.errors import UserError
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
)
from tests.models import CASES

HRA_U = ("hra_u",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}
ROUNDTRIPS = [("mlp", {"r": 4}), ("mlp", {"r": 3, "apply_GS": True}), ("llama", {"r": 2}),
              ("bert", {"r": 5})]


def hra(case: str, **options) -> HRAConfig:
    return HRAConfig(target_modules=TARGETS[case], **options)


@pytest.mark.parametrize("case,options", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path):
    check_roundtrip(CASES[case], hra(case, **options), HRA_U, tmp_path)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("r", [4, 3])
def test_initialisation_matches_peft(r: int, init: bool):
    check_init(CASES["mlp"], hra("mlp", r=r, init_weights=init))


@pytest.mark.parametrize("case,options", [("mlp", {"r": 4}), ("llama", {"r": 2, "apply_GS": True})])
def test_training_steps_match_peft(case: str, options: dict):
    check_training(CASES[case], hra(case, init_weights=False, **options), HRA_U)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (hra("mlp", r=4), HRAConfig(target_modules=["seq.2", "seq.4"], r=3, apply_GS=True))
    check_switching(CASES["mlp"], configs, HRA_U, tmp_path)


def test_forward_reflects_the_input():
    """`base(x H^T)` by hand, and no weight-sized product in the graph."""
    from surgeon.methods.hra.layer import matrix, reflect

    model = nn.Sequential(nn.Linear(8, 5))
    surgeon.apply('adapter a = hra(r=3, init=false) { target "0" }', model)
    layer = model[0]
    calls = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert reflect in calls and torch.mm not in calls
    h = matrix(layer.hra_u["a"].detach(), False)
    torch.testing.assert_close(h @ h.T, torch.eye(8))  # a product of reflections is orthogonal
    assert not torch.allclose(h, torch.eye(8))
    x = torch.randn(3, 8)
    expected = nn.functional.linear(x, layer.base_layer.weight @ h, layer.base_layer.bias)
    torch.testing.assert_close(model(x), expected)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(HRAConfig(r=2), "adapter default = hra(r=2, init=false) { }", tmp_path)


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear layers so far"):
        surgeon.apply("adapter a = hra(r=2) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="rank"):
        surgeon.load_spec("adapter a = hra(r=2) { target seq.0  rank 4 on seq.0 }")
