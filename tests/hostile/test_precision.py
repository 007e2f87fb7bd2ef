"""Class 8: on fp16/bf16 bases, adapter weights are fp32 (PEFT's default autocast_adapter_dtype)
with PEFT's outputs, and merge/unmerge cycles give back the base weights bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import surgeon
from tests.hostile.common import net

peft = pytest.importorskip("peft")
HALF = [torch.float16, torch.bfloat16]


def _lora_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("options", ["", ", dora=true"])
def test_adapters_are_fp32_with_peft_outputs(tmp_path, dtype, options):
    base = net().to(dtype)
    ours = surgeon.apply(f"adapter default = lora(r=2, init=false{options}) {{ target head, "
                         "query_projection_matrix }", copy.deepcopy(base))
    assert _lora_dtypes(ours) == {torch.float32}
    surgeon.save_pretrained(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert _lora_dtypes(theirs) == {torch.float32}
    back = surgeon.load_adapter(copy.deepcopy(base), tmp_path)
    assert _lora_dtypes(back) == {torch.float32}
    x = torch.randn(3, 8).to(dtype)
    with torch.no_grad():
        a, b, c = ours(x), theirs(x), back(x)
    assert a.dtype == b.dtype == dtype
    ulp = 2 * torch.finfo(dtype).eps * b.float().abs().max().item()  # DoRA rounds its norm once more
    assert (a.float() - b.float()).abs().max().item() <= (0 if not options else ulp)
    assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", HALF)
def test_merge_unmerge_cycles_do_not_drift(dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64)).to(dtype)
    model = surgeon.apply('adapter default = lora(r=4, init=false) { target "0" }', copy.deepcopy(base))
    x = torch.randn(2, 64).to(dtype)
    with torch.no_grad():
        before = model(x)
        for _ in range(20):
            surgeon.merge(model)
            surgeon.unmerge(model)
        after = model(x)
    weight = dict(model.named_modules())["0"].base_layer.weight
    assert torch.equal(weight, base[0].weight)
    assert torch.equal(after, before)


def test_merge_and_unload_keeps_no_copy():
    from surgeon.api import _EXACT

    model = surgeon.apply("adapter default = lora(r=2, init=false) { target head }", net().half())
    layer = dict(model.named_modules())["head"]
    surgeon.merge_and_unload(model)
    assert layer not in _EXACT
    surgeon.apply("adapter default = lora(r=2, init=false) { target head }", model)
    surgeon.merge(model)
    assert dict(model.named_modules())["head"] in _EXACT  # kept only for an unmerge to come
