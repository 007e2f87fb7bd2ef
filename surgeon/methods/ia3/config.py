"""IA3 as the language and PEFT's IA3Config (0.21) know it. Torch-free."""

from __future__ import annotations

from surgeon.lang.kinds import Bool
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig

CONFIG = MethodConfig(
    name="ia3",
    peft_type="IA3",
    fields=(
        Field("init_ia3_weights", Bool(), True, alias="init", doc="start the scales at one"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("target_modules", "exclude_modules", "feedforward_modules",
                             "fan_in_fan_out", "modules_to_save", "init_ia3_weights"),
    rules=frozenset({"target", "exclude", "save", "feedforward"}),
)
