"""Several adapters on one layer: switching, disabling, deleting, merging, mixed batches vs PEFT."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.lowering.peft_oracle import (
    Variant,
    make_input,
    max_diff,
    two_adapters,
)

TOL = 1e-5
KINDS = ("Linear", "Conv1D", "Conv2d", "Embedding")


def same(theirs, ours, x, **kwargs) -> bool:
    with torch.no_grad():
        return max_diff(theirs(x, **kwargs), ours(x, **kwargs)) <= TOL


def grad_flags(layer) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in layer.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind", KINDS)
def test_switch_disable_delete(kind: str) -> None:
    theirs, ours = two_adapters(kind)
    x = make_input(kind)
    assert same(theirs, ours, x)
    assert grad_flags(ours) == grad_flags(theirs)
    for active in ("other", ["default", "other"], ["other", "default"]):
        theirs.set_adapter(active)
        ours.set_adapter(active)
        assert same(theirs, ours, x)
        assert grad_flags(ours) == grad_flags(theirs)
    theirs.enable_adapters(False)
    ours.enable_adapters(False)
    assert same(theirs, ours, x)
    with torch.no_grad():
        assert max_diff(ours(x), ours.base_layer(x)) == 0
    assert grad_flags(ours) == grad_flags(theirs)
    theirs.enable_adapters(True)
    ours.enable_adapters(True)
    assert same(theirs, ours, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.set_adapter("other")
        ours.set_adapter("other")
        theirs.delete_adapter("other")
        ours.delete_adapter("other")
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert same(theirs, ours, x)


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_disabled_context(kind: str) -> None:
    _, ours = two_adapters(kind)
    x = make_input(kind)
    with torch.no_grad():
        adapted = ours(x)
        with ours.adapters_disabled():
            assert max_diff(ours(x), ours.base_layer(x)) == 0
        assert max_diff(ours(x), adapted) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_adapter_batch(kind: str) -> None:
    theirs, ours = two_adapters(kind)
    x = make_input(kind, batch=5)
    names = ["default", "__base__", "other", "default", "unknown"]
    assert same(theirs, ours, x, adapter_names=names)
    ours.adapter_names = names  # what a model-level pre-hook sets for one call
    with torch.no_grad():
        via_attribute = ours(x)
        expected = theirs(x, adapter_names=names)
    ours.adapter_names = None
    assert max_diff(via_attribute, expected) <= TOL
    with torch.no_grad():  # rows that use one adapter equal that adapter's whole-batch output
        ours.set_adapter("other")
        assert max_diff(via_attribute[2], ours(x)[2]) <= TOL


def test_mixed_batch_errors_as_peft() -> None:
    theirs, ours = two_adapters("Linear", second=Variant(use_dora=True))
    x = make_input("Linear", batch=2)
    with pytest.raises(ValueError, match="DoRA"):
        ours(x, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        ours(x, adapter_names=["default"])
    ours.merge()
    with pytest.raises(ValueError, match="merged adapters"):
        ours(x, adapter_names=["default", "default"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dora", [False, True])
def test_merge_two_active_adapters(kind: str, dora: bool) -> None:
    """Sequential merges (DoRA's norm from the unmerged weight, as PEFT) and unmerge of both."""
    theirs, ours = two_adapters(kind, second=Variant(r=3, use_dora=dora),
                                first=Variant(use_dora=dora))
    x = make_input(kind)
    original = ours.base_layer.weight.detach().clone()
    theirs.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    assert same(theirs, ours, x)
    with torch.no_grad():
        unmerged = ours(x)
    theirs.merge()
    ours.merge()
    assert ours.merged_adapters == theirs.merged_adapters == ["default", "other"]
    assert same(theirs, ours, x)
    with torch.no_grad():
        assert max_diff(ours(x), unmerged) <= 1e-4
    theirs.unmerge()
    ours.unmerge()
    assert max_diff(ours.base_layer.weight, original) <= 1e-5
    assert same(theirs, ours, x)


def test_merge_selected_then_disable_unmerges() -> None:
    theirs, ours = two_adapters("Linear")
    x = make_input("Linear")
    original = ours.base_layer.weight.detach().clone()
    theirs.merge(adapter_names=["other"])
    ours.merge(adapter_names=["other"])
    assert same(theirs, ours, x)  # PEFT runs the merged base alone, ignoring `default`
    theirs.enable_adapters(False)
    ours.enable_adapters(False)
    assert same(theirs, ours, x)  # PEFT unmerges on the disabled forward; we at disable time
    assert not ours.merged
    assert max_diff(ours.base_layer.weight, original) <= 1e-6


def test_delete_merged_adapter_is_refused() -> None:
    _, ours = two_adapters("Linear")
    ours.merge()
    with pytest.raises(ValueError, match="unmerge first"):
        ours.delete_adapter("default")


def test_unload() -> None:
    _, ours = two_adapters("Linear")
    x = make_input("Linear")
    with torch.no_grad():
        expected = ours(x)
        base = ours.unload(merge=True)
        assert base is ours.base_layer
        assert max_diff(base(x), expected) <= TOL
