"""What LoHa and LoKr share: PEFT's LycorisConfig fields. Torch-free."""

from __future__ import annotations

from surgeon.lang.kinds import Bool, Int, Number
from surgeon.methods.base import PEFT_HEAD, PROBABILITY, Field

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
