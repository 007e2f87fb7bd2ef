"""Where the kernels run (a GPU; here CPU through Triton's interpreter), the group's shared
shrink is the Triton shrink and each member's fused `lora_add` becomes a Triton expand-add;
outputs equal PEFT's on the same weights."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

import surgeon
import surgeon.fusion as F
from surgeon import kernels
from tests.fusion.test_runtime import TwoHeads

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from before triton loaded", allow_module_level=True)


def test_shared_shrink_and_expands_run_the_kernels_and_equal_peft(monkeypatch):
    from surgeon.kernels import lora

    counts: dict[str, int] = {}

    def counting(name: str, fn):
        def counted(*args):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args)
        return counted

    for name in ("shrink", "expand_add"):
        monkeypatch.setattr(lora, name, counting(name, getattr(lora, name)))
    base = TwoHeads()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b", "c"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    x = torch.randn(3, 8)
    with kernels.interpreted_on_cpu(), torch.no_grad():
        ours = surgeon.apply("adapter default = lora(r=2, alpha=4) { target a, b, c }", copy.deepcopy(base))
        ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
        surgeon.compile(ours, example_inputs=x)
        assert F.groups(ours) == [("a", "b")]
        got = ours(x)
    # a, b: one shared shrink and an expand each; c: lora_add (shrink + expand) on its own
    assert counts == {"shrink": 2, "expand_add": 3}
    with torch.no_grad():
        torch.testing.assert_close(got, pm(x), atol=1e-5, rtol=1e-5)
