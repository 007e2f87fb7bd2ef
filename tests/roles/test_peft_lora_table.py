"""@attn.q, @attn.v select exactly what PEFT's own LoRA table targets, architecture by architecture.

The oracle is PEFT: `get_peft_model(model, LoraConfig())` picks `target_modules` from its
per-architecture table. Where the table and the dataflow disagree, the case states the
difference explicitly (docs/roles.md explains each one) and checks that it is still there.
"""

from __future__ import annotations

import warnings

import pytest
from peft import LoraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TABLE
from torch import nn

from tests.roles.zoo import build, roles_of, select

AGREE = [
    "t5", "mt5", "bart", "gpt2", "bloom", "opt", "gptj", "gpt_neox", "gpt_neo", "bert", "roberta",
    "xlm-roberta", "electra", "deberta-v2", "deberta", "layoutlm", "llama", "gpt_bigcode", "mpt",
    "falcon", "codegen", "mistral", "stablelm", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
]


def peft_targets(arch: str, config: LoraConfig | None = None) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return set(get_peft_model(build(arch), config or LoraConfig()).targeted_module_names)


@pytest.mark.parametrize("arch", AGREE)
def test_q_v_roles_equal_peft_lora_table(arch: str) -> None:
    assert arch in LORA_TABLE
    assert select(roles_of(arch), "@attn.q", "@attn.v") == peft_targets(arch)


def test_blip2_language_model_q_v_equal_peft() -> None:
    # PEFT adapts only BLIP-2's language model; roles also find the vision tower's fused qkv
    # and the Q-Former's self- and cross-attention, so compare inside `language_model.` only.
    ours = select(roles_of("blip-2"), "@attn.q", "@attn.v")
    language = {p for p in ours if p.startswith("language_model.")}
    assert language == peft_targets("blip-2")
    assert ours - language  # the scope selector is what makes the difference


# ---- documented disagreements (docs/roles.md, "LoRA") -----------------------------------------

def test_phi_table_adds_the_mlp() -> None:
    # PEFT's phi entry is q_proj, v_proj, fc1, fc2: the MLP's up and down projections as well.
    roles = roles_of("phi")
    expected_difference = select(roles, "@mlp.up", "@mlp.down")
    assert expected_difference
    assert peft_targets("phi") == select(roles, "@attn.q", "@attn.v") | expected_difference


def test_mixtral_default_placement_fails_in_peft() -> None:
    # PEFT's default LoraConfig raises on mixtral (it looks for expert parameters); its table
    # entry passed explicitly selects exactly the query and value projections.
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    with pytest.raises(NoMatchingPeftModuleError):
        peft_targets("mixtral")
    explicit = LoraConfig(target_modules=LORA_TABLE["mixtral"])
    assert select(roles_of("mixtral"), "@attn.q", "@attn.v") == peft_targets("mixtral", explicit)


def test_rwkv_has_no_attention_roles() -> None:
    # RWKV mixes time with a recurrence, not softmax attention: no projection reaches a score
    # matmul, so @attn selects nothing. PEFT's table names key/value/receptance/output, which
    # hits every linear layer of every block.
    roles = roles_of("rwkv")
    assert select(roles, "@attn", "@xattn") == set()
    model = build("rwkv")
    in_blocks = {p for p, m in model.named_modules() if isinstance(m, nn.Linear) and ".blocks." in p}
    assert peft_targets("rwkv") == in_blocks
