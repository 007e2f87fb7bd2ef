"""LoRA merges written in place (`surgeon.runtime.fold._low_rank`): which kernels run, and the
merged weights against PEFT's merge (the oracle) to the bit where the rounding is the same."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.lowering.peft_oracle import Variant, pair

KINDS = ("Linear", "Conv1D", "Conv2d", "Embedding")
POWER_OF_TWO = Variant(r=2, alpha=4.0)  # scaling 2: exact, one addmm_
RSLORA = Variant(r=4, alpha=3.0, use_rslora=True)  # scaling 1.5: the delta rounded as PEFT's


class Ops(TorchDispatchMode):
    """The aten ops a block runs, by name (`addmm_`, `mm`, `copy_`...)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _merged(kind: str, variant: Variant, safe_merge: bool = False):
    theirs, ours = pair(kind, variant)
    original = ours.base_layer.weight.detach().clone()
    with Ops() as ops:
        ours.merge(safe_merge=safe_merge)
    theirs.merge()
    return theirs, ours, original, ops.names


@pytest.mark.parametrize("kind", KINDS)
def test_power_of_two_scaling_merges_with_one_addmm_into_the_weight(kind: str) -> None:
    theirs, ours, original, ops = _merged(kind, POWER_OF_TWO)
    assert ops.count("addmm_") == 1
    assert "copy_" not in ops and "mm" not in ops  # no delta built, no weight copied back
    # one rounding step of the merged weight (PEFT computes a conv kernel's delta with a conv,
    # whose summation order differs from a GEMM's)
    merged = theirs.base_layer.weight.detach()
    one_ulp = torch.finfo(merged.dtype).eps * merged.abs().max().item()
    assert (ours.base_layer.weight - merged).abs().max() <= one_ulp
    with Ops() as recorded:
        ours.unmerge()
    assert recorded.names.count("addmm_") == 1 and "copy_" not in recorded.names
    theirs.unmerge()  # round trips err by the rounding of the merged weight, on both sides
    peft_error = (theirs.base_layer.weight - original).abs().max()
    assert (ours.base_layer.weight - original).abs().max() <= peft_error + one_ulp


@pytest.mark.parametrize("kind", ("Linear", "Conv1D"))
def test_other_scalings_round_the_delta_as_peft(kind: str) -> None:
    theirs, ours, _, ops = _merged(kind, RSLORA)
    assert "addmm_" not in ops and "copy_" not in ops
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    theirs.unmerge()
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)


@pytest.mark.parametrize("variant", (POWER_OF_TWO, RSLORA))
def test_safe_merge_takes_the_general_path_to_the_same_weight(variant: Variant) -> None:
    _, fast, _, _ = _merged("Linear", variant)
    _, safe, _, ops = _merged("Linear", variant, safe_merge=True)
    assert "copy_" in ops  # checked for NaNs before anything is written
    merged = safe.base_layer.weight.detach()
    one_ulp = torch.finfo(merged.dtype).eps * merged.abs().max().item()
    assert (fast.base_layer.weight - safe.base_layer.weight).abs().max() <= one_ulp


def test_half_precision_weights_keep_the_fp32_general_path() -> None:
    _, ours = pair("Linear", POWER_OF_TWO, dtype=torch.bfloat16)
    with Ops() as recorded:
        ours.merge()
    # accumulated in fp32, rounded once, copied in
    assert "addmm_" not in recorded.names and "copy_" in recorded.names


def test_dora_keeps_the_general_path() -> None:
    _, _, _, ops = _merged("Linear", Variant(use_dora=True))
    assert "addmm_" not in ops and "copy_" in ops
