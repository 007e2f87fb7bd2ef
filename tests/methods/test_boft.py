"""BOFT against PEFT 0.21 (the oracle), with the shared harness (`tests.methods.harness`).

Both directions (PEFT checkpoint -> surgeon, surgeon -> PEFT), merged vs unmerged vs PEFT merged
(unmerge through `W M / s`), seeded init and training steps (multiplicative dropout's RNG draws
included), two adapters switching (both active: PEFT's `x M_other M_default` order), classic
placement, on PEFT's MLP, tiny Llama and BERT (Linear) and the conv net (Conv2d).

PEFT without its CUDA extension silently sets `boft_n_butterfly_factor` to 1 (and retries the
build on every layer); the tests replace the extension by its pure-torch math (`FakeFbd`) where
a butterfly factor above 1 is checked, else by its absence, as on a CPU machine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import BOFTConfig, get_peft_model
from peft.tuners.boft import layer as peft_boft
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from surgeon.lang.spec import Spec
from surgeon.methods.boft.butterfly import butterfly_perm
from surgeon.methods.boft.layer import rotate_input, rotate_kernel
from surgeon.peft_format.config import spec_from_peft_config
from tests.methods import harness
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
)
from tests.models import CASES

BOFT = ("boft_R", "boft_s")
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "wide": ["seq.2", "seq.4"],  # the MLP's 32-feature layers: room for butterfly factors
    "convnet": ["conv1", "conv2", "head"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}


class FakeFbd:
    """PEFT's fbd_cuda extension as torch code: `(N, D, b, b)` -> `(N, D b, D b)` and back."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*factor) for factor in x])]

    @staticmethod
    def backward(grad, x):
        d, b = x.shape[1], x.shape[2]
        return [torch.stack([torch.stack([g[i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(d)])
                             for g in grad])]


@pytest.fixture(autouse=True)
def peft_setup(monkeypatch):
    """No CUDA extension build per layer; the harness's random scales `boft_s` near 1 (PEFT's
    init is 1; values near 0 make unmerge's `1 / s` lose the harness's 1e-6 restore bound)."""
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)
    randomize = harness.randomize

    def near_one(model, prefixes, seed=7, scale=0.4):
        randomize(model, prefixes, seed, scale / 4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".boft_s" in name:
                    p.add_(1.0)

    monkeypatch.setattr(harness, "randomize", near_one)


@pytest.fixture
def fbd(monkeypatch):
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: FakeFbd)


def boft(case: str, **options) -> BOFTConfig:
    return BOFTConfig(target_modules=TARGETS[case], **options)


def case_of(name: str):
    return CASES["mlp" if name == "wide" else name]


ROUNDTRIPS = [
    ("mlp", {"boft_block_size": 4}),
    ("mlp", {"boft_block_size": 0, "boft_block_num": 4}),
    ("convnet", {"boft_block_size": 3}),
    ("llama", {"boft_block_size": 8}),
    ("bert", {"boft_block_size": 0, "boft_block_num": 4}),
]


@pytest.mark.parametrize("case,options", ROUNDTRIPS, ids=str)
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path):
    check_roundtrip(case_of(case), boft(case, **options), BOFT, tmp_path)


@pytest.mark.parametrize("options", [{"boft_block_size": 4, "boft_n_butterfly_factor": 3},
                                     {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2}],
                         ids=str)
def test_butterfly_factors_match_peft_with_its_kernel(fbd, options: dict, tmp_path: Path):
    check_roundtrip(CASES["mlp"], boft("wide", **options), BOFT, tmp_path)


def test_butterfly_permutation_is_peft_s():
    layer = peft_boft.BOFTLayer.__new__(peft_boft.BOFTLayer)
    for n, b, r, f in [(32, 8, 2, 2), (32, 4, 2, 2), (64, 16, 1, 3), (72, 6, 3, 1), (20, 5, 2, 1)]:
        assert butterfly_perm(n, b, r, f) == layer.block_butterfly_perm(n, b, r, f).tolist()


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("case", ["mlp", "convnet"])
def test_initialisation_matches_peft(case: str, init: bool):
    check_init(CASES[case], boft(case, boft_block_size=0 if case == "mlp" else 3,
                                 boft_block_num=4 if case == "mlp" else 0, init_weights=init))


