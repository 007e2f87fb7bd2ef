"""Roles of a quantised llama equal those of its fp32 model (the capture's meta copy sees each
bitsandbytes layer as the Linear it quantises: `quantized.float_stand_ins`)."""

from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.capture.graph import meta_copy
from surgeon.runtime import quantized
from tests.models import tiny_llama
from tests.quantized.common import llama_dir, load  # noqa: F401


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_roles_of_a_quantised_llama_are_the_fp32_ones(llama_dir, quant):
    model = load(llama_dir, quant)
    copy = meta_copy(model)
    replaced = quantized.float_stand_ins(copy)
    assert replaced in (14, 0)  # 7 projections per block, two blocks (0 once meta_copy does it)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in copy.modules())
    assert all(p.device == torch.device("meta") for p in copy.parameters())
    assert surgeon.roles(copy) == surgeon.roles(tiny_llama(hidden=64))
