"""FourierFT against PEFT 0.21 (the oracle), with the method harness (`tests.methods.harness`).

Both directions, merged vs unmerged vs PEFT merged (unmerge restores), seeded init (PEFT's
locations from random_loc_seed and its randn draw, zeroed or not) and training steps, two
adapters switching (both active at once add up, as PEFT's), `n_frequency_pattern` with PEFT's
matching, the classic placement (gpt2's own entry included), on PEFT's MLP and tiny Llama, BERT
and GPT-2 (transformers' Conv1D). The delta is checked against the inverse DFT written out as a
sum of cosines, and the forward against a spectrum changed in place (nothing cached goes stale).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from peft import FourierFTConfig, PeftModel, get_peft_model
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from surgeon.runtime.wrappers import adapted_layers
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
    diff,
    output,
    quiet,
)
from tests.models import CASES

SPECTRUM = ("fourierft_spectrum",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "gpt2": ["c_attn", "c_proj"],
}
ROUNDTRIPS = [("mlp", {"n_frequency": 30, "scaling": 5.0}),
              ("mlp", {"n_frequency": 20, "n_frequency_pattern": {"seq.2": 7, "4": 5}}),
              ("llama", {"n_frequency": 40, "random_loc_seed": 3, "n_frequency_pattern": {"v_proj": 9}}),
              ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}),
              ("bert", {"n_frequency": 25, "scaling": 20.0, "bias": "fourier_only"}),
              ("gpt2", {"n_frequency": 50, "scaling": 10.0})]


def fourier(case: str, **extra) -> FourierFTConfig:
    return FourierFTConfig(target_modules=TARGETS[case], **{"n_frequency": 16, **extra})


@pytest.mark.parametrize("case,extra", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, extra: dict, tmp_path: Path):
    check_roundtrip(CASES[case], fourier(case, **extra), SPECTRUM, tmp_path)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_initialisation_matches_peft(case: str, init: bool):
    check_init(CASES[case], fourier(case, init_weights=init, n_frequency_pattern={"seq.0": 5}))


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_training_steps_match_peft(case: str):
    check_training(CASES[case], fourier(case, scaling=4.0), SPECTRUM)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (fourier("mlp", scaling=3.0),
               FourierFTConfig(target_modules=["seq.2", "seq.4"], n_frequency=9, random_loc_seed=1))
    check_switching(CASES["mlp"], configs, SPECTRUM, tmp_path)


def test_adapter_config_is_peft_s(tmp_path: Path):
    """surgeon's adapter_config.json holds PEFT's values for every FourierFT field."""
    ctx = quiet()
    try:
        config = fourier("mlp", scaling=2.5, random_loc_seed=9, n_frequency_pattern={"seq.2": 4},
                         init_weights=True, bias="fourier_only")
        model = CASES["mlp"].build()
        surgeon.apply('adapter default = fourierft(n_frequency=16, scaling=2.5, random_loc_seed=9, '
                      'n_frequency_pattern={"seq.2": 4}, init=true, bias=fourier_only) '
                      '{ target seq.0, seq.2, seq.4 }', model)
        S.save_pretrained(model, tmp_path)
        saved = json.loads((tmp_path / "adapter_config.json").read_text())
        theirs = json.loads(json.dumps(config.to_dict(), default=sorted))
        for field in ("n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "bias",
                      "n_frequency_pattern", "init_weights", "peft_type"):
            assert saved[field] == theirs[field], field
        assert set(saved) == set(theirs)
    finally:
        ctx.__exit__(None, None, None)


def _cosine_delta(spectrum: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_out: int,
                  n_in: int, scaling: float) -> torch.Tensor:
    """`scaling * Re(ifft2(S))` as the inverse DFT's sum: one cosine wave per coefficient."""
    p = torch.arange(n_out, dtype=torch.float64)[:, None, None]
    q = torch.arange(n_in, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (rows.double() * p / n_out + cols.double() * q / n_in)
    return scaling * (spectrum.double() * torch.cos(phase)).sum(-1) / (n_out * n_in)


def test_forward_is_the_inverse_dft_and_never_stale():
    model = nn.Sequential(nn.Linear(12, 10))
    surgeon.apply("adapter a = fourierft(n_frequency=15, scaling=7.0) { target \"0\" }", model)
    layer = model[0]
    spectrum = layer.fourierft_spectrum["a"]
    rows, cols = layer.fourierft_indices["a"]
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 15  # distinct cells
    x = torch.randn(4, 12)
    for _ in range(2):  # the second time after an in-place change of the spectrum
        delta = _cosine_delta(spectrum.detach(), rows, cols, 10, 12, 7.0)
        torch.testing.assert_close(layer.delta_weight("a").double(), delta, rtol=1e-5, atol=1e-6)
        expected = nn.functional.linear(x, layer.base_layer.weight + delta.float(), layer.base_layer.bias)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            spectrum.mul_(-3.0).add_(0.5)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(FourierFTConfig(n_frequency=8),
                            "adapter default = fourierft(n_frequency=8) { }", tmp_path)


def test_gpt2_classic_placement_is_peft_s_own_entry():
    """PEFT's FourierFT table differs from LoRA's for gpt2: `mlp.c_proj`."""
    ctx = quiet()
    try:
        base = CASES["gpt2"].build()
        pm = get_peft_model(copy.deepcopy(base), FourierFTConfig(n_frequency=8))
        plan = surgeon.plan("adapter default = fourierft(n_frequency=8) { }", base)
        expected = {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}
        assert {s.path for s in plan.sites} == expected and all("mlp.c_proj" in p for p in expected)
    finally:
        ctx.__exit__(None, None, None)


def test_saved_checkpoint_loads_into_peft_with_pattern(tmp_path: Path):
    """A pattern written by surgeon sizes the same layers in PEFT (shapes must agree to load)."""
    ctx = quiet()
    try:
        base = CASES["llama"].build()
        ours = copy.deepcopy(base)
        surgeon.apply('adapter default = fourierft(n_frequency=12, n_frequency_pattern={"v_proj": 3}) '
                      '{ target q_proj, v_proj }', ours)
        sizes = {p: layer.fourierft_spectrum["default"].numel() for p, layer in adapted_layers(ours)}
        assert sorted(set(sizes.values())) == [3, 12]
        S.save_pretrained(ours, tmp_path)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        assert diff(output(CASES["llama"], back), output(CASES["llama"], ours)) <= 1e-5
    finally:
        ctx.__exit__(None, None, None)


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear and Conv1D"):
        surgeon.apply("adapter a = fourierft(n_frequency=4) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="should be less than or equal to the product"):
        surgeon.apply("adapter a = fourierft(n_frequency=65) { target seq.4 }", CASES["mlp"].build())
    with pytest.raises(ValueError, match="should be less than or equal to the product"):
        get_peft_model(CASES["mlp"].build(), FourierFTConfig(target_modules=["seq.4"], n_frequency=65))
    with pytest.raises(UserError, match="rank"):
        surgeon.load_spec("adapter a = fourierft() { target seq.0  rank 4 on seq.0 }")
    with pytest.raises(UserError, match="n_frequency"):
        surgeon.load_spec("adapter a = fourierft(n_frequency=0) { target seq.0 }")


def test_merge_and_unload_as_peft(tmp_path: Path):
    ctx = quiet()
    try:
        case, config = CASES["gpt2"], fourier("gpt2", n_frequency=40, scaling=8.0)
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), config)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "fourierft_spectrum" in name:
                    p.normal_()
        pm.save_pretrained(tmp_path)
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path)
        mine, theirs = S.merge_and_unload(ours).state_dict(), pm.merge_and_unload().state_dict()
        assert sorted(mine) == sorted(theirs)
        assert max(diff(mine[k], theirs[k]) for k in mine) <= 1e-6
        assert max(diff(mine[k], v) for k, v in base.state_dict().items()) > 1e-3
    finally:
        ctx.__exit__(None, None, None)


def test_half_precision_base_as_peft(tmp_path: Path):
    """On a bf16 base the spectrum is kept in fp32 (PEFT's autocast) and the branch runs in fp32
    before the output is cast back, as PEFT's forward does."""
    ctx = quiet()
    try:
        case = CASES["llama"]
        base = case.build().to(torch.bfloat16)
        pm = get_peft_model(copy.deepcopy(base), fourier("llama", scaling=30.0))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "fourierft_spectrum" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        pm.eval().save_pretrained(tmp_path)
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path)
        dtypes = {layer.fourierft_spectrum["default"].dtype for _, layer in adapted_layers(ours)}
        assert dtypes == {torch.float32}
        mine, theirs = output(case, ours), output(case, pm)
        assert mine.dtype == theirs.dtype and diff(mine.float(), theirs.float()) == 0
        assert diff(mine.float(), output(case, base).float()) > 1e-2
    finally:
        ctx.__exit__(None, None, None)
