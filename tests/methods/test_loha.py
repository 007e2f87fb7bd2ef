"""LoHa against PEFT 0.21 (the oracle), through the shared harness (tests/methods/harness.py).

For custom modules (PEFT's MLP, a conv net, a Conv1d net) and tiny transformers (Llama, BERT;
the q/v projections of GPT-NeoX, OPT, BLOOM, T5, BART, ViT, Whisper), every config is checked
three ways in one setup (PEFT's LoHa layers cannot wrap Whisper's
Conv1d: its encoder then reads `conv1.stride`, which PEFT's layer lacks):
1. a PEFT-saved checkpoint loads into surgeon (`load_adapter`) with the same adapted modules and
   the same outputs;
2. surgeon's `save_pretrained` writes PEFT's key set, and `PeftModel.from_pretrained` loads it
   with the same outputs;
3. merged outputs equal the unmerged ones and PEFT's merged ones; unmerge restores the weights.
Then: seeded initialisation equals PEFT's tensor for tensor; a seeded training step (module and
rank dropout included) gives PEFT's outputs and gradients; two adapters switch as in PEFT; the
forward's factored path agrees with PEFT's full delta weight; refusals are PEFT's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, PeftModel, get_peft_model
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from tests.methods.harness import (  # noqa: F401 - the harness, shared by every method's tests
    ATOL,
    TARGETS,
    ConvNet1d,
    case_of,
    check_init,
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

# --------------------------------------------------------------------------- LoHa

HADA = ("hada_",)
CONFIGS = {
    "default": {"r": 4, "alpha": 8},
    "cp": {"r": 2, "alpha": 3, "use_effective_conv2d": True},
    "patterns": {"r": 2, "alpha": 4, "rank_pattern": {"^seq.2$": 5, "conv2": 3, "q_proj": 3},
                     "alpha_pattern": {"seq.4": 1.5, "conv1": 2.0}},
}
ROUNDTRIPS = [("mlp", "default"), ("mlp", "patterns"), ("convnet", "default"), ("convnet", "cp"),
              ("conv1d", "default"), ("conv1d", "cp"), ("llama", "patterns"), ("bert", "default")]


def loha(case: str, name: str, **extra) -> LoHaConfig:
    return LoHaConfig(target_modules=TARGETS[case], **{**CONFIGS[name], **extra})


@pytest.mark.parametrize("case,name", ROUNDTRIPS, ids=lambda v: v)
def test_roundtrip_and_merge(case: str, name: str, tmp_path: Path):
    check_roundtrip(case_of(case), loha(case, name), HADA, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt_neox", "opt", "bloom", "t5", "bart", "vit", "whisper"])
def test_transformers_spread(case: str, tmp_path: Path):
    """LoHa on each architecture's q/v projections (fused ones included), both directions."""
    check_roundtrip(CASES[case], LoHaConfig(target_modules=list(CASES[case].qv), r=2, alpha=3), HADA, tmp_path)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("case", ["mlp", "convnet", "conv1d"])
def test_initialisation_matches_peft(case: str, init: bool):
    check_init(case_of(case), loha(case, "cp", init_weights=init))


TRAININGS = {  # case -> (config, extra options); llama's rank 2 and 3 take the factored path
    "mlp": ("default", {"rank_dropout": 0.3, "module_dropout": 0.3}),
    "convnet": ("default", {"rank_dropout": 0.5}),
    "conv1d": ("default", {"module_dropout": 0.5, "use_effective_conv2d": True}),
    "llama": ("patterns", {"rank_dropout": 0.2, "module_dropout": 0.2}),
}


@pytest.mark.parametrize("case", TRAININGS)
def test_training_steps_match_peft(case: str):
    name, extra = TRAININGS[case]
    check_training(case_of(case), loha(case, name, **extra), HADA)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    check_switching(case_of("mlp"), (loha("mlp", "default"), LoHaConfig(target_modules=["seq.2"], r=3)),
                    HADA, tmp_path)


PATHS = {  # base layer, input shape, rank, the forward path the cost rule picks
    "linear-factored": (lambda: nn.Linear(64, 96), (3, 7, 64), 4),
    "linear": (lambda: nn.Linear(6, 5), (3, 7, 6), 2),
    "conv-factored": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 9, 9), 2),
    "conv": (lambda: nn.Conv2d(8, 16, 3, groups=2), (2, 8, 9, 9), 2),
    "conv1d-factored": (lambda: nn.Conv1d(8, 16, 3, dilation=2), (2, 8, 11), 2),
}


