"""C3A against PEFT 0.21 (the oracle), with the shared harness (`tests.methods.harness`).

Both directions, merged vs unmerged vs PEFT merged (unmerge restores the weights), seeded init
for every `init_weights` scheme, seeded training steps where PEFT's backward is right (its input
gradient is not the adjoint; surgeon's is: checked against the dense matrix, and shown to differ
from PEFT's, so only C3A layers with no trainable layer before them train as in PEFT),
two adapters switching (both active at once: PEFT chains them on a square layer),
`block_size_pattern` with PEFT's `.*\\.key$` match, the classic placement, on PEFT's MLP and
tiny Llama and BERT. The forward never builds the circulant matrix: checked against PEFT's
`get_circulant_fast` directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import C3AConfig
from peft.tuners.c3a.utils import get_circulant_fast
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

KERNEL = ("c3a_kernel",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}
# seq.4 is 32 -> 2: PEFT's key "4" (`.*\.4$`) gives it block 2; "seq.4" would never match it.
MLP = {"block_size": 4, "block_size_pattern": {"4": 2}}
ROUNDTRIPS = [("mlp", MLP), ("llama", {"block_size": 8}), ("bert", {"block_size": 16,
              "block_size_pattern": {"value": 8, "output.dense": 4}})]


def c3a(case: str, **options) -> C3AConfig:
    return C3AConfig(target_modules=TARGETS[case], **options)


@pytest.mark.parametrize("case,options", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path):
    check_roundtrip(CASES[case], c3a(case, **options), KERNEL, tmp_path)


@pytest.mark.parametrize("init", [True, False, "gaussian", "kaiming_uniform", "xavier_uniform"])
def test_initialisation_matches_peft(init):
    check_init(CASES["mlp"], c3a("mlp", init_weights=init, **MLP))


@pytest.mark.parametrize("case,options", [
    ("mlp", {"target_modules": ["seq.4"], "block_size": 2, "bias": "c3a_only"}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "block_size": 8}),
])
def test_training_steps_match_peft(case: str, options: dict):
    """Only layers with no trainable C3A layer after them: there PEFT's gradients are right."""
    check_training(CASES[case], C3AConfig(**options), KERNEL)


def test_input_gradient_is_the_adjoint_unlike_peft():
    from peft.tuners.c3a.utils import BlockCircularConvolution

    from surgeon.methods.c3a.layer import circulant_product

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 8, generator=g, dtype=torch.float64)
    dense = get_circulant_fast(w)  # (out, in): y = x @ dense.T
    (ours,) = torch.autograd.grad(circulant_product(x, w), x, grad)
    torch.testing.assert_close(ours, grad @ dense)
    torch.testing.assert_close(circulant_product(x, w), x @ dense.T)
    xp = x.detach().clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(BlockCircularConvolution.apply(xp, w), xp, grad)
    assert (theirs - grad @ dense).abs().max() > 0.1  # PEFT's backward is not the adjoint


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (c3a("mlp", **MLP), C3AConfig(target_modules=["seq.2"], block_size=8))
    check_switching(CASES["mlp"], configs, KERNEL, tmp_path)


def test_forward_is_the_circulant_product_without_building_it():
    from surgeon.methods.c3a.layer import c3a_delta, circulant

    model = nn.Sequential(nn.Linear(12, 8))
    surgeon.apply('adapter a = c3a(block_size=4, init=gaussian) { target "0" }', model)
    layer = model[0]
    calls = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert c3a_delta in calls and circulant not in calls
    kernel = layer.c3a_kernel["a"].detach()
    assert kernel.shape == (2, 3, 4)
    dense = get_circulant_fast(kernel) / 12  # PEFT's delta weight
    x = torch.randn(5, 12)
    expected = nn.functional.linear(x, layer.base_layer.weight + dense, layer.base_layer.bias)
    torch.testing.assert_close(model(x), expected)
    block = dense[:4, :4] * 12  # each block is circulant: rows are shifts of one vector
    assert all(torch.allclose(block[i], torch.roll(block[0], i)) for i in range(4))


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(C3AConfig(block_size=8, init_weights=False),
                            "adapter default = c3a(block_size=8, init=false) { }", tmp_path)


def test_two_active_on_a_non_square_layer_is_refused():
    model = nn.Sequential(nn.Linear(8, 4))
    surgeon.apply('adapter a = c3a(block_size=4) { target "0" }\n'
                  'adapter b = c3a(block_size=2) { target "0" }', model)
    with pytest.raises(UserError, match="square"):
        surgeon.set_adapter(model, ["a", "b"])


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear"):
        surgeon.apply("adapter a = c3a(block_size=2) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="factor of the input size"):
        surgeon.apply("adapter a = c3a(block_size=8) { target seq.0 }", CASES["mlp"].build())
    with pytest.raises(UserError, match="exclude"):
        surgeon.load_spec("adapter a = c3a(block_size=4) { target seq.0  exclude seq.2 }")
    with pytest.raises(UserError, match="init"):
        surgeon.load_spec("adapter a = c3a(init=orthogonal) { target seq.0 }")
