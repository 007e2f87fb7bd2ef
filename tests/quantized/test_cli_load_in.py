"""`surgeon apply --model DIR --load-in 4bit|8bit`: the model loads quantised, the checkpoint is
peft's on that quantised base; `--load-in` on a model transformers does not load is one clear line."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel

from tests.cli.runner import EXAMPLES, assert_user_error, surgeon
from tests.quantized.common import llama_dir, load, logits  # noqa: F401


@pytest.mark.parametrize(("flag", "quant"), [("4bit", "nf4"), ("8bit", "int8")])
def test_apply_on_a_quantised_model_writes_a_checkpoint_peft_loads(tmp_path, llama_dir, flag, quant):
    # by name: roles need a graph capture, which does not read quantised weights yet
    (tmp_path / "qv.peft").write_text("adapter default = lora(r=8, alpha=16) { target q_proj, v_proj }")
    result = surgeon("apply", "qv.peft", "--model", llama_dir, "--load-in", flag, "-o", "out",
                     cwd=tmp_path)
    assert result.rc == 0, result
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    base = load(llama_dir, quant, keep=True)
    expected = logits(base)  # B = 0 at init: the adapted model is the quantised base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, tmp_path / "out")
    names = {type(m).__module__ for n, m in pm.named_modules() if n.endswith("q_proj")}
    assert names == {"peft.tuners.lora.bnb"}  # peft built its bnb LoRA on the quantised layers
    torch.testing.assert_close(logits(pm), expected, rtol=0, atol=0)


def test_load_in_needs_a_model_transformers_loads(tmp_path):
    result = surgeon("apply", EXAMPLES / "lora_qv.peft", "--model", "tiny:llama", "--load-in", "4bit",
                     "-o", "out", cwd=tmp_path)
    assert_user_error(result, "--load-in", "tiny:llama")
