"""VeRA as the language and PEFT's VeraConfig (0.21) know it. Torch-free.

VeRA trains two vectors per layer (`vera_lambda_d`, `vera_lambda_b`) around one pair of random
projections shared by every adapted layer of the model (`vera_A`, `vera_B`, drawn from
`projection_prng_key`). The shared pair is named in `shared_keys`: the checkpoint holds it once,
as PEFT's `base_model.vera_A` / `base_model.vera_B`, and only when `save_projection` is true.
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool, Enum, Int, Number
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig

# The base kinds PEFT's VeraModel wraps (`_get_tuner_layer_class`).
KINDS = ("Linear", "Conv1D")


class VeraConfig(MethodConfig):
    """VeRA's hooks: fan_in_fan_out forced per kind, the kinds PEFT adapts."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        # PEFT forces it (with a warning): True exactly for transformers' Conv1D
        return dict(options, fan_in_fan_out=kind == "Conv1D")

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is a {kind}: PEFT's VERA adapts only Linear and Conv1D layers"
        return None


CONFIG = VeraConfig(
    name="vera",
    peft_type="VERA",
    fields=(
        Field("r", Int(lo=1), 256, doc="rank of the shared projections"),
        Field("projection_prng_key", Int(lo=0), 0, doc="seed of the shared projections"),
        Field("save_projection", Bool(), True, doc="store the shared projections in the checkpoint"),
        Field("vera_dropout", PROBABILITY, 0.0, alias="dropout", doc="dropout on the input"),
        Field("d_initial", Number(), 0.1, doc="initial value of lambda_d"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
        Field("bias", Enum(("none", "all", "vera_only")), "none", doc="which biases train"),
        Field("init_weights", Bool(), True, alias="init", doc="lambda_b zero, lambda_d d_initial"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "target_modules", "projection_prng_key", "save_projection",
                             "vera_dropout", "d_initial", "fan_in_fan_out", "bias",
                             "modules_to_save", "init_weights", "layers_to_transform",
                             "layers_pattern"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.vera.layer:METHOD",
    # PEFT's VeRA table is its LoRA table (phi aside): query and value projections
    default_targets=("attn.q", "attn.v"),
    rank_field="r",
    site_options=("bias", "d_initial", "fan_in_fan_out", "inference_mode", "init_weights",
                  "projection_prng_key", "save_projection", "vera_dropout"),
    summary=("r",),
    shared_keys=("vera_A", "vera_B"),
)
