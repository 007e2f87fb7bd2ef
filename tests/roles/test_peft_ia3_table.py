"""IA3 placement by roles against PEFT's own IA3 tables.

The dataflow placement of IA3 is keys, values and the MLP's down projection (@attn.k, @attn.v,
@mlp.down), with @mlp.down as the feed-forward set. The oracle is PEFT's selection with a
default `IA3Config()`. Where PEFT's table places IA3 elsewhere, the case states the role
selectors that reproduce PEFT's choice exactly (docs/roles.md, "IA3", says why) and checks that
they differ from the dataflow placement, so a fixed table shows up here.
"""

from __future__ import annotations

import warnings

import pytest
from peft import IA3Config, get_peft_model

from tests.roles.zoo import build, roles_of, select

TARGET = ("@attn.k", "@attn.v", "@mlp.down")
FEEDFORWARD = ("@mlp.down",)

ARCHS = ["t5", "mt5", "gpt2", "bloom", "roberta", "opt", "gptj", "gpt_neox", "gpt_neo", "bart",
         "gpt_bigcode", "llama", "mistral", "mixtral", "bert", "deberta-v2", "deberta", "falcon",
         "phi", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"]

_QUERY_NOT_KEY = ("@attn.q", "@attn.v", "@mlp.down")
# `output.dense` is a suffix of the attention output `attention.output.dense` too.
_WITH_ATTN_OUTPUT = ("@attn.k", "@attn.v", "@mlp.down", "@attn.o")
# Documented disagreements: arch -> (target selectors, feed-forward selectors) that equal PEFT.
TABLE_SAYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mt5": (("@attn.k", "@attn.v", "@mlp.up"), ()),  # wi_1 (ungated half), and no feed-forward
    "opt": (("@attn.q", "@attn.k", "@mlp.down"), FEEDFORWARD),  # q_proj, k_proj: no value
    "gptj": (_QUERY_NOT_KEY, FEEDFORWARD),
    "gpt_neo": (_QUERY_NOT_KEY, FEEDFORWARD),
    "bart": (_QUERY_NOT_KEY, FEEDFORWARD),
    "phi": (_QUERY_NOT_KEY, FEEDFORWARD),
    "gemma": (_QUERY_NOT_KEY, FEEDFORWARD),
    "gemma2": (_QUERY_NOT_KEY, FEEDFORWARD),
    "gemma3_text": (_QUERY_NOT_KEY, FEEDFORWARD),
    "qwen2": (_QUERY_NOT_KEY, FEEDFORWARD),
    "qwen3": (_QUERY_NOT_KEY, FEEDFORWARD),
    "bert": (_WITH_ATTN_OUTPUT, ("@mlp.down", "@attn.o")),
    "roberta": (_WITH_ATTN_OUTPUT, ("@mlp.down", "@attn.o")),
    "deberta-v2": (_WITH_ATTN_OUTPUT, ("@mlp.down", "@attn.o")),
    "deberta": (_WITH_ATTN_OUTPUT, ("@mlp.down", "@attn.o")),
}


def peft_ia3(arch: str) -> tuple[set[str], set[str]]:
    """PEFT's IA3 targets and, among them, its feed-forward modules."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build(arch), IA3Config())
    feedforward = {p for p, m in model.base_model.model.named_modules()
                   if getattr(m, "is_feedforward", False)}
    return set(model.targeted_module_names), feedforward


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_placement(arch: str) -> None:
    roles = roles_of(arch)
    target, feedforward = peft_ia3(arch)
    table_target, table_feedforward = TABLE_SAYS.get(arch, (TARGET, FEEDFORWARD))
    assert select(roles, *table_target) == target
    assert select(roles, *table_feedforward) == feedforward
    if arch in TABLE_SAYS:  # the documented difference is real
        assert (select(roles, *TARGET), select(roles, *FEEDFORWARD)) != (target, feedforward)
