"""MiSS (formerly Bone) as the language and PEFT's MissConfig (0.21) know it. Torch-free.

`init_weights` picks the variant, as in PEFT: true (the default, "balance": a zero `(r, out)`
block), false (the same block, Kaiming-uniform), "bat" (`out/r` blocks of `r x r` that also
multiply the weight: nonlinear across shards) or "mini" (an `(r, mini_r)` block tiled along the
outputs). The divisibility PEFT checks per layer (`r <= in`, bat's `r | in, out`, mini's
`mini_r | out`) needs the layer's sizes, so the runtime checks it when it adds the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Enum, Int
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig


class MissConfig(MethodConfig):
    """MiSS's hook: the kinds PEFT adapts."""

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind != "Linear":
            return f"is a {kind}: PEFT's MiSS adapts only Linear layers"
        return None


CONFIG = MissConfig(
    name="miss",
    peft_type="MISS",
    fields=(
        Field("r", Int(lo=1), 64, doc="block size along the input features"),
        Field("miss_dropout", PROBABILITY, 0.0, alias="dropout", doc="dropout on the input"),
        Field("mini_r", Int(lo=1), 1, doc="block width along the outputs (init=mini)"),
        Field("init_weights", Enum(("bat", "mini"), bools=True), True, alias="init",
              doc="variant: true (zero block), false (random), bat, mini"),
        Field("bias", Enum(("none", "all", "MiSS_only", "miss_only")), "none", doc="which biases train"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "miss_dropout", "mini_r", "target_modules", "exclude_modules",
                             "init_weights", "layers_to_transform", "layers_pattern", "bias",
                             "modules_to_save"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.miss.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's MiSS table is a copy of its LoRA table
    rank_field="r",
    site_options=("bias", "inference_mode", "init_weights", "mini_r", "miss_dropout"),
    summary=("r",),
)
