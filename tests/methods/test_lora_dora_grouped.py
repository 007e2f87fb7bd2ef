"""DoRA on grouped convolutions against PEFT 0.21 (which adapts them; merging stays refused).

PEFT's lora_B on a grouped convolution is grouped too (`r / groups` inputs per output channel),
and its DoRA norm is taken of `mm(B.view(-1, r), A.view(r, -1))` reshaped to the base weight.
Same magnitudes at initialisation, same forward in eval and training mode, same gradients,
same refusal to merge, from PEFT's own layer with its state dict loaded strictly.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from surgeon.runtime.adapted import AdaptedLayer
from tests.lowering.peft_oracle import Variant, peft_layer, randomise

# (kind, base) pairs: depthwise-style and two-group convolutions, with and without bias
BASES = {
    "conv2d-g2": ("Conv2d", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2)),
    "conv2d-depthwise": ("Conv2d", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)),
    "conv1d-g2": ("Conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2)),
}
INPUTS = {"Conv2d": (2, 4, 6, 6), "Conv1d": (2, 4, 7)}


def pair(name: str, r: int = 4):
    kind, make = BASES[name]
    torch.manual_seed(0)
    base = make()
    variant = Variant(r=r, alpha=8.0, use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Merging is not supported" for groups > 1
        theirs = peft_layer(copy.deepcopy(base), variant)
        ours = AdaptedLayer(copy.deepcopy(base), variant.site(kind))
    return kind, variant, theirs, ours


@pytest.mark.parametrize("name", list(BASES))
def test_grouped_dora_equals_peft(name: str):
    kind, _, theirs, ours = pair(name)
    # PEFT initialises m = ||W + s * reshape(B A)|| per output channel (B is zero at init)
    m_ours = ours.lora_magnitude_vector["default"].weight
    m_theirs = theirs.lora_magnitude_vector["default"].weight
    assert m_ours.shape == m_theirs.shape
    assert (m_ours - m_theirs).abs().max() <= 1e-6
    randomise(theirs, "default")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(*INPUTS[kind], generator=torch.Generator().manual_seed(1))
    for mode in (False, True):
        theirs.train(mode)
        ours.train(mode)
        expected = theirs(x)
        got = ours(x)
        assert (got - expected).abs().max() <= 1e-5
        # the adapter changes the output (the test would see a missing branch)
        assert (expected - theirs.base_layer(x)).abs().max() > 1e-3
    # gradients reach the same parameters with the same values
    expected.square().sum().backward()
    got.square().sum().backward()
    for key, p in theirs.named_parameters():
        if p.requires_grad:
            mine = dict(ours.named_parameters())[key]
            assert (mine.grad - p.grad).abs().max() <= 1e-4, key


def test_grouped_dora_merge_is_refused_as_peft():
    _, _, theirs, ours = pair("conv2d-g2")
    with pytest.raises(NotImplementedError, match="groups > 1"):
        theirs.merge()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        ours.merge()


def test_rank_not_divisible_by_groups_is_refused_as_peft():
    base = BASES["conv2d-depthwise"][1]()
    variant = Variant(r=2, use_dora=True)
    with pytest.raises(ValueError, match="divisible by groups"):
        peft_layer(copy.deepcopy(base), variant)
    with pytest.raises(ValueError, match="divisible by groups"):
        AdaptedLayer(base, variant.site("Conv2d"))
