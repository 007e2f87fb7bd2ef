"""Tiny llamas quantised by transformers' `BitsAndBytesConfig`, as QLoRA users load them.

The seeded fp32 tiny llama is saved once per session and loaded with each quantisation; the
quantiser is deterministic, so two loads give identical bases (one for peft, one for surgeon).
Hidden size 64: bitsandbytes' 4-bit blocks are 64 wide and its CPU kernel needs whole blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.models import CASES, tiny_llama

bnb = pytest.importorskip("bitsandbytes")

QUANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
FOUR_BIT = ("nf4", "fp4", "nf4-dq")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama-64")
    tiny_llama(hidden=64).save_pretrained(path)
    return str(path)


def load(path: str, quant: str, keep: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tiny llama at `path`, quantised as `QUANTS[quant]` says, on CPU, in eval mode.
    `keep`: bitsandbytes' CPU eval repacking off (`keep_trainable`), so a peft model and a
    surgeon one run the same 4-bit kernel whatever forwards came before."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM, logging

    logging.set_verbosity_error()
    compute = {} if dtype == torch.float32 else {"bnb_4bit_compute_dtype": dtype}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**QUANTS[quant], **compute),
            device_map="cpu", dtype=dtype)
    if keep:
        from surgeon.runtime.quantized import keep_trainable

        keep_trainable(model)
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    return CASES["llama"].inputs()


def logits(model: torch.nn.Module, **extra) -> torch.Tensor:
    """Eval logits without grad (with grad, bitsandbytes picks another CPU kernel per layer)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**inputs(), **extra).logits.clone()
