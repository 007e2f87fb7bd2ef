"""WaveFT against PEFT 0.21 (the oracle), with the shared harness (`tests.methods.harness`).

Both directions, merged vs unmerged vs PEFT merged (unmerge restores the weights), seeded init
(PEFT's random coefficient positions, zero or `0.01 * randn` spectra), seeded training steps,
two adapters switching (both active at once), `n_frequency_pattern`, `use_idwt=false`, several
wavelet families, Linear and transformers Conv1D (GPT-2), the classic placement, on PEFT's MLP
and tiny Llama, BERT and GPT-2. The filters and the inverse transform are checked value for
value against PEFT's `wavelet.py` / `waverec2d.py` for every family surgeon supports.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import WaveFTConfig, get_peft_model
from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
from peft.tuners.waveft.wavelet import Wavelet
from peft.tuners.waveft.waverec2d import waverec2d as peft_waverec2d
from torch import nn

import surgeon
from surgeon.errors import UserError
from surgeon.methods.waveft.config import SUPPORTED
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
)
from tests.models import CASES

SPECTRUM = ("waveft_spectrum",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
# scaling 25 (PEFT's default) with the harness's random spectra gives outputs ~100, where fp32
# rounding of merged weights alone exceeds its absolute tolerance: the roundtrips scale down.
MLP = {"n_frequency": 24, "n_frequency_pattern": {"seq.4": 10}, "scaling": 0.5}
ROUNDTRIPS = [
    ("mlp", MLP),
    ("mlp", {"n_frequency": 40, "wavelet_family": "db3", "scaling": 0.2}),
    ("mlp", {"n_frequency": 30, "use_idwt": False, "scaling": 0.5}),
    ("llama", {"n_frequency": 50, "wavelet_family": "sym4", "random_loc_seed": 5, "scaling": 0.5}),
    ("bert", {"n_frequency": 30, "wavelet_family": "coif1", "scaling": 0.5}),
    ("gpt2", {"n_frequency": 40, "wavelet_family": "db2", "scaling": 0.5}),
]


def waveft(case: str, **options) -> WaveFTConfig:
    return WaveFTConfig(target_modules=TARGETS[case], **options)


@pytest.mark.parametrize("case,options", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path):
    check_roundtrip(CASES[case], waveft(case, **options), SPECTRUM, tmp_path)


@pytest.mark.parametrize("init", [True, False])
def test_initialisation_matches_peft(init: bool):
    check_init(CASES["mlp"], waveft("mlp", init_weights=init, **MLP))


def test_coefficient_positions_match_peft():
    """The positions are not in the checkpoint: both sides draw them from random_loc_seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = CASES["mlp"].build()
        pm = get_peft_model(CASES["mlp"].build(), waveft("mlp", random_loc_seed=11, **MLP))
        surgeon.apply("adapter default = waveft(n_frequency=24, random_loc_seed=11, "
                      "n_frequency_pattern={\"seq.4\": 10}, scaling=0.5) { target seq.0, seq.2, seq.4 }", base)
    for path in TARGETS["mlp"]:
        theirs = pm.base_model.model.get_submodule(path).waveft_indices["default"]
        assert torch.equal(base.get_submodule(path).waveft_indices["default"], theirs), path


@pytest.mark.parametrize("case,options", [("mlp", {"n_frequency": 24, "wavelet_family": "db2", "scaling": 0.5, "bias": "waveft_only"}),
                                          ("mlp", {"n_frequency": 30, "use_idwt": False, "scaling": 0.5}),
                                          ("gpt2", {"n_frequency": 40, "scaling": 0.5})])
def test_training_steps_match_peft(case: str, options: dict):
    check_training(CASES[case], waveft(case, **options), SPECTRUM)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (waveft("mlp", **MLP),
               WaveFTConfig(target_modules=["seq.2", "seq.4"], n_frequency=12, wavelet_family="sym2"))
    check_switching(CASES["mlp"], configs, SPECTRUM, tmp_path)


