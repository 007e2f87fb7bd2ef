"""LoHa as the language and PEFT's LoHaConfig (0.21) know it. Torch-free."""

from __future__ import annotations

from surgeon.lang.kinds import Bool
from surgeon.methods import lycoris
from surgeon.methods.base import COMMON_FIELDS, Field

CONFIG = lycoris.LycorisConfig(
    name="loha",
    peft_type="LOHA",
    fields=lycoris.FIELDS + (Field("init_weights", Bool(), True, alias="init", doc="start as a no-op"),)
    + COMMON_FIELDS,
    peft_fields=lycoris.PEFT_FIELDS + lycoris.PEFT_TAIL,
    rules=lycoris.RULES,
    runtime="surgeon.methods.loha.layer:METHOD",
    rank_field="r",
    alpha_field="alpha",
    site_options=lycoris.SITE_OPTIONS,
    summary=("r", "alpha"),
)
