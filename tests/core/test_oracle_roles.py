"""Role selectors against PEFT's name tables: `@attn.q, @attn.v` adapts what PEFT's q/v names do.

Surgeon applies the role spec (roles come from the dataflow graph, never from names), saves,
and PEFT loads the checkpoint: the adapted modules equal those of PEFT's own q/v config, and
the outputs equal surgeon's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from peft import LoraConfig, PeftModel, get_peft_model

import surgeon.api as S
from tests.core.test_oracle import ATOL, max_diff, output, peft_targets, quiet, randomize, surgeon_targets
from tests.models import HF_CASES, ModelCase

ROLE_SPEC = "adapter default = lora(r=4, alpha=8) { target @attn.q, @attn.v }"


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: c.name)
def test_roles_select_peft_qv(case: ModelCase, tmp_path: Path):
    ctx = quiet()
    try:
        base = case.build()
        ours = S.apply(ROLE_SPEC, copy.deepcopy(base))
        randomize(ours)
        names = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=list(case.qv)))
        assert surgeon_targets(ours) == peft_targets(names)

        S.save_pretrained(ours, tmp_path)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert peft_targets(back) == peft_targets(names)
        assert max_diff(output(case, back), output(case, ours)) <= ATOL
    finally:
        ctx.__exit__(None, None, None)