@pytest.mark.parametrize("family", SUPPORTED)
def test_wavelets_equal_peft(family: str):
    from surgeon.methods.waveft.layer import reduction
    from surgeon.methods.waveft.wavelets import filters, waverec2d

    lo, hi = filters(family, torch.float64, torch.device("cpu"))
    assert lo.tolist() == list(Wavelet(family).rec_lo) and hi.tolist() == list(Wavelet(family).rec_hi)
    assert WAVELET_REDUCTIONS[family] == (reduction(family),) * 2
    dense = torch.randn(2 * len(lo) + 6, 2 * len(lo) + 10, generator=torch.Generator().manual_seed(0))
    h, w = dense.shape[0] // 2, dense.shape[1] // 2
    expected = peft_waverec2d((dense[:h, :w], (dense[:h, w:], dense[h:, :w], dense[h:, w:])), family)
    assert torch.equal(waverec2d(dense, family), expected)


@pytest.mark.parametrize("seed,row,col,block", [(2, 0, 0, [[1, 1], [1, 1]]), (0, 1, 0, [[1, -1], [1, -1]])])
def test_haar_delta_by_hand(seed: int, row: int, col: int, block: list):
    """db1 (Haar), out 2 x in 4: a coefficient at (row, col) of the 2 x 4 matrix is one 2x2 block
    of the delta: cA (top left) spreads it evenly, cV (bottom left) alternates the columns."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    surgeon.apply(f'adapter a = waveft(n_frequency=1, scaling=3.0, random_loc_seed={seed}) {{ target "0" }}',
                  model)
    layer = model[0]
    assert layer.waveft_indices["a"][:, 0].tolist() == [row, col]
    with torch.no_grad():
        layer.waveft_spectrum["a"].fill_(2.0)
    expected = torch.zeros(2, 4)
    expected[:, 2 * col:2 * col + 2] = 3.0 * torch.tensor(block, dtype=torch.float32)  # 2 * 3 / 2
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), x @ (layer.base_layer.weight + expected).T)


@pytest.mark.parametrize("tokens", [3, 40])  # 3 * 5 < 8 * 16: gathered; 40 * 5 > 8 * 16: dense
def test_sparse_coefficients_without_idwt(tokens: int):
    """use_idwt=false: dW holds the trained coefficients at their positions, times scaling."""
    model = nn.Sequential(nn.Linear(16, 8))
    surgeon.apply('adapter a = waveft(n_frequency=5, use_idwt=false, scaling=2.0, init=false) '
                  '{ target "0" }', model)
    layer = model[0]
    rows, cols = layer.waveft_indices["a"]
    dense = torch.zeros(8, 16)
    dense[rows, cols] = 2.0 * layer.waveft_spectrum["a"].detach()
    x = torch.randn(tokens, 16)
    expected = nn.functional.linear(x, layer.base_layer.weight + dense, layer.base_layer.bias)
    torch.testing.assert_close(model(x), expected)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(WaveFTConfig(n_frequency=16, init_weights=False),
                            "adapter default = waveft(n_frequency=16, init=false) { }", tmp_path)


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear and Conv1D"):
        surgeon.apply("adapter a = waveft(n_frequency=2) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="less than or equal to the product"):
        surgeon.apply("adapter a = waveft(n_frequency=65) { target seq.4 }", CASES["mlp"].build())
    with pytest.raises(UserError, match="coif5"):
        surgeon.load_spec("adapter a = waveft(wavelet_family=db20) { target seq.0 }")
    with pytest.raises(UserError, match="wavelet_family"):
        surgeon.load_spec("adapter a = waveft(wavelet_family=haar) { target seq.0 }")
    with pytest.raises(UserError, match="proportional_parameters"):
        surgeon.apply("adapter a = waveft(proportional_parameters=true, n_frequency=2) { target seq.0 }",
                      CASES["mlp"].build())
