"""`surgeon.prepare_kbit` against peft 0.21's `prepare_model_for_kbit_training` (the oracle).

On identical bf16 tiny llamas quantised to nf4 and int8: the same parameter dtypes (norms and
embeddings in fp32, 4-bit weights untouched), the same frozen parameters, gradient
checkpointing on, and the input embedding's output requiring grad. Then a LoRA on the prepared
model trains under reentrant checkpointing: every LoRA tensor gets a gradient.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import prepare_model_for_kbit_training

import surgeon
import surgeon.api as S
from tests.quantized.common import inputs, llama_dir, load  # noqa: F401


def _state(model):
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_prepare_kbit_is_peft_prepare(llama_dir, quant):
    theirs = prepare_model_for_kbit_training(load(llama_dir, quant, dtype=torch.bfloat16))
    ours = surgeon.prepare_kbit(load(llama_dir, quant, dtype=torch.bfloat16))
    assert _state(ours) == _state(theirs)
    assert ours.model.norm.weight.dtype == torch.float32
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    ids = inputs()["input_ids"]
    assert ours.get_input_embeddings()(ids).requires_grad
    assert theirs.get_input_embeddings()(ids).requires_grad

    model = S.apply("adapter default = lora(r=4, init=false) { target q_proj, v_proj }", ours)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**inputs()).logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)
