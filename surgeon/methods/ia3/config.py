"""IA3 as the language and PEFT's IA3Config (0.21) know it. Torch-free.

The `feedforward` rule marks sites whose input (not output) is scaled: the planner turns it into
the site option `is_feedforward` through `MethodConfig.flag_rules`, the runtime (`layer.py`)
reads that option, and the PEFT writer lists those sites as `feedforward_modules`.
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig

# The base kinds PEFT's IA3Model._create_new_module accepts.
KINDS = ("Linear", "Conv1D", "Conv2d", "Conv3d")


class Ia3Config(MethodConfig):
    """IA3's hooks: fan_in_fan_out forced per kind, the kinds PEFT adapts."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        if kind in ("Linear", "Conv1D"):  # PEFT forces it (with a warning): True only for Conv1D
            options = dict(options, fan_in_fan_out=kind == "Conv1D")
        return options

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is a {kind}: IA3 adapts only {', '.join(KINDS)} layers (as PEFT)"
        return None


CONFIG = Ia3Config(
    name="ia3",
    peft_type="IA3",
    fields=(
        Field("init_ia3_weights", Bool(), True, alias="init", doc="start the scales at one"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("target_modules", "exclude_modules", "feedforward_modules",
                             "fan_in_fan_out", "modules_to_save", "init_ia3_weights"),
    rules=frozenset({"target", "exclude", "save", "feedforward"}),
    runtime="surgeon.methods.ia3.layer:METHOD",
    site_options=("fan_in_fan_out", "inference_mode", "init_ia3_weights"),
    # the classic placement by roles (PEFT's per-architecture tables, found by dataflow;
    # tests/roles/test_peft_ia3_table.py compares them)
    default_targets=("attn.k", "attn.v", "mlp.down"),
    flag_rules=(("feedforward", "is_feedforward", ("mlp.down",)),),
)
