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
from surgeon.runtime import quantized
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
    theirs_q, ours_q = pm.base_model.model.model.layers[0].self_attn.q_proj, ours.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(ours_q.delta_weight("default"), theirs_q.get_delta_weight("default"))
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


@torch.no_grad()
def _math_delta(layer, weight: torch.Tensor) -> torch.Tensor:
    """peft's merge delta of q_proj, from the formulas: IA3 scales output rows; AdaLoRA adds
    `B @ (A * E) * scaling / (ranknum + 1e-5)`."""
    if "default" in layer._modules.get("ia3_l", {}):
        return weight * layer.ia3_l["default"].float().view(-1, 1) - weight
    a, b, e = (layer._modules[n]["default"].float() for n in ("lora_A", "lora_B", "lora_E"))
    return b @ (a * e) * layer.sites["default"].scaling / (layer.ranknum["default"].float() + 1e-5)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("spec", [
    "ia3(init=false) { target q_proj, v_proj, down_proj  feedforward down_proj }",
    "adalora(init_r=4, target_r=2, total_step=10, init=false) { target q_proj, v_proj }",
])
def test_methods_peft_cannot_merge_into_bnb_merge_within_the_quantiser_error(llama_dir, quant, spec):
    """peft 0.21's IA3 and AdaLoRA bnb layers have no merge; surgeon's fold is method-generic.
    Math: merged logits equal unmerged ones up to the quantiser's rounding, and unmerge
    (quantised once more) comes back as close."""
    torch.manual_seed(0)
    model = S.apply(f"adapter default = {spec}", load(llama_dir, quant, keep=True))
    with torch.no_grad():  # a small adapter, as after real training
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.05 * (p - 1))
            elif "lora_B" in name:
                p.mul_(0.05)
    unmerged = logits(model)
    layer = model.model.layers[0].self_attn.q_proj
    before = quantized.float_weight(layer.base_layer).float()
    delta = _math_delta(layer, before)
    target, delta_norm = before + delta, delta.norm()
    _quiet(S.merge, model)
    # the delta went in: what is left is the quantiser's rounding, well under the delta itself
    assert (quantized.float_weight(layer.base_layer) - target).norm() < 0.5 * delta_norm
    bound = 0.03 if quant == "int8" else 0.25
    assert ((logits(model) - unmerged).norm() / unmerged.norm()).item() < bound
    _quiet(S.unmerge, model)
    assert ((logits(model) - unmerged).norm() / unmerged.norm()).item() < bound
