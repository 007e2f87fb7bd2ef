"""LoRA, rsLoRA and DoRA as the language and PEFT's LoraConfig (0.21) know them. Torch-free.

Fields, defaults and aliases are PEFT's (tests/lang/test_vocabulary.py checks them against
peft's dataclasses). Classic placement is Hu et al.'s query and value projections, by role.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Dict, Enum, Int, List, Number, Str
from surgeon.lang.values import Table, Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig, Problem

INIT_LORA = Enum(
    ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga"),
    bools=True,
    patterns=(r"pissa_niter_\d+",),
)
TABLE = Dict()

# The LoRA options AdaLoRA shares.
CORE_FIELDS = (
    Field("r", Int(lo=1), 8, doc="rank of the update"),
    Field("lora_alpha", Number(positive=True), 8, alias="alpha", doc="scaling numerator"),
    Field("lora_dropout", PROBABILITY, 0.0, alias="dropout", doc="dropout on the adapter input"),
    Field("bias", Enum(("none", "all", "lora_only")), "none", doc="which biases train"),
    Field("use_rslora", Bool(), False, alias="rslora", doc="scale by alpha/sqrt(r), not alpha/r"),
    Field("use_dora", Bool(), False, alias="dora", doc="weight-decomposed LoRA (DoRA)"),
    Field("init_lora_weights", INIT_LORA, True, alias="init", doc="initialisation scheme"),
    Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
)

FIELDS = CORE_FIELDS + (
    Field("lora_bias", Bool(), False, doc="also train a bias on lora_B"),
    Field("use_qalora", Bool(), False, doc="QA-LoRA pooling of the input"),
    Field("qalora_group_size", Int(lo=1), 16, doc="QA-LoRA pooling group size"),
    Field("layer_replication", List(List(Int(lo=0), length=2)), None, doc="[start, end) ranges to stack"),
    Field("alora_invocation_tokens", List(Int(lo=0)), None, doc="aLoRA activation token ids"),
    Field("target_parameters", List(Str()), None, doc="nn.Parameter names to adapt (MoE experts)"),
    Field("ensure_weight_tying", Bool(), False, doc="keep tied embeddings tied"),
    Field("megatron_config", TABLE, None, doc="Megatron TransformerConfig arguments"),
    Field("megatron_core", Str(), "megatron.core", doc="Megatron core module"),
    Field("loftq_config", TABLE, Table(()), doc="LoftQ settings (with init=loftq)"),
    Field("eva_config", TABLE, None, doc="EVA settings (with init=eva)"),
    Field("corda_config", TABLE, None, doc="CorDA settings (with init=corda)"),
    Field("lora_ga_config", TABLE, None, doc="LoRA-GA settings (with init=lora_ga)"),
    Field("velora_config", TABLE, None, doc="VeLoRA settings"),
    Field("kasa_config", TABLE, None, doc="KaSA settings"),
    Field("arrow_config", TABLE, None, doc="Arrow routing settings"),
    Field("monteclora_config", TABLE, None, doc="MonteCLoRA settings"),
    Field("use_bdlora", TABLE, None, doc="block-diagonal LoRA settings"),
)

# Every field of PEFT's LoraConfig, in `to_dict()` order.
PEFT_FIELDS = PEFT_HEAD + (
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core",
    "trainable_token_indices", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "use_dora", "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
    "monteclora_config", "layer_replication", "lora_bias", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config", "ensure_weight_tying",
)


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """PEFT's LoraLayer.scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraConfig(MethodConfig):
    """LoRA's hooks: rsLoRA scaling, fan_in_fan_out forced per kind, PEFT's config checks."""

    def scaling(self, alpha: float, r: int, options: Mapping[str, Value]) -> float:
        return lora_scaling(alpha, r, bool(options.get("use_rslora")))

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        if kind in ("Linear", "Conv1D"):  # PEFT forces it: True for Conv1D, False for Linear
            options = dict(options, fan_in_fan_out=kind == "Conv1D")
        return options

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind == "Embedding" and options.get("lora_bias"):
            return "is an Embedding: lora_bias is not supported there"
        return None

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        init = values["init_lora_weights"]
        if values["lora_bias"] is True:
            if not isinstance(init, bool):
                yield Problem("lora_bias", f"lora_bias=true needs init_lora_weights true or false, not '{init}'")
            if values["use_dora"] is True:
                yield Problem("lora_bias", "lora_bias=true cannot be combined with DoRA (use_dora=true)")
        loftq = values["loftq_config"]
        if init == "loftq" and (not isinstance(loftq, Table) or not loftq.items):
            yield Problem("init_lora_weights", "init=loftq needs the option 'loftq_config'",
                          hint="for example loftq_config={loftq_bits: 4, loftq_iter: 1}", at="value")
        if values["use_dora"] is True and values["megatron_config"] is not None:
            yield Problem("use_dora", "DoRA does not support Megatron (megatron_config)")


CONFIG = LoraConfig(
    name="lora",
    peft_type="LORA",
    fields=FIELDS + COMMON_FIELDS,
    peft_fields=PEFT_FIELDS,
    rules=frozenset({"target", "exclude", "rank", "alpha", "save", "tokens"}),
    runtime="surgeon.methods.lora.layer:METHOD",
    default_targets=("attn.q", "attn.v"),
    rank_field="r",
    alpha_field="lora_alpha",
    site_options=("bias", "inference_mode", "init_lora_weights", "lora_bias", "lora_dropout",
                  "use_dora", "use_rslora"),
    unplanned=("layer_replication",),
    # PEFT variants layer.py does not build (each changes the forward or the parameters)
    unimplemented=("use_qalora", "alora_invocation_tokens", "megatron_config", "velora_config",
                   "kasa_config", "arrow_config", "monteclora_config", "use_bdlora"),
    summary=("r", "lora_alpha"),
    summary_flags=("use_dora", "use_rslora"),
    bare_keys=("lora_magnitude_vector",),
)
