"""DeLoRA as the language and PEFT's DeloraConfig (0.21) know it. Torch-free.

`rank` rules are PEFT's rank_pattern. `lambda_pattern` (per-module initial `delora_lambda`) is an
option holding PEFT's table as it is: the layer part resolves it per module path with PEFT's
`get_pattern_key` rule, so it round-trips unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool, Dict, Enum, Int, Number
from surgeon.lang.values import Table, Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig


class DeloraConfig(MethodConfig):
    """DeLoRA's hooks: Linear only (PEFT's `_create_new_module`)."""

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind != "Linear":
            return f"is a {kind}: PEFT's DeLoRA adapts only Linear layers"
        return None


CONFIG = DeloraConfig(
    name="delora",
    peft_type="DELORA",
    fields=(
        Field("r", Int(lo=1), 8, doc="rank of the update"),
        Field("delora_lambda", Number(), 15, alias="lambda", doc="initial bound on the update's norm"),
        Field("module_dropout", PROBABILITY, 0.0, doc="dropout on the adapter input"),
        Field("bias", Enum(("none", "all", "delora_only")), "none", doc="which biases train"),
        Field("init_weights", Bool(), True, alias="init", doc="B zero: start as a no-op"),
        Field("lambda_pattern", Dict(Number()), Table(()), doc="initial lambda per module pattern"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "delora_lambda", "module_dropout", "target_modules",
                             "exclude_modules", "bias", "init_weights", "layers_to_transform",
                             "layers_pattern", "rank_pattern", "lambda_pattern", "modules_to_save"),
    rules=frozenset({"target", "exclude", "rank", "save"}),
    runtime="surgeon.methods.delora.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's DeLoRA table is a copy of its LoRA table
    rank_field="r",
    alpha_field="delora_lambda",  # no `alpha` rule: lambda_pattern is an option (module docstring)
    site_options=("bias", "delora_lambda", "inference_mode", "init_weights", "lambda_pattern",
                  "module_dropout"),
    summary=("r", "delora_lambda"),
)