@pytest.mark.parametrize("path", PATHS)
def test_forward_paths_agree_with_peft(path: str):
    """Each forward path (rank-r^2 factored, full delta weight) gives PEFT's outputs and
    gradients, and `delta_weight` is PEFT's `get_delta_weight`."""
    from surgeon.methods.loha.layer import METHOD

    build, shape, r = PATHS[path]
    ctx = quiet()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(build())
        pm = get_peft_model(copy.deepcopy(model), LoHaConfig(target_modules=["0"], r=r, alpha=2 * r))
        randomize(pm, HADA)
        S.apply(spec_of(pm.peft_config["default"]), model)
        model.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
        assert METHOD._mode(model[0], "default") == path.replace("conv1d", "conv")
        x = torch.randn(*shape)
        for training in (False, True):  # eval: the path above; training: folded or factored
            _check_step(model.train(training), pm.train(training), x)
        layer = pm.base_model.model[0]
        torch.testing.assert_close(model[0].delta_weight("default"), layer.get_delta_weight("default").detach())
    finally:
        ctx.__exit__(None, None, None)


def _check_step(model: nn.Module, pm, x: torch.Tensor) -> None:
    """One forward and backward: PEFT's output and gradients."""
    for m in (model, pm):
        m.zero_grad(set_to_none=True)
    mine, theirs = model(x), pm(x)
    assert diff(mine, theirs) <= ATOL
    mine.square().sum().backward()
    theirs.square().sum().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert diff(p.grad, grads[n]) <= 1e-4 * max(1.0, grads[n].abs().max().item()), n


TRAINING_PATHS = {  # base layer, input shape, options, whether training folds the delta
    "fold-linear": (lambda: nn.Linear(64, 96), (3, 7, 64), {"r": 4}, True),
    "factored-linear": (lambda: nn.Linear(128, 128), (3, 7, 128), {"r": 2}, False),
    "fold-conv": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 9, 9), {"r": 4}, True),
    "fold-grouped-conv": (lambda: nn.Conv2d(8, 16, 3, groups=2), (2, 8, 9, 9), {"r": 2}, True),
    # PEFT's CP backward (HadaWeightCP) builds w1's gradients from w2's factors, not the true
    # gradient: only outputs and input gradients are compared there
    "fold-cp-conv": (lambda: nn.Conv2d(8, 16, 3), (2, 8, 9, 9), {"r": 2, "use_effective_conv2d": True}, True),
    "fold-dropouts": (lambda: nn.Linear(16, 24), (3, 7, 16), {"r": 2, "rank_dropout": 0.3, "module_dropout": 0.2}, True),
}


@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_training_paths_agree_with_peft(path: str):
    """In training the delta is folded into the base call where that is cheaper: outputs and
    gradients (input included) are PEFT's, seeded dropout draws included."""
    from surgeon.runtime.graph import source_of

    build, shape, options, folds = TRAINING_PATHS[path]
    ctx = quiet()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(build())
        pm = get_peft_model(copy.deepcopy(model), LoHaConfig(target_modules=["0"], alpha=3, **options))
        randomize(pm, HADA)
        S.apply(spec_of(pm.peft_config["default"]), model)
        model.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
        model.train(), pm.train()
        for step in range(3):
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
        for n, p in model.named_parameters():
            if p.requires_grad and "cp" not in path:
                assert diff(p.grad, grads[n]) <= 1e-4 * max(1.0, grads[n].abs().max().item()), n
        source = source_of(model[0]._forwards.by_state[model[0]._key()].run)
        assert ("loha_weight" in source) == folds
    finally:
        ctx.__exit__(None, None, None)


def test_refuses_what_peft_refuses():
    gpt2 = CASES["gpt2"].build()  # transformers' Conv1D: PEFT's LoHa has no layer for it
    with pytest.raises(UserError, match="adapts only Linear, Conv1d, Conv2d"):
        surgeon.apply("adapter a = loha(r=2) { target c_attn }", gpt2)
    with pytest.raises(UserError, match="is an Embedding"):
        surgeon.apply("adapter a = loha(r=2) { target embed }", CASES["nested"].build())


def test_language_spec_loads_in_peft(tmp_path: Path):
    """A spec in the language, applied and trained by surgeon, loads in PEFT with its outputs."""
    case = case_of("convnet")
    base = case.build()
    ours = copy.deepcopy(base)
    surgeon.apply("adapter default = loha(r=2, alpha=4, use_effective_conv2d=true) "
                  "{ target Conv2d  rank 3 on conv2  alpha 1 on head  target head }", ours)
    randomize(ours, HADA)
    S.save_pretrained(ours, tmp_path)
    ctx = quiet()
    try:
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    finally:
        ctx.__exit__(None, None, None)
    assert back.base_model.model.conv2.r["default"] == 3
    assert back.base_model.model.head.scaling["default"] == 0.5
    assert diff(output(case, back), output(case, ours)) <= ATOL
