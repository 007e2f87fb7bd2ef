"""peft 0.21 is the oracle on bitsandbytes bases: checkpoints cross both ways with equal outputs.

For each method peft adapts on a quantised layer (its layer-kind table: LoRA, rsLoRA, IA3 and
AdaLoRA have bnb layers; LoHa and LoKr take a Linear8bitLt as a plain Linear) and each
quantisation (nf4, fp4, nf4 + double quant, int8): peft's checkpoint on the same quantised base
loads into surgeon with the same logits, and surgeon's loads into peft with the same logits.
Adapter weights are random (init off). Both bases run the same bitsandbytes kernels (`keep`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel,
                  get_peft_model)

import surgeon.api as S
from tests.quantized.common import FOUR_BIT, llama_dir, load, logits  # noqa: F401

QV = ["q_proj", "v_proj"]
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=QV + ["down_proj"],
                               init_lora_weights=False),
    "rslora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_rslora=True,
                                 init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=QV + ["down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, target_modules=QV, total_step=10,
                                     init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=QV, init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=QV, init_weights=False),
}
CASES = [(m, q) for m in CONFIGS for q in FOUR_BIT + ("int8",)
         if not (m in ("loha", "lokr") and q in FOUR_BIT)]


def _peft_model(path: str, quant: str, method: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(load(path, quant, keep=True), CONFIGS[method]()).eval()


@pytest.mark.parametrize(("method", "quant"), CASES)
def test_checkpoints_cross_both_ways(llama_dir, tmp_path, method, quant):
    pm = _peft_model(llama_dir, quant, method)
    expected = logits(pm)
    with pm.disable_adapter():
        assert (expected - logits(pm)).abs().max() > 1e-3  # the adapters change the output
    pm.save_pretrained(tmp_path / "peft")

    ours = load(llama_dir, quant, keep=True)
    S.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)

    S.save_pretrained(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(load(llama_dir, quant, keep=True), tmp_path / "ours")
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=1e-5)
