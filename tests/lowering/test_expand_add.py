"""LoRA's expand and add as one `addmm` (`surgeon.runtime.graph.expand_add`), written into the
base output in eval graphs where the graph owns it (`lora_add_`: the whole branch in one call,
matrix-vector products for a single input row): against PEFT's layer (the oracle), and never into
a tensor the graph does not own."""

from __future__ import annotations

import pytest
import torch

from surgeon.runtime import graph
from surgeon.runtime.adapted import AdaptedLayer
from tests.lowering.peft_oracle import (
    Variant,
    make_base,
    make_input,
    max_diff,
    pair,
    randomise,
    two_adapters,
)

TOL = 1e-5
VARIANTS = {"lora": Variant(), "rslora": Variant(r=4, alpha=3.0, use_rslora=True)}


@pytest.fixture(autouse=True, params=["small", "large"])
def size(request, monkeypatch) -> str:
    """Run each test on both paths: the two kernels of a decode-sized output, and `addmm`."""
    if request.param == "large":
        monkeypatch.setattr(graph, "_SMALL", 0)
    return request.param


def _gradients_match(theirs, ours: AdaptedLayer, x: torch.Tensor) -> None:
    """One backward of the same loss through both: the input's and every parameter's gradient."""
    x, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    theirs(x_theirs).square().sum().backward()
    ours(x).square().sum().backward()
    assert max_diff(x.grad, x_theirs.grad) <= TOL
    ours_grads = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.grad is not None:
            assert max_diff(ours_grads[name].grad, p.grad) <= TOL, name


def _targets(layer: AdaptedLayer) -> list:
    return [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eval_writes_the_delta_into_the_base_output(kind: str, variant: str) -> None:
    theirs, ours = pair(kind, VARIANTS[variant])
    theirs.eval()
    ours.eval()
    x = make_input(kind)
    before = x.clone()
    assert graph.lora_add_ in _targets(ours) and torch.add not in _targets(ours)
    with torch.no_grad():
        assert max_diff(theirs(x), ours(x)) <= TOL
    assert torch.equal(x, before)


# One row in the shapes a decode step brings: (batch 1, 1 token, in), a bare vector, a row seen
# through a strided view (a slice of a wider tensor), and a single row of a 2-D batch.
ONE_ROW = {
    "1x1xin": lambda: torch.randn(1, 1, 8),
    "vector": lambda: torch.randn(8),
    "strided": lambda: torch.randn(1, 1, 16)[..., ::2],
    "1xin": lambda: torch.randn(1, 8),
}


@pytest.mark.parametrize("shape", list(ONE_ROW))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_row_runs_matrix_vector_products_and_matches_peft(shape: str, variant: str,
                                                             monkeypatch) -> None:
    theirs, ours = pair("Linear", VARIANTS[variant])
    theirs.eval()
    ours.eval()
    calls = []
    monkeypatch.setattr(torch, "mv", lambda *a, _mv=torch.mv: calls.append(1) or _mv(*a))
    x = ONE_ROW[shape]()
    before = x.clone()
    with torch.no_grad():
        got = ours(x)
        assert max_diff(theirs(x), got) <= TOL and got.shape == theirs(x).shape
    assert calls, "a single row should take the matrix-vector path"
    assert torch.equal(x, before)


def test_one_row_gradients_match_peft_in_eval_mode() -> None:
    """Eval mode with autograd on (saliency, an input's gradient): the in-place `addmv_` into
    the base output is still differentiable."""
    theirs, ours = pair("Linear", VARIANTS["rslora"])
    theirs.eval()
    ours.eval()
    _gradients_match(theirs, ours, torch.randn(1, 1, 8))


def test_two_adapters_chain_into_one_output() -> None:
    theirs, ours = two_adapters("Linear", Variant(r=3, alpha=5.0))
    theirs.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    assert _targets(ours).count(graph.lora_add_) == 2
    for x in (make_input("Linear"), ONE_ROW["1x1xin"]()):
        with torch.no_grad():
            assert max_diff(theirs(x), ours(x)) <= TOL


def test_a_base_output_the_graph_does_not_own_is_never_written() -> None:
    """A hooked base is called as a module; what it returns (here a tensor the hook keeps) may be
    read elsewhere, so the branch adds out of place."""
    base = make_base("Linear")
    kept: list[torch.Tensor] = []
    base.register_forward_hook(lambda _m, _i, out: kept.append(out) or out)
    layer = AdaptedLayer(base, Variant().site("Linear")).eval()
    randomise(layer, "default")
    assert graph.expand_add_ not in _targets(layer) and graph.lora_add_ not in _targets(layer)
    x = make_input("Linear")
    with torch.no_grad():
        out = layer(x)
    expected = torch.nn.functional.linear(x, base.weight, base.bias)
    assert torch.equal(kept[0], expected)  # the base output the hook kept, untouched
    delta = 2.0 * (x @ layer.lora_A["default"].weight.T) @ layer.lora_B["default"].weight.T
    assert max_diff(out, expected + delta) <= TOL


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
def test_training_adds_out_of_place_and_gradients_match_peft(kind: str) -> None:
    theirs, ours = pair(kind, VARIANTS["rslora"])
    theirs.train()
    ours.train()
    assert graph.expand_add in _targets(ours) and graph.lora_add_ not in _targets(ours)
    _gradients_match(theirs, ours, make_input(kind))
