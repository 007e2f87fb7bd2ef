"""SHiRA as the language and PEFT's ShiraConfig (0.21) know it. Torch-free.

PEFT picks each layer's trained entries with `mask_fn`, a Python callable: the config holds
`mask_type`, and only "random" (PEFT's `random_mask`, seeded by `random_seed`) names a function
PEFT itself provides. A custom `mask_fn` is code, not a value, so a spec cannot carry it:
`mask_type` accepts "random" alone, as PEFT's `Literal["random"]` annotation says. PEFT's
ShiraConfig has no exclude_modules / layers_to_transform fields, so only `target` and `save`
rules are accepted. SHiRA adapts torch Linear layers only, so `fan_in_fan_out` is always false
there (PEFT forces it, with a warning).
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool, Enum, Int
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig


class ShiraConfig(MethodConfig):
    """SHiRA's hooks: fan_in_fan_out forced false, Linear only."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        return dict(options, fan_in_fan_out=False)

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind != "Linear":
            return f"is a {kind}: PEFT's SHiRA adapts only Linear layers"
        return None


CONFIG = ShiraConfig(
    name="shira",
    peft_type="SHIRA",
    fields=(
        Field("r", Int(lo=1), 32, doc="r(in + out) trained entries per layer (LoRA's count)"),
        Field("mask_type", Enum(("random",)), "random",
              doc="which entries train: random (PEFT's random_mask; a custom mask_fn is code)"),
        Field("random_seed", Int(), None, alias="seed", doc="seed of the random mask"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out); false on Linear"),
        Field("init_weights", Bool(), True, alias="init", doc="zero entries (false: randn)"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "mask_type", "random_seed", "target_modules", "fan_in_fan_out",
                             "init_weights", "modules_to_save"),
    rules=frozenset({"target", "save"}),
    runtime="surgeon.methods.shira.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's SHiRA table is its LoRA table (phi aside)
    rank_field="r",
    site_options=("fan_in_fan_out", "inference_mode", "init_weights", "mask_type", "random_seed"),
    summary=("r",),
)
