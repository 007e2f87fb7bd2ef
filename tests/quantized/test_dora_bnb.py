"""DoRA on bitsandbytes bases (Linear4bit nf4 / fp4 / double quant, Linear8bitLt), oracle peft 0.21.

peft's DoRA on a bnb layer takes the weight norm `||W + s*BA||` from the dequantised weight,
reuses the quantised base output without dropout and, with dropout, applies the dequantised
weight to the dropped input. Checked against peft on the same quantised base: checkpoints cross
both ways with equal logits (magnitudes moved off their init, so the DoRA rescale is live), one
training step with dropout gives equal losses and gradients (dropout masks drawn from the same
seed), and merge / unmerge (dequantise, fold, quantise again) give peft's logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import surgeon.api as S
from surgeon.methods.lora.dora import add_magnitude
from surgeon.methods.lora.layer import factors
from tests.quantized.common import QUANTS, inputs, llama_dir, load, logits  # noqa: F401

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _keep_scb(module: torch.nn.Module, args: tuple) -> None:
    if module.weight.CB is not None and module.weight.SCB is None:
        module.weight.SCB = module.state.SCB


def _repair_peft_int8(pm: torch.nn.Module) -> torch.nn.Module:
    """peft 0.21's DoRA forward on a CPU Linear8bitLt replaces the weight by `weight.to(cpu)`
    (`dequantize_module_weight`) after the base moved its scales into `state`: the new weight
    has `CB` but no `SCB`, and the next base forward fails (`col_stats` None). Give the new
    weight back the scales it had, so peft can run more than one forward; surgeon never
    replaces the weight in its forward."""
    for module in pm.modules():
        if type(module.__dict__.get("_parameters", {}).get("weight")).__name__ == "Int8Params":
            module.register_forward_pre_hook(_keep_scb)
    return pm


def _peft_dora(path: str, quant: str, dropout: float = 0.0, b_scale: float = 1.0):
    """peft DoRA with random A, B and magnitudes moved off `||W + s*BA||`."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                     lora_dropout=dropout, init_lora_weights=False)
    pm = _quiet(get_peft_model, load(path, quant, keep=True), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    return _repair_peft_int8(pm)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapter gradients by peft's parameter name (without the `base_model.model.` prefix)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            out[name.removeprefix("base_model.model.")] = p.grad
    return out


@pytest.mark.parametrize("quant", list(QUANTS))
def test_dora_checkpoints_cross_both_ways(llama_dir, tmp_path, quant):
    pm = _peft_dora(llama_dir, quant)
    expected = logits(pm)
    with torch.no_grad():  # the magnitudes matter: back at their init the output moves
        mags = [p for n, p in pm.named_parameters() if "lora_magnitude_vector" in n]
        saved = [m.clone() for m in mags]
        for m in mags:
            m.mul_(1.5)
        assert (logits(pm) - expected).abs().max() > 1e-3
        for m, s in zip(mags, saved):
            m.copy_(s)
    pm.save_pretrained(tmp_path / "peft")

    ours = load(llama_dir, quant, keep=True)
    S.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)

    S.save_pretrained(ours, tmp_path / "ours")
    back = _repair_peft_int8(_quiet(PeftModel.from_pretrained, load(llama_dir, quant, keep=True),
                                    tmp_path / "ours"))
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_dora_init_on_bnb_matches_peft(llama_dir, quant):
    """The magnitude surgeon initialises is peft's: the norm of the dequantised `W + s*BA`."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                     init_lora_weights=False)
    pm = _quiet(get_peft_model, load(llama_dir, quant, keep=True), cfg)
    ours = load(llama_dir, quant, keep=True)
    S.apply("adapter default = lora(r=4, alpha=8, dora=true, init=false) "
            "{ target q_proj, v_proj, down_proj }", ours)
    theirs = dict(pm.named_parameters())
    checked = 0
    for path, module in ours.named_modules():
        mags = getattr(module, "lora_magnitude_vector", None)
        if mags is None or "default" not in mags:
            continue
        with torch.no_grad():  # peft's A and B, then the magnitude as apply computes it
            for part in ("lora_A", "lora_B"):
                getattr(module, part)["default"].weight.copy_(
                    theirs[f"base_model.model.{path}.{part}.default.weight"])
        add_magnitude(module, "default", *factors(module, "default"))
        expected = theirs[f"base_model.model.{path}.lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(mags["default"].weight, expected, rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked == 3 * 2  # three targets in each of the two layers


@pytest.mark.parametrize("quant", list(QUANTS))
def test_dora_training_step_gradients_match_peft(llama_dir, tmp_path, quant):
    pm = _peft_dora(llama_dir, quant, dropout=0.1)
    pm.save_pretrained(tmp_path)
    ours = load(llama_dir, quant, keep=True)
    S.load_adapter(ours, tmp_path, is_trainable=True)
    batch = inputs()
    losses = []
    for model in (pm, ours):
        model.train()
        torch.manual_seed(7)  # the same dropout masks, drawn in the same layer order
        out = _quiet(model, **batch, labels=batch["input_ids"])
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    theirs, ours_g = _grads(pm), _grads(ours)
    assert set(ours_g) == set(theirs) and any("magnitude" in n for n in theirs)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours_g[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_dora_merge_and_unmerge_match_peft(llama_dir, tmp_path, quant):
    pm = _peft_dora(llama_dir, quant, b_scale=0.05)  # a delta near the quantiser's step
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
    error = ((merged - unmerged).norm() / unmerged.norm()).item()
    # the quantiser's error against the unmerged forward (peft's merged model has the same)
    assert error < {"int8": 0.03, "nf4": 0.15, "fp4": 0.2}[quant], error

    _quiet(pm.unmerge_adapter)
    _quiet(S.unmerge, ours)
    torch.testing.assert_close(logits(ours), logits(pm), rtol=0, atol=1e-5)
