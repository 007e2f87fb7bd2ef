"""HRA as the language and PEFT's HRAConfig (0.21) know it. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool, Enum, Int
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig


class HraConfig(MethodConfig):
    """HRA's hook: the kinds surgeon's runtime adapts."""

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind == "Conv2d":
            return "is a Conv2d: surgeon's HRA adapts only Linear layers so far (PEFT's also Conv2d)"
        if kind != "Linear":
            return f"is a {kind}: PEFT's HRA adapts only Linear and Conv2d layers"
        return None


CONFIG = HraConfig(
    name="hra",
    peft_type="HRA",
    fields=(
        Field("r", Int(lo=1), 8, doc="number of Householder reflections"),
        Field("apply_GS", Bool(), False, doc="orthogonalise the reflection vectors (Gram-Schmidt)"),
        Field("init_weights", Bool(), True, alias="init", doc="pairs of equal vectors: the identity"),
        Field("bias", Enum(("none", "all", "hra_only")), "none", doc="which biases train"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "apply_GS", "target_modules", "exclude_modules", "init_weights",
                             "layers_to_transform", "layers_pattern", "bias", "modules_to_save"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.hra.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's HRA table is its LoRA table
    rank_field="r",
    site_options=("apply_GS", "bias", "inference_mode", "init_weights"),
    summary=("r",),
    summary_flags=("apply_GS",),
)
