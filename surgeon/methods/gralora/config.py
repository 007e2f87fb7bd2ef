"""GraLoRA as the language and PEFT's GraloraConfig (0.21) know it. Torch-free.

GraLoRA splits a layer's input and output features into `gralora_k` blocks each and gives every
(output block, input block) pair its own rank-`r / k` product, with the parameter count of a
rank-`r` LoRA; `hybrid_r > 0` adds a plain rank-`hybrid_r` LoRA beside it. The scaling is
`alpha / (r + hybrid_r)`. PEFT's config has no `exclude_modules` and no rank or alpha pattern,
so the method takes `target` and `save` rules only; its classic placement is PEFT's LoRA table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Enum, Int, Number
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig, Problem

# The base kinds PEFT's GraloraModel wraps (`_create_new_module`).
KINDS = ("Linear", "Conv1D")


class GraloraConfig(MethodConfig):
    """GraLoRA's hooks: scaling, fan_in_fan_out forced per kind, kinds, PEFT's config checks."""

    def scaling(self, alpha: float, r: int, options: Mapping[str, Value]) -> float:
        return alpha / (r + int(options.get("hybrid_r") or 0))

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        # PEFT forces it (with a warning): True exactly for transformers' Conv1D
        return dict(options, fan_in_fan_out=kind == "Conv1D")

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is {'an' if kind[0] in 'AEIOU' else 'a'} {kind}: PEFT's GRALORA adapts only " \
                   "Linear and Conv1D layers"
        return None

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        k, r = values["gralora_k"], values["r"]
        if k > 0 and r % k:
            field = "r" if "r" in stated or "gralora_k" not in stated else "gralora_k"
            yield Problem(field, f"r should be divisible by gralora_k, but got {r} and {k}",
                          hint="each of the k x k sub-blocks has rank r / gralora_k")


CONFIG = GraloraConfig(
    name="gralora",
    peft_type="GRALORA",
    fields=(
        Field("r", Int(lo=1), 32, doc="GraLoRA rank (each sub-block has r / gralora_k)"),
        Field("hybrid_r", Int(lo=0), 0, doc="rank of the plain LoRA part (hybrid GraLoRA)"),
        Field("alpha", Number(), 64, doc="scaling numerator: alpha / (r + hybrid_r)"),
        Field("gralora_dropout", PROBABILITY, 0.0, alias="dropout", doc="dropout on the input"),
        Field("gralora_k", Int(lo=1), 2, doc="sub-blocks per side (k x k blocks)"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
        Field("bias", Enum(("none", "all", "gralora_only")), "none", doc="which biases train"),
        Field("init_weights", Bool(), True, alias="init", doc="B zero: a no-op at start"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "hybrid_r", "target_modules", "alpha", "gralora_dropout",
                             "gralora_k", "fan_in_fan_out", "bias", "modules_to_save",
                             "init_weights", "layers_to_transform", "layers_pattern"),
    rules=frozenset({"target", "save"}),
    runtime="surgeon.methods.gralora.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's GraLoRA table is a copy of its LoRA table
    rank_field="r",
    alpha_field="alpha",
    site_options=("bias", "fan_in_fan_out", "gralora_dropout", "gralora_k", "hybrid_r",
                  "inference_mode", "init_weights"),
    summary=("r", "gralora_k", "hybrid_r", "alpha"),
)
