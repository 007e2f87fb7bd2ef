"""Merge into a bitsandbytes base: dequantise, fold, quantise again, as peft 0.21's bnb LoRA does.

The oracle is peft's `merge_adapter` / `unmerge_adapter` on the same quantised base with the same
checkpoint: equal logits after merge and after unmerge. The merged model is only as exact as the
quantiser (peft warns "may get different generations due to rounding errors"); the error against
the unmerged forward is measured and bounded, not hidden. Also refusals: what peft cannot build
on a quantised layer is refused before the model is touched.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import surgeon.api as S
from surgeon.errors import UserError
from surgeon.runtime.quantized import QuantizedBaseError
from tests.quantized.common import QUANTS, llama_dir, load, logits  # noqa: F401


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_merge_and_unmerge_match_peft(llama_dir, tmp_path, quant):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)
    pm = _quiet(get_peft_model, load(llama_dir, quant, keep=True), cfg).eval()
    with torch.no_grad():  # a delta near the quantiser's step, as after real training
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    unmerged = logits(pm)
    pm.save_pretrained(tmp_path)
    _quiet(pm.merge_adapter)
    peft_merged = logits(pm)

    ours = load(llama_dir, quant, keep=True)
    S.load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours), unmerged, rtol=0, atol=1e-5)
    _quiet(S.merge, ours)
    merged = logits(ours)
    torch.testing.assert_close(merged, peft_merged, rtol=0, atol=1e-5)
    # the error the quantiser adds against the unmerged forward (4-bit: a few percent)
    error = ((merged - unmerged).norm() / unmerged.norm()).item()
    print(f"{quant}: merged vs unmerged relative error {error:.4f}")
    assert error < (0.03 if quant == "int8" else 0.15), error

    _quiet(pm.unmerge_adapter)
    _quiet(S.unmerge, ours)
    torch.testing.assert_close(logits(ours), logits(pm), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("quant", "spec"), [
    ("nf4", "lora(r=4, dora=true) { target q_proj }"),
    ("int8", "lora(r=4, dora=true) { target q_proj }"),
    ("nf4", "loha(r=4) { target q_proj }"),
    ("fp4", "lokr(r=4) { target q_proj }"),
])
def test_what_peft_cannot_build_is_refused_before_any_change(llama_dir, quant, spec):
    model = load(llama_dir, quant)
    before = logits(model)
    with pytest.raises(QuantizedBaseError, match="bitsandbytes") as info:
        S.apply(f"adapter default = {spec}", model)
    assert isinstance(info.value, UserError)
    assert not any("lora_" in n or "hada_" in n or "lokr_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
