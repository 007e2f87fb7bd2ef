"""LoHa's and LoKr's split fold in training (`surgeon.methods.lycoris_layer.SplitGrads`) against
PEFT 0.21: outputs, input gradients and every factor's gradient over a few seeded steps, and
the path each case must take (split, whole fold, or not folded), so a fallback that silently
replaced the fast path would fail here too.

Cases: the split for LoHa (also at the benchmark's r=8 layer shapes, where every factor
gradient goes through the four rank-r^2 GEMMs) and LoKr (plain, `decompose_both`, a factored
`w2`), with module dropout (the seeded draw drops the adapter on some steps), an unfrozen base
weight (its gradient then flows through the base call), two adapters on one layer (only the
first may split), rank dropout (the whole fold; on a large LoKr Linear the Kronecker path), and
a LoHa layer where the weight gradient is the cheaper one (the whole fold).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model
from torch import nn

import surgeon.api as S
from tests.methods.harness import ATOL, diff, quiet, randomize, spec_of

# name: (config class, base layer, input shape, options, the training path: split/fold/none)
CASES = {
    "loha-split": (LoHaConfig, lambda: nn.Linear(20, 30), (3, 7, 20), {"r": 2}, "split"),
    "loha-split-bias-2d": (LoHaConfig, lambda: nn.Linear(24, 24, bias=True), (9, 24), {"r": 2}, "split"),
    "loha-split-bias-3d": (LoHaConfig, lambda: nn.Linear(24, 24, bias=True), (3, 4, 24), {"r": 2}, "split"),
    # the benchmark's llama shapes at r=8 (square attention, rectangular MLP): every layer splits
    "loha-split-r8-square": (LoHaConfig, lambda: nn.Linear(256, 256), (2, 16, 256), {"r": 8}, "split"),
    "loha-split-r8-wide": (LoHaConfig, lambda: nn.Linear(256, 512), (2, 16, 256), {"r": 8}, "split"),
    "loha-split-r8-narrow": (LoHaConfig, lambda: nn.Linear(512, 256), (32, 512), {"r": 8}, "split"),
    "loha-fold": (LoHaConfig, lambda: nn.Linear(16, 24), (3, 7, 16), {"r": 4}, "fold"),
    "loha-module-dropout": (LoHaConfig, lambda: nn.Linear(20, 30), (3, 7, 20),
                            {"r": 2, "module_dropout": 0.3}, "split"),
    "loha-rank-dropout": (LoHaConfig, lambda: nn.Linear(20, 30), (3, 7, 20),
                          {"r": 2, "rank_dropout": 0.3}, "fold"),
    "lokr-split": (LoKrConfig, lambda: nn.Linear(64, 96), (3, 5, 64), {"r": 8}, "split"),
    "lokr-split-w2-factored": (LoKrConfig, lambda: nn.Linear(64, 96), (3, 5, 64), {"r": 1}, "split"),
    "lokr-split-both": (LoKrConfig, lambda: nn.Linear(64, 96), (3, 5, 64),
                        {"r": 1, "decompose_both": True}, "split"),
    "lokr-split-factor": (LoKrConfig, lambda: nn.Linear(24, 32), (4, 24), {"r": 2, "decompose_factor": 8},
                          "split"),
    "lokr-module-dropout": (LoKrConfig, lambda: nn.Linear(64, 96), (3, 5, 64),
                            {"r": 8, "module_dropout": 0.3}, "split"),
    "lokr-rank-dropout": (LoKrConfig, lambda: nn.Linear(64, 96), (3, 5, 64),
                          {"r": 8, "rank_dropout": 0.3, "rank_dropout_scale": True}, "fold"),
    # rank dropout (no split) on a large Linear: the Kronecker path, not a whole fold
    "lokr-large-rank-dropout": (LoKrConfig, lambda: nn.Linear(1024, 1024), (2, 1024),
                                {"r": 8, "rank_dropout": 0.3}, "none"),
}
PREFIXES = ("hada_", "lokr_")


def _pair(config_cls, build, options, unfreeze: bool = False, second=None):
    torch.manual_seed(0)
    model = nn.Sequential(build())
    pm = get_peft_model(copy.deepcopy(model), config_cls(target_modules=["0"], alpha=3, **options))
    if second is not None:
        pm.add_adapter("other", second)
    randomize(pm, PREFIXES)
    spec = spec_of(pm.peft_config["default"])
    if second is not None:
        from surgeon.lang.spec import Spec
        from surgeon.peft_format.config import spec_from_peft_config

        spec = Spec(spec.adapters + (spec_from_peft_config(second.to_dict(), name="other"),))
    S.apply(spec, model)
    model.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
    if second is not None:
        pm.base_model.set_adapter(["default", "other"])
        S.set_adapter(model, ["default", "other"])
    if unfreeze:
        model[0].base_layer.weight.requires_grad_(True)
        pm.base_model.model[0].base_layer.weight.requires_grad_(True)
    return model, pm


def _steps(model: nn.Module, pm: nn.Module, shape: tuple, steps: int = 4) -> None:
    """Seeded steps (grads accumulate over them): PEFT's outputs and gradients."""
    model.train(), pm.train()
    for step in range(steps):
        x = torch.randn(*shape, requires_grad=True)
        theirs_x = x.detach().clone().requires_grad_(True)
        torch.manual_seed(10 + step)
        mine = model(x)
        torch.manual_seed(10 + step)
        theirs = pm(theirs_x)
        assert diff(mine, theirs) <= ATOL
        (mine.square() * mine.detach().sign()).sum().backward()
        (theirs.square() * theirs.detach().sign()).sum().backward()
        assert diff(x.grad, theirs_x.grad) <= 1e-4 * max(1.0, theirs_x.grad.abs().max().item())
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    mine_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert mine_grads.keys() == grads.keys()
    for n, g in mine_grads.items():
        assert g is not None and grads[n] is not None, n
        assert diff(g, grads[n]) <= 1e-4 * max(1.0, grads[n].abs().max().item()), n


