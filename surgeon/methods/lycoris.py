"""What LoHa and LoKr share: PEFT's LycorisConfig fields and their per-site hooks. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool, Int, Number
from surgeon.lang.values import Value
from surgeon.methods.base import PEFT_HEAD, PROBABILITY, Field, MethodConfig

FIELDS = (
    Field("r", Int(lo=1), 8, doc="rank of the factors"),
    Field("alpha", Number(positive=True), 8, doc="scaling numerator"),
    Field("rank_dropout", PROBABILITY, 0.0, doc="dropout over rank dimensions"),
    Field("module_dropout", PROBABILITY, 0.0, doc="probability of skipping the adapter"),
    Field("use_effective_conv2d", Bool(), False, doc="decompose conv kernels (CP)"),
)
PEFT_FIELDS = PEFT_HEAD + ("rank_pattern", "alpha_pattern", "r", "alpha", "rank_dropout",
                           "module_dropout", "use_effective_conv2d")
PEFT_TAIL = ("target_modules", "exclude_modules", "init_weights", "layers_to_transform",
             "layers_pattern", "modules_to_save")
RULES = frozenset({"target", "exclude", "rank", "alpha", "save"})
# What every LyCORIS layer reads from its Site (PEFT field names).
SITE_OPTIONS = ("rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
                "inference_mode")
# PEFT's LycorisTuner.layers_mapping: the only base classes LoHa and LoKr wrap.
KINDS = ("Linear", "Conv1d", "Conv2d")


def article(kind: str) -> str:
    """"an Embedding", "a Conv1D": for messages naming a layer kind."""
    return "an" if kind[0] in "AEIOU" else "a"


class LycorisConfig(MethodConfig):
    """LoHa's and LoKr's hooks: scaling alpha / r, and the base kinds PEFT wraps."""

    def scaling(self, alpha: float, r: int, options: Mapping[str, Value]) -> float:
        return alpha / r

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return (f"is {article(kind)} {kind}: PEFT's {self.peft_type} adapts only "
                    f"{', '.join(KINDS)} layers")
        return None