@pytest.mark.parametrize("case,options", [
    ("mlp", {"boft_block_size": 4, "boft_dropout": 0.5, "bias": "boft_only"}),
    ("convnet", {"boft_block_size": 3, "boft_dropout": 0.3}),
], ids=str)
def test_training_steps_match_peft(case: str, options: dict):
    check_training(CASES[case], boft(case, init_weights=False, **options), BOFT)


def test_training_with_butterfly_factors_matches_peft(fbd):
    check_training(CASES["mlp"], boft("wide", boft_block_size=4, boft_n_butterfly_factor=2,
                                      boft_dropout=0.5, init_weights=False), BOFT)


@pytest.mark.parametrize("case", ["mlp", "convnet"])
def test_two_adapters_switch_as_peft(case: str, tmp_path: Path):
    size = 4 if case == "mlp" else 3
    configs = (boft(case, boft_block_size=size),
               BOFTConfig(target_modules=TARGETS[case][1:], boft_block_size=2 * size))
    check_switching(CASES[case], configs, BOFT, tmp_path)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(BOFTConfig(boft_block_size=8),
                            "adapter default = boft(boft_block_size=8, init=false) { }", tmp_path)


def test_linear_forward_rotates_the_input_blockwise():
    """No `n x n` rotation: the Linear graph rotates `x` blockwise before the base call, then
    scales the output, equal to PEFT's formula written with the dense matrix by hand."""
    model = nn.Sequential(nn.Linear(8, 5))
    surgeon.apply('adapter a = boft(block_size=4, init=false) { target "0" }', model)
    layer = model[0]
    targets = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert rotate_input in targets
    r, s = layer.boft_R["a"][0], layer.boft_s["a"]
    skew = 0.5 * (r - r.transpose(1, 2))
    eye = torch.eye(4).expand(2, 4, 4)
    blocks = (eye - skew) @ torch.linalg.inv(eye + skew)
    x = torch.randn(3, 8)
    base = layer.base_layer
    expected = (x @ torch.block_diag(*blocks)) @ base.weight.T * s.squeeze(-1) + base.bias
    torch.testing.assert_close(model(x), expected)


def test_conv_forward_rotates_the_kernel_as_a_weight_part():
    model = nn.Sequential(nn.Conv2d(2, 3, 2))
    surgeon.apply('adapter a = boft(block_size=4, init=false) { target "0" }', model)
    graph = model[0].graph_module.graph
    rotated = next(n for n in graph.nodes if n.target is rotate_kernel)
    conv = next(n for n in graph.nodes if n.target is torch.conv2d)
    assert conv.args[1] is rotated and len([n for n in graph.nodes if n.target is torch.conv2d]) == 1


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="either boft_block_size"):
        surgeon.load_spec("adapter a = boft(boft_block_num=2) { target seq.0 }")  # size defaults to 4
    with pytest.raises(UserError, match="must be non-zero"):
        surgeon.load_spec("adapter a = boft(boft_block_size=0) { target seq.0 }")
    with pytest.raises(UserError, match=r"in_features \(20\) must be divisible by boft_block_size \(3\)"):
        surgeon.plan("adapter a = boft(boft_block_size=3) { target seq.0 }", CASES["mlp"].build())
    with pytest.raises(UserError, match="must be an even number"):
        surgeon.plan("adapter a = boft(block_size=5, butterfly=2) { target \"0\" }",
                     nn.Sequential(nn.Linear(20, 2)))
    with pytest.raises(UserError, match="adapts only Linear and Conv2d"):
        surgeon.plan("adapter a = boft() { target embed_tokens }", CASES["llama"].build())


