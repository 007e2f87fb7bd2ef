"""LoKr against PEFT 0.21 (the oracle), with the harness of `tests/methods/test_loha.py`.

The same three-way check per config (PEFT checkpoint -> surgeon, surgeon -> PEFT, merged vs
unmerged vs PEFT merged) on custom modules and tiny transformers; seeded initialisation (all three
`init_weights` schemes) equal to PEFT's; seeded training steps with module and rank dropout
(with and without `rank_dropout_scale`); two adapters switching; the Kronecker forward against
PEFT's delta weight for every factor layout; and PEFT's `factorization` table.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoKrConfig, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_factorization
from peft.tuners.lokr.layer import make_weight_cp
from torch import nn

import surgeon.api as S
from surgeon.methods.lokr.layer import factorization, kron
from tests.methods.harness import (
    ATOL,
    TARGETS,
    case_of,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
    diff,
    quiet,
    randomize,
    spec_of,
)
from tests.models import CASES

LOKR = ("lokr_",)
CONFIGS = {
    "default": {"r": 4, "alpha": 8},
    # rank 1 against factors of 4 and more: w2 (and w1, with decompose_both) as rank-1 products
    "decomposed": {"r": 1, "alpha": 2, "decompose_both": True, "decompose_factor": 4},
    # rank 1 against conv channels of 8: w2 as a CP decomposition (t2, w2_a, w2_b)
    "cp": {"r": 1, "alpha": 3, "use_effective_conv2d": True},
    "lycoris": {"r": 2, "alpha": 4, "init_weights": "lycoris"},
    "patterns": {"r": 2, "alpha": 4, "rank_pattern": {"^seq.2$": 8, "conv2": 1, "q_proj": 1},
                     "alpha_pattern": {"seq.4": 1.5, "conv1": 2.0}},
}
ROUNDTRIPS = [("mlp", "default"), ("mlp", "decomposed"), ("mlp", "patterns"), ("convnet", "default"),
              ("convnet", "cp"), ("convnet", "decomposed"), ("conv1d", "default"),
              ("conv1d", "lycoris"), ("llama", "patterns"), ("llama", "decomposed"), ("bert", "default")]


def lokr(case: str, name: str, **extra) -> LoKrConfig:
    return LoKrConfig(target_modules=TARGETS[case], **{**CONFIGS[name], **extra})


@pytest.mark.parametrize("case,name", ROUNDTRIPS, ids=lambda v: v)
def test_roundtrip_and_merge(case: str, name: str, tmp_path: Path):
    check_roundtrip(case_of(case), lokr(case, name), LOKR, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mistral", "qwen2", "falcon", "roberta", "t5", "whisper"])
def test_transformers_spread(case: str, tmp_path: Path):
    """LoKr on each architecture's q/v projections (fused ones included), both directions."""
    config = LoKrConfig(target_modules=list(CASES[case].qv), r=2, alpha=3, decompose_both=True)
    check_roundtrip(CASES[case], config, LOKR, tmp_path)


@pytest.mark.parametrize("init", [True, False, "lycoris"], ids=str)
@pytest.mark.parametrize("case,name", [("mlp", "decomposed"), ("convnet", "cp"), ("conv1d", "default")],
                         ids=lambda v: v)
def test_initialisation_matches_peft(case: str, name: str, init):
    check_init(case_of(case), lokr(case, name, init_weights=init))


TRAININGS = {
    "mlp": ("decomposed", {"rank_dropout": 0.3, "module_dropout": 0.3}),
    "convnet": ("default", {"rank_dropout": 0.5, "rank_dropout_scale": True}),
    "conv1d": ("lycoris", {"module_dropout": 0.5}),
    "llama": ("patterns", {"rank_dropout": 0.2, "rank_dropout_scale": True}),
}


@pytest.mark.parametrize("case", TRAININGS)
def test_training_steps_match_peft(case: str):
    name, extra = TRAININGS[case]
    check_training(case_of(case), lokr(case, name, **extra), LOKR)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (lokr("mlp", "default"), LoKrConfig(target_modules=["seq.2"], r=1, decompose_both=True))
    check_switching(case_of("mlp"), configs, LOKR, tmp_path)


