"""RoAd as the language and PEFT's RoadConfig (0.21) know it. Torch-free.

RoadConfig has no exclude_modules, layers_to_transform or rank/alpha patterns, so the method
takes only `target` and `save` rules (a layer restriction inside a target is written out as the
adapted paths, as for every method).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Enum, Int
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig, Problem

VARIANTS = ("road_1", "road_2", "road_4")


class RoadConfig(MethodConfig):
    """RoAd's hooks: Linear only (PEFT's dispatch_default), PEFT's group_size check."""

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind != "Linear":
            return f"is a {kind}: PEFT's RoAd adapts only Linear layers"
        return None

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        size = values["group_size"]
        if isinstance(size, int) and (size <= 0 or size % 2):
            yield Problem("group_size", f"group_size must be a positive even number, not {size}",
                          hint="element i of a group is paired with element i + group_size/2",
                          at="value")


CONFIG = RoadConfig(
    name="road",
    peft_type="ROAD",
    fields=(
        Field("variant", Enum(VARIANTS), "road_1", doc="angles and scales per pair (1), element (2) or 2x"),
        Field("group_size", Int(lo=1), 64, doc="channels per rotation group; out_features divisible by it"),
        Field("init_weights", Bool(), True, alias="init", doc="start as the identity rotation"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("variant", "group_size", "init_weights", "target_modules", "modules_to_save"),
    rules=frozenset({"target", "save"}),
    runtime="surgeon.methods.road.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's RoAd table is a copy of its LoRA table
    site_options=("group_size", "inference_mode", "init_weights", "variant"),
    summary=("variant", "group_size"),
)