@pytest.mark.parametrize("conv,match", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups > 1"),
    (nn.Conv2d(2, 4, 3, dilation=2), "padding\\[0\\] and stride\\[0\\]"),
    (nn.Conv2d(2, 4, 3, stride=(1, 2)), "padding\\[0\\] and stride\\[0\\]"),
    (nn.Conv2d(2, 4, (1, 2)), "non-square kernel"),
])
def test_refuses_convolutions_peft_computes_otherwise(conv: nn.Module, match: str):
    with pytest.raises(UserError, match=match):
        surgeon.plan('adapter a = boft(block_size=2) { target "0" }', nn.Sequential(conv))


@pytest.mark.parametrize("conv", [False, True])
def test_two_active_adapters_keep_the_graph_invariants(conv: bool):
    """Both active (the later adapter's input part first, or chained weight parts), then one
    deleted: the graph stays valid (`verify_graph`) and computes the formula written by hand."""
    from surgeon.passes.verify import verify_graph

    model = nn.Sequential(nn.Conv2d(2, 3, 2) if conv else nn.Linear(8, 3))
    for name, size in (("a", 4), ("b", 2)):
        surgeon.apply(f'adapter {name} = boft(block_size={size}, init=false) {{ target "0" }}', model)
    S.set_adapter(model, ["a", "b"])
    layer = model[0]
    verify_graph(layer.graph_module, layer)
    x = torch.randn(2, 2, 4, 4) if conv else torch.randn(5, 8)
    torch.testing.assert_close(model(x), _by_hand(layer, ["a", "b"], x, conv))
    S.delete_adapter(model, "a")
    verify_graph(layer.graph_module, layer)
    torch.testing.assert_close(model(x), _by_hand(layer, ["b"], x, conv))


def _by_hand(layer, adapters: list[str], x: torch.Tensor, conv: bool) -> torch.Tensor:
    """PEFT's forward: `M = M_last ... M_first`, `s` their product; Linear `(x M) W^T s + b`,
    Conv2d `conv(x, (W M^T) s, b)`."""
    base = layer.base_layer
    n = base.weight[0].numel()
    rot, scale = torch.eye(n), torch.ones(base.weight.shape[0])
    for a in adapters:
        r = layer.boft_R[a][0]
        eye = torch.eye(r.shape[-1]).expand_as(r)
        skew = 0.5 * (r - r.transpose(1, 2))
        rot = torch.block_diag(*((eye - skew) @ torch.linalg.inv(eye + skew))) @ rot
        scale = scale * layer.boft_s[a].flatten()
    if conv:
        weight = (base.weight.flatten(1) @ rot.T * scale[:, None]).reshape(base.weight.shape)
        return torch.conv2d(x, weight, base.bias)
    return (x @ rot) @ base.weight.T * scale + base.bias


def test_two_active_adapters_draw_dropout_as_peft():
    """Train mode, both adapters active with dropout: PEFT draws each adapter's blocks in
    adapter order, then applies `x M_other M_default`; equal outputs need both orders kept."""
    case = CASES["mlp"]
    configs = (boft("mlp", boft_block_size=4, boft_dropout=0.5, init_weights=False),
               BOFTConfig(target_modules=["seq.2"], boft_block_size=2, boft_dropout=0.5, init_weights=False))
    base = case.build()
    pm = get_peft_model(copy.deepcopy(base), configs[0])
    pm.add_adapter("other", configs[1])
    ours = copy.deepcopy(base)
    for name, config in zip(("default", "other"), configs):
        S.apply(Spec((spec_from_peft_config(config.to_dict(), name=name),)), ours)
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
    pm.base_model.set_adapter(["default", "other"])
    S.set_adapter(ours, ["default", "other"])
    pm.train(), ours.train()
    for seed in range(3):
        torch.manual_seed(seed)
        theirs = case.output(pm)
        torch.manual_seed(seed)
        torch.testing.assert_close(case.output(ours), theirs)