LAYOUTS = {  # base layer, input shape, options: every factor layout of w1 and w2
    "linear-full": (lambda: nn.Linear(12, 20), (3, 5, 12), {"r": 8}),
    "linear-factored": (lambda: nn.Linear(64, 96), (3, 5, 64), {"r": 1, "decompose_both": True}),
    "linear-prime": (lambda: nn.Linear(13, 7), (4, 13), {"r": 2}),
    "linear-factor": (lambda: nn.Linear(24, 32), (4, 24), {"r": 2, "decompose_factor": 8}),
    "conv2d-cp": (lambda: nn.Conv2d(16, 16, 3, padding=1), (2, 16, 6, 6), {"r": 1, "use_effective_conv2d": True}),
    "conv1d-full": (lambda: nn.Conv1d(4, 8, 3, stride=2), (2, 4, 9), {"r": 4}),
    "linear-large": (lambda: nn.Linear(1024, 1024), (2, 1024), {"r": 8}),  # training: a split fold
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_agrees_with_peft(layout: str):
    """The Kronecker forward gives PEFT's outputs and gradients, in eval and in training (where
    the delta is folded into the base call); `delta_weight` is PEFT's."""
    from surgeon.runtime.graph import source_of

    build, shape, options = LAYOUTS[layout]
    ctx = quiet()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(build())
        pm = get_peft_model(copy.deepcopy(model), LoKrConfig(target_modules=["0"], alpha=3, **options))
        randomize(pm, LOKR)
        S.apply(spec_of(pm.peft_config["default"]), model)
        model.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
        for training in (False, True):
            model.train(training), pm.train(training)
            x = torch.randn(*shape, requires_grad=True)
            theirs_x = x.detach().clone().requires_grad_(True)
            for m in (model, pm):
                m.zero_grad(set_to_none=True)
            mine, theirs = model(x), pm(theirs_x)
            assert diff(mine, theirs) <= ATOL
            mine.square().sum().backward()
            theirs.square().sum().backward()
            assert diff(x.grad, theirs_x.grad) <= 1e-4 * max(1.0, theirs_x.grad.abs().max().item())
            grads = {n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters() if p.requires_grad}
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert diff(p.grad, grads[n]) <= 1e-4 * max(1.0, grads[n].abs().max().item()), n
            folded = "lokr_weight" in source_of(model[0]._forwards.by_state[model[0]._key()].run)
            assert folded == training
        layer = pm.base_model.model[0]
        torch.testing.assert_close(model[0].delta_weight("default"), layer.get_delta_weight("default").detach())
    finally:
        ctx.__exit__(None, None, None)


def test_factorization_is_peft():
    for dimension in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 17, 64, 0, -2):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


def test_kron_is_torch_kron():
    for a, b in [((2, 3), (4, 5)), ((2, 3, 1, 1), (4, 5, 3, 3)), ((2, 3), (4, 5, 3)), ((1,), (3,))]:
        x, y = torch.randn(a), torch.randn(b)
        assert torch.equal(kron(x, y), torch.kron(x, y))


def test_cp_conv1d_where_peft_fails():
    """PEFT's LoKr CP Conv1d kernel (t2 of shape (r, r, k, 1)) makes torch.kron fail on its
    strides, so PEFT cannot run it; surgeon runs the kernel PEFT's formula defines:
    `W[(i, j), (k, l), h] = scale * w1[i, k] * cp(t2, w2_a, w2_b)[j, l, h, 0]`."""
    base = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1))
    ctx = quiet()
    try:
        pm = get_peft_model(copy.deepcopy(base), LoKrConfig(target_modules=["0"], r=1, alpha=3,
                                                             use_effective_conv2d=True))
        randomize(pm, LOKR)
        with pytest.raises(RuntimeError, match="view size"):
            pm(torch.randn(2, 8, 5))
        S.apply(spec_of(pm.peft_config["default"]), base)
    finally:
        ctx.__exit__(None, None, None)
    base.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
    layer = pm.base_model.model[0]
    w1 = layer.lokr_w1["default"]
    w2 = make_weight_cp(layer.lokr_t2["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"])
    expected = 3.0 * torch.einsum("ik,jlh->ijklh", w1, w2[..., 0]).reshape(8, 8, 3)
    torch.testing.assert_close(base[0].delta_weight("default"), expected.detach())
    x = torch.randn(2, 8, 5)
    want = base[0].base_layer(x) + nn.functional.conv1d(x, expected, padding=1)
    with torch.no_grad():
        assert diff(base(x), want) <= ATOL
