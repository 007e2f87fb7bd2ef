"""IA3 layer by layer against PEFT 0.21's `peft.tuners.ia3` layers (the oracle).

For every base kind PEFT's IA3 adapts (Linear, transformers Conv1D, Conv2d, Conv3d), scaling the
output or (feed-forward) the input, with and without a bias: the same parameter names and
shapes (PEFT's state dict loads with strict=True), the same initialisation from the same seed,
the same forward, the same merged weights and biases, the same unmerge, and two active adapters
as PEFT multiplies them. Plus the math PEFT leaves implicit: merged == unmerged forward.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import IA3Config, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgeon.planning.site import Site
from surgeon.runtime.adapted import AdaptedLayer

KINDS = ("Linear", "Conv1D", "Conv2d", "Conv3d")


def make_base(kind: str, bias: bool = True, groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    if kind == "Linear":
        return nn.Linear(8, 6, bias=bias)
    if kind == "Conv1D":
        return Conv1D(6, 8)
    if kind == "Conv2d":
        return nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups)
    return nn.Conv3d(2, 4, 3, bias=bias)


def make_input(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = {"Linear": (2, 3, 8), "Conv1D": (2, 3, 8), "Conv2d": (2, 4, 6, 6),
             "Conv3d": (2, 2, 5, 5, 5)}[kind]
    return torch.randn(*shape, generator=gen)


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def peft_layer(base: nn.Module, feedforward: bool, init: bool = True) -> nn.Module:
    config = IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward else [],
                       init_ia3_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inject_adapter_in_model(config, Holder(base)).layer


def site(kind: str, feedforward: bool, adapter: str = "default", init: bool = True) -> Site:
    options = {"is_feedforward": feedforward, "init_ia3_weights": init, "inference_mode": False,
               "fan_in_fan_out": kind == "Conv1D"}
    return Site("layer", kind, "ia3", adapter, 0, 0.0, 1.0, tuple(sorted(options.items())))


def randomise(layer: nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.ia3_l.values():
            p.copy_(1 + 0.4 * torch.randn(p.shape, generator=gen))


def pair(kind: str, feedforward: bool, bias: bool = True, groups: int = 1):
    base = make_base(kind, bias, groups)
    theirs = peft_layer(copy.deepcopy(base), feedforward)
    ours = AdaptedLayer(copy.deepcopy(base), site(kind, feedforward))
    randomise(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


CASES = [pytest.param(k, ff, bias, id=f"{k}-{'ff' if ff else 'out'}-{'bias' if bias else 'nobias'}")
         for k in KINDS for ff in (False, True) for bias in (True, False) if k != "Conv1D" or bias]


@pytest.mark.parametrize("kind,feedforward,bias", CASES)
def test_forward_merge_unmerge_equal_peft(kind: str, feedforward: bool, bias: bool):
    theirs, ours = pair(kind, feedforward, bias)
    x = make_input(kind)
    with torch.no_grad():
        expected = theirs(x)
        assert diff(ours(x), expected) <= 1e-6
        assert ours.ia3_l["default"].shape == theirs.ia3_l["default"].shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.merge()
            ours.merge()
            # the same products, element by element: bitwise equal
            assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
            if bias:
                assert torch.equal(ours.base_layer.bias, theirs.base_layer.bias)
            assert diff(ours(x), theirs(x)) <= 1e-6
            assert diff(ours(x), expected) <= 1e-5  # the merged forward is the same function
            theirs.unmerge()
            ours.unmerge()
        assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
        if bias:
            assert torch.equal(ours.base_layer.bias, theirs.base_layer.bias)
        assert diff(ours(x), expected) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feedforward", [False, True])
def test_initialisation_draws_as_peft(kind: str, feedforward: bool):
    base = make_base(kind)
    torch.manual_seed(3)
    theirs = peft_layer(copy.deepcopy(base), feedforward, init=False)
    torch.manual_seed(3)
    ours = AdaptedLayer(copy.deepcopy(base), site(kind, feedforward, init=False))
    assert torch.equal(ours.ia3_l["default"], theirs.ia3_l["default"])
    ones = AdaptedLayer(copy.deepcopy(base), site(kind, feedforward))
    assert torch.equal(ones.ia3_l["default"], torch.ones_like(theirs.ia3_l["default"]))
    # ones leave the layer's function unchanged (math, not PEFT)
    x = make_input(kind)
    with torch.no_grad():
        assert torch.equal(ones(x), base(x))


def test_grouped_conv_feedforward_merges_as_peft():
    theirs, ours = pair("Conv2d", True, groups=2)
    x = make_input("Conv2d")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(x)
        assert diff(ours(x), expected) <= 1e-6
        theirs.merge()
        ours.merge()
        assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
        assert diff(ours(x), expected) <= 1e-5


@pytest.mark.parametrize("kind,feedforward", [("Linear", False), ("Linear", True), ("Conv2d", True),
                                              ("Conv1D", False)])
def test_two_active_adapters_multiply_as_peft(kind: str, feedforward: bool):
    theirs, ours = pair(kind, feedforward)
    config = IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward else [])
    theirs.update_layer("other", config)
    ours.add_adapter(site(kind, feedforward, "other"))
    randomise(theirs, seed=11)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    x = make_input(kind)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(x)
        assert diff(ours(x), expected) <= 1e-5
        theirs.merge()
        ours.merge()
        assert diff(ours.base_layer.weight, theirs.base_layer.weight) <= 1e-6
        assert diff(ours(x), expected) <= 1e-5
        theirs.unmerge()
        ours.unmerge()
        assert diff(ours.base_layer.weight, theirs.base_layer.weight) <= 1e-6
        ours.set_adapter("other")
        theirs.set_adapter("other")
        assert diff(ours(x), theirs(x)) <= 1e-6


def test_second_adapter_keeps_the_layers_mode_as_peft():
    """PEFT's update_layer reuses the layer's is_feedforward for every later adapter."""
    theirs, ours = pair("Linear", False)
    theirs.update_layer("other", IA3Config(target_modules=["layer"], feedforward_modules=["layer"]))
    with pytest.warns(UserWarning, match="feed-forward"):
        ours.add_adapter(site("Linear", True, "other"))
    assert ours.ia3_l["other"].shape == theirs.ia3_l["other"].shape == (6, 1)


def test_mixed_batches_are_refused_clearly():
    from surgeon.errors import UserError

    _, ours = pair("Linear", False)
    with pytest.raises(UserError, match="mixed-adapter batch"):
        ours(make_input("Linear"), adapter_names=["default", "__base__"])


def test_graph_invariants_hold_through_merge_and_unmerge():
    from surgeon.passes.insert_adapters import InsertAdaptersPass
    from surgeon.passes.merge import MergePass
    from surgeon.passes.pipeline import empty_graph_module, run_passes
    from surgeon.passes.unmerge import UnmergePass

    from surgeon.runtime.graph import tag

    _, ours = pair("Linear", True)
    ours.add_adapter(site("Linear", True, "other"))
    ours.set_adapter(["default", "other"])
    gm = run_passes(empty_graph_module(), ours, [InsertAdaptersPass()], verify=True).gm
    roles = [tag(n).get("role") for n in gm.graph.nodes]
    assert roles.count("input_result") == 2 and "result" not in roles
    base = next(n for n in gm.graph.nodes if tag(n).get("role") == "base_out")
    assert tag(base.args[0])["adapter"] == "other"  # the base call reads the last input part
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.merge()
        gm = run_passes(gm, ours, [MergePass()], verify=True).gm
        assert not any(tag(n).get("adapter") for n in gm.graph.nodes)
        ours.unmerge()
        gm = run_passes(gm, ours, [UnmergePass()], verify=True).gm
    assert [tag(n).get("role") for n in gm.graph.nodes].count("input_result") == 2


@pytest.mark.parametrize("kind", ["Linear", "Conv2d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_fp32_vectors_on_a_bf16_base_cast_as_peft(kind: str, feedforward: bool):
    """PEFT casts around a vector whose dtype differs from the base's (inputs, then outputs)."""
    theirs, ours = pair(kind, feedforward)
    theirs.base_layer.to(torch.bfloat16)
    ours.base_layer.to(torch.bfloat16)
    ours.relower()  # the base changed dtype behind the layer's back
    x = make_input(kind).to(torch.bfloat16)
    with torch.no_grad():
        expected = theirs(x)
        got = ours(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feedforward", [False, True])
def test_gradients_equal_peft(kind: str, feedforward: bool):
    theirs, ours = pair(kind, feedforward)
    x = make_input(kind)
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    grad, expected = ours.ia3_l["default"].grad, theirs.ia3_l["default"].grad
    assert expected.abs().max() > 0
    assert (grad - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_merge_and_unload_equals_peft():
    from peft import get_peft_model

    import surgeon.api as S
    from tests.models import MLP

    torch.manual_seed(0)
    base = MLP().eval()
    config = dict(target_modules=["seq.0", "seq.2", "seq.4"], feedforward_modules=["seq.2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), IA3Config(**config))
        ours = S.apply('adapter default = ia3() { target "seq.0", "seq.2", "seq.4"  '
                       'feedforward "seq.2" }', copy.deepcopy(base))
        for p in pm.parameters():
            if p.requires_grad:
                randomise_tensor(p)
        ours.load_state_dict(pm.base_model.model.state_dict())
        plain, reference = S.merge_and_unload(ours), pm.merge_and_unload()
    assert sorted(plain.state_dict()) == sorted(base.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key


def randomise_tensor(p: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(1 + 0.4 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def test_verifier_catches_a_base_call_reading_a_stale_input():
    """The input-part invariant can fail: a base call that skips the scaled input is a bug."""
    from surgeon.passes.insert_adapters import InsertAdaptersPass
    from surgeon.passes.pipeline import empty_graph_module, run_passes
    from surgeon.passes.verify import verify_graph

    from surgeon.runtime.graph import tag

    _, ours = pair("Linear", True)
    gm = run_passes(empty_graph_module(), ours, [InsertAdaptersPass()], verify=True).gm
    x = next(n for n in gm.graph.nodes if tag(n).get("role") == "input")
    scaled = next(n for n in gm.graph.nodes if tag(n).get("role") == "input_result")
    base = next(n for n in gm.graph.nodes if tag(n).get("role") == "base_out")
    base.replace_input_with(scaled, x)
    with pytest.raises(AssertionError, match="stale input"):
        verify_graph(gm, ours)
