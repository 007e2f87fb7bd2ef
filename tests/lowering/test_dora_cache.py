"""DoRA's cached weight norm: computed once for inference, never stale after weights change."""

from __future__ import annotations

import pytest
import torch

from surgeon.methods.lora import dora as lora_dora
from tests.lowering.peft_oracle import Variant, make_input, max_diff, pair

TOL = 1e-5
KINDS = ("Linear", "Conv1D", "Conv2d", "Embedding")


@pytest.fixture
def norm_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts full weight-norm computations."""
    calls: list[int] = []
    real = lora_dora.weight_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_dora, "weight_norm", counting)
    return calls


def _eval_same(theirs, ours, x) -> bool:
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        return max_diff(theirs(x), ours(x)) <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_inference_computes_the_norm_once(kind: str, norm_calls: list[int]) -> None:
    theirs, ours = pair(kind, Variant(use_dora=True))
    x = make_input(kind)
    assert _eval_same(theirs, ours, x)
    before = len(norm_calls)
    with torch.no_grad():
        for _ in range(3):
            ours(x)
    assert len(norm_calls) == before


@pytest.mark.parametrize("kind", KINDS)
def test_norm_follows_optimizer_steps(kind: str, norm_calls: list[int]) -> None:
    """Train both layers identically; the eval output must follow the new weights like PEFT's."""
    theirs, ours = pair(kind, Variant(use_dora=True, lora_dropout=0.2))
    x = make_input(kind)
    assert _eval_same(theirs, ours, x)
    optimizers = [torch.optim.SGD([p for n, p in layer.named_parameters() if "lora_" in n], lr=0.5)
                  for layer in (theirs, ours)]
    for step in range(2):
        for layer, opt in zip((theirs, ours), optimizers):
            layer.train()
            torch.manual_seed(step)
            opt.zero_grad()
            (layer(x) ** 2).mean().backward()
            opt.step()
        assert _eval_same(theirs, ours, x)


def test_eval_mode_training_recomputes(norm_calls: list[int]) -> None:
    """Grad enabled with trainable factors (training in eval mode): fresh norm every call."""
    theirs, ours = pair("Linear", Variant(use_dora=True))
    x = make_input("Linear")
    theirs.eval()
    ours.eval()
    opt = torch.optim.SGD([ours.lora_A["default"].weight], lr=1.0)
    for _ in range(2):
        calls = len(norm_calls)
        ours(x).sum().backward()
        assert len(norm_calls) == calls + 1
        opt.step()
        theirs.lora_A["default"].weight.data.copy_(ours.lora_A["default"].weight)
        assert _eval_same(theirs, ours, x)


def test_in_place_edit_and_dtype_change_invalidate() -> None:
    theirs, ours = pair("Conv2d", Variant(use_dora=True))
    x = make_input("Conv2d")
    assert _eval_same(theirs, ours, x)
    with torch.no_grad():
        for layer in (theirs, ours):
            layer.lora_B["default"].weight.mul_(3.0)
            layer.base_layer.weight.add_(0.1)
    assert _eval_same(theirs, ours, x)
    theirs.double()
    ours.double()
    assert _eval_same(theirs, ours, x.double())


def test_merge_unmerge_round_trip_with_cache(norm_calls: list[int]) -> None:
    theirs, ours = pair("Linear", Variant(use_dora=True))
    x = make_input("Linear")
    assert _eval_same(theirs, ours, x)
    for layer in (theirs, ours):
        layer.merge()
    assert _eval_same(theirs, ours, x)
    for layer in (theirs, ours):
        layer.unmerge()
    assert _eval_same(theirs, ours, x)  # the base weight changed twice: norm recomputed
