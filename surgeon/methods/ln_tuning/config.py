"""LN tuning as the language and PEFT's LNTuningConfig (0.21) know it. Torch-free.

PEFT's config has no hyper-parameter: an adapter is a deep copy of every targeted module, which
trains instead of it. PEFT accepts any module (norms, but also llava's `lm_head` or a whole
projector), so the method adapts modules whole (`whole_modules`: kinds "Norm" and "Module").
Its classic placement is PEFT's per-architecture table of module names
(TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING): no role names a norm.
"""

from __future__ import annotations

from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, MethodConfig

_LLAMA = ("input_layernorm", "post_attention_layernorm", "norm")
_GEMMA2 = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
           "post_feedforward_layernorm", "norm")
# PEFT 0.21's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING, model_type -> names.
DEFAULT_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llama", _LLAMA),
    ("bloom", ("input_layernorm", "post_attention_layernorm", "ln_f")),
    ("llava", ("multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm",
               "embed_tokens", "lm_head")),
    ("t5", ("layer_norm", "final_layer_norm")),
    ("mt5", ("layer_norm", "final_layer_norm")),
    ("bart", ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")),
    ("gpt2", ("ln_1", "ln_2", "ln_f")),
    ("blip-2", ("layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm")),
    ("gptj", ("ln_1", "ln_f")),
    ("falcon", ("input_layernorm", "post_attention_layernorm", "ln_f")),
    ("mistral", _LLAMA),
    ("phi", ("input_layernorm", "final_layernorm")),
    ("gemma", _LLAMA),
    ("gemma2", _GEMMA2),
    ("gemma3_text", _GEMMA2),
    ("qwen2", ("post_attention_layernorm",)),
    ("qwen3", ("post_attention_layernorm",)),
)

CONFIG = MethodConfig(
    name="ln_tuning",
    peft_type="LN_TUNING",
    fields=COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("target_modules", "exclude_modules", "modules_to_save"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.ln_tuning.layer:METHOD",
    site_options=("inference_mode",),
    whole_modules=True,
    default_names=DEFAULT_NAMES,
)
