"""Training across an eval pass on a 4-bit base (beats peft 0.21, which silently stops training).

bitsandbytes 0.50 repacks a Linear4bit weight in place on its first no-grad eval forward on an
AVX512-BF16 CPU, into a layout whose matmul has no backward; `model.train()` keeps it. Here two
runs from the same start take the same SGD steps, one with an eval pass between them: every
LoRA tensor must get a non-zero gradient on every step, and both runs must end with the same
adapter weights (math: an eval pass changes nothing).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import surgeon.api as S
from surgeon.runtime import quantized
from tests.quantized.common import FOUR_BIT, inputs, llama_dir, load, logits  # noqa: F401

SPEC = "adapter default = lora(r=4, alpha=8, init=false) { target q_proj, v_proj }"


def _step(model, opt) -> dict[str, torch.Tensor]:
    """One SGD step on the summed logits; returns each LoRA tensor's gradient."""
    model.train()
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**inputs()).logits.float().pow(2).mean().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None)
             for n, p in model.named_parameters() if "lora_" in n}
    opt.step()
    return grads


def _run(path: str, quant: str, eval_between: bool, keep_first: bool = True):
    """Three SGD steps, optionally with a no-grad eval pass after the first. `keep_first`: as
    `apply` leaves the model (no repacking ever); else bitsandbytes' repacking is switched back
    on, so the eval pass repacks and `keep_trainable` must unpack."""
    base = load(path, quant)
    torch.manual_seed(0)  # the same adapter initialisation in both runs
    model = S.apply(SPEC, base)  # apply keeps every 4-bit layer trainable itself
    if not keep_first:  # a model whose eval pass repacks anyway (bitsandbytes' default)
        for _, m in quantized.quantized_modules(model):
            m.support_avx512bf16_for_cpu = True
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    grads = [_step(model, opt)]
    packed = False
    if eval_between:
        model.eval()
        logits(model)
        packed = any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                     for _, m in quantized.quantized_modules(model))
        quantized.keep_trainable(model)
    grads += [_step(model, opt), _step(model, opt)]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return grads, weights, packed


def _all_trained(grads) -> None:
    for step in grads:
        assert len(step) == 8
        for name, grad in step.items():
            assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("quant", FOUR_BIT)
def test_an_eval_pass_changes_nothing(llama_dir, quant):
    """With `keep_trainable` the eval pass never repacks: the same update, bit for bit."""
    grads, weights, packed = _run(llama_dir, quant, eval_between=True)
    assert not packed
    _all_trained(grads)
    ref_grads, ref_weights, _ = _run(llama_dir, quant, eval_between=False)
    for name, w in weights.items():
        torch.testing.assert_close(w, ref_weights[name], rtol=0, atol=0)


@pytest.mark.parametrize("quant", FOUR_BIT)
def test_training_resumes_after_a_repacking_eval_pass(llama_dir, quant):
    """Repacked by an eval pass first: unpacked, every tensor trains again (peft: 0 of 8); the
    update differs from the uninterrupted one only by the bf16 rounding of the block scales."""
    grads, weights, packed = _run(llama_dir, quant, eval_between=True, keep_first=False)
    if not packed:
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16): nothing to undo")
    _all_trained(grads)
    _, ref_weights, _ = _run(llama_dir, quant, eval_between=False)
    for name, w in weights.items():
        torch.testing.assert_close(w, ref_weights[name], rtol=0.02, atol=2e-4)


def _merged(path: str, eval_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(unmerged, merged) logits of a LoRA on nf4, merged with or without an eval pass first."""
    base = load(path, "nf4")
    torch.manual_seed(0)
    model = S.apply(SPEC, base)
    with torch.no_grad():  # a delta near the quantiser's step, as after real training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    unmerged = logits(model) if eval_first else None  # repacks every 4-bit weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S.merge(model)
    return unmerged, logits(model)


def test_merge_after_an_eval_pass_is_the_merge_without_it(llama_dir):
    """peft 0.21 dequantises the repacked weight as if unpacked (relative error ~0.7)."""
    unmerged, merged = _merged(llama_dir, eval_first=True)
    _, reference = _merged(llama_dir, eval_first=False)
    assert (merged - unmerged).norm() / unmerged.norm() < 0.15  # the quantiser's own error
    # the only difference: the block scales the eval pass rounded to bf16
    assert (merged - reference).norm() / reference.norm() < 0.01
