"""RandLoRA as the language and PEFT's RandLoraConfig (0.21) know it. Torch-free.

RandLoRA trains two matrices per layer (`randlora_lambda` (r, n), `randlora_gamma` (n, min dim))
that scale `n = ceil(min dim / r)` random bases taken from ONE pair of random tensors shared by
every adapted layer of the model (`randlora_A`, `randlora_B`, drawn from `projection_prng_key`,
dense, `sparse` or `very_sparse`). PEFT's checkpoint holds the shared pair under every layer and
once more as `base_model.randlora_A` / `base_model.randlora_B` (its default state dict does not
deduplicate, unlike VeRA's): `layer.py`'s checkpoint codec writes that model-level copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Enum, Int, Number
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig, Problem

# The base kinds PEFT's RandLoraModel wraps (`_create_new_module`); its bitsandbytes layers are
# refused by the runtime (`layer.py`).
KINDS = ("Linear", "Conv1D")


class RandLoraConfig(MethodConfig):
    """RandLoRA's hooks: alpha / r scaling, fan_in_fan_out forced per kind, the kinds PEFT adapts."""

    def scaling(self, alpha: float, r: int, options: Mapping[str, Value]) -> float:
        return alpha / r  # PEFT's `randlora_alpha / r`

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        # PEFT forces it (with a warning): True exactly for transformers' Conv1D
        return dict(options, fan_in_fan_out=kind == "Conv1D")

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is a {kind}: PEFT's RANDLORA adapts only Linear and Conv1D layers"
        return None

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        if values.get("sparse") and values.get("very_sparse"):
            yield Problem("very_sparse", "`very_sparse` takes precedence: the bases are very sparse "
                          "and `sparse` has no effect (as in PEFT)", warning=True)


CONFIG = RandLoraConfig(
    name="randlora",
    peft_type="RANDLORA",
    fields=(
        Field("r", Int(lo=1), 32, doc="rank of each random basis (fewer trained parameters when larger)"),
        Field("projection_prng_key", Int(lo=0), 0, doc="seed of the shared random bases"),
        Field("save_projection", Bool(), True, doc="store the shared bases in the checkpoint"),
        Field("sparse", Bool(), False, doc="ternary sparse bases (-1, 0, 1 with 1/6, 2/3, 1/6)"),
        Field("very_sparse", Bool(), False, doc="ternary bases with 1/sqrt(D) non-zeros"),
        Field("randlora_dropout", PROBABILITY, 0.0, alias="dropout", doc="dropout on the input"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
        Field("randlora_alpha", Number(), 640, alias="alpha", doc="scaling numerator (scaling = alpha / r)"),
        Field("bias", Enum(("none", "all", "randlora_only")), "none", doc="which biases train"),
        Field("init_weights", Bool(), True, alias="init", doc="lambda zero: the adapter starts as identity"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "target_modules", "projection_prng_key", "save_projection", "sparse",
                             "very_sparse", "randlora_dropout", "fan_in_fan_out", "randlora_alpha",
                             "bias", "modules_to_save", "init_weights", "layers_to_transform",
                             "layers_pattern"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.randlora.layer:METHOD",
    # PEFT's RandLoRA table is a copy of its LoRA table: query and value projections
    default_targets=("attn.q", "attn.v"),
    rank_field="r",
    alpha_field="randlora_alpha",
    site_options=("bias", "fan_in_fan_out", "inference_mode", "init_weights", "projection_prng_key",
                  "randlora_dropout", "save_projection", "sparse", "very_sparse"),
    summary=("r", "randlora_alpha"),
    summary_flags=("sparse", "very_sparse"),
    checkpoint_codec="surgeon.methods.randlora.layer:CODEC",
)