def _path(model: nn.Module) -> str:
    from surgeon.runtime.graph import source_of

    source = source_of(model[0]._forwards.by_state[model[0]._key()].run)
    if "weight_detached" in source:
        assert "_split" in source
        return "split"
    return "fold" if "loha_weight" in source or "lokr_weight" in source else "none"


@pytest.mark.parametrize("case", CASES)
def test_training_path_matches_peft(case: str):
    config_cls, build, shape, options, path = CASES[case]
    ctx = quiet()
    try:
        model, pm = _pair(config_cls, build, options)
        _steps(model, pm, shape)
        assert _path(model) == path
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case", ["loha-split", "lokr-split"])
def test_split_with_unfrozen_base_weight(case: str):
    """The base weight gets its gradient through the base call (the delta is detached there)."""
    config_cls, build, shape, options, _ = CASES[case]
    ctx = quiet()
    try:
        model, pm = _pair(config_cls, build, options, unfreeze=True)
        _steps(model, pm, shape)
        assert _path(model) == "split"
        assert model[0].base_layer.weight.grad is not None
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case", ["loha-split", "lokr-split"])
def test_split_with_two_adapters(case: str):
    """Two active adapters: the first splits, the second (its input is no longer the base
    output) adds its delta as before; PEFT's outputs and gradients."""
    config_cls, build, shape, options, _ = CASES[case]
    ctx = quiet()
    try:
        model, pm = _pair(config_cls, build, options, second=config_cls(target_modules=["0"], r=2, alpha=2))
        _steps(model, pm, shape)
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case", ["loha-split", "loha-split-bias-3d", "lokr-split"])
def test_split_output_modified_in_place_after(case: str):
    """A later in-place op on the layer's output (ReLU(inplace=True)) is legal, as in PEFT, and
    gives PEFT's gradients (the split's output is the base output marked dirty, or a copy of a
    view)."""
    config_cls, build, shape, options, _ = CASES[case]
    ctx = quiet()
    try:
        model, pm = _pair(config_cls, lambda: build(), options)
        model.append(nn.ReLU(inplace=True))
        pm.base_model.model.append(nn.ReLU(inplace=True))
        _steps(model, pm, shape)
        assert _path(model) == "split"
    finally:
        ctx.__exit__(None, None, None)


def test_split_gradient_without_grad_mode_and_frozen_factors():
    """Under no_grad, and with the adapter's factors frozen, the split output part is the base
    output itself (no autograd node) and the outputs are still PEFT's."""
    config_cls, build, shape, options, _ = CASES["loha-split"]
    ctx = quiet()
    try:
        model, pm = _pair(config_cls, build, options)
        model.train(), pm.train()
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.manual_seed(3)
            mine = model(x)
            torch.manual_seed(3)
            assert diff(mine, pm(x)) <= ATOL
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(3)
        out = model(x)
        assert out.grad_fn is None and diff(out, mine) == 0
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_dropout_draw_compares_as_torch(monkeypatch, dtype):
    """`module_kept` compares in Python what PEFT compares in torch (`torch.rand(1) > p`), also
    for draws at and next to `p` rounded to the draw's dtype (where a plain Python comparison
    with `p` would differ: 0.1 rounds up in float32)."""
    from surgeon.methods.lycoris_layer import module_kept

    for p in (0.0, 0.1, 0.3, 1 / 3, 0.5, 0.9):
        edge = torch.tensor([p], dtype=dtype)
        for draw in (edge, torch.nextafter(edge, torch.zeros(1, dtype=dtype)),
                     torch.nextafter(edge, torch.ones(1, dtype=dtype))):
            monkeypatch.setattr(torch, "rand", lambda *_, draw=draw: draw.clone())
            assert module_kept(p) == bool(draw > p), (p, draw.item())
