"""LoKr as the language and PEFT's LoKrConfig (0.21) know it. Torch-free."""

from __future__ import annotations

from surgeon.lang.kinds import Bool, Enum, Int
from surgeon.methods import lycoris
from surgeon.methods.base import COMMON_FIELDS, Field

CONFIG = lycoris.LycorisConfig(
    name="lokr",
    peft_type="LOKR",
    fields=lycoris.FIELDS + (
        Field("decompose_both", Bool(), False, doc="also factor the left Kronecker matrix"),
        Field("decompose_factor", Int(lo=-1), -1, doc="Kronecker split factor (-1: automatic)"),
        Field("rank_dropout_scale", Bool(), False, doc="rescale after rank dropout"),
        Field("init_weights", Enum(("lycoris",), bools=True), True, alias="init", doc="start as a no-op"),
    ) + COMMON_FIELDS,
    peft_fields=lycoris.PEFT_FIELDS + ("decompose_both", "decompose_factor", "rank_dropout_scale")
    + lycoris.PEFT_TAIL,
    rules=lycoris.RULES,
    runtime="surgeon.methods.lokr.layer:METHOD",
    rank_field="r",
    alpha_field="alpha",
    site_options=lycoris.SITE_OPTIONS + ("decompose_both", "decompose_factor", "rank_dropout_scale"),
    summary=("r", "alpha"),
)
