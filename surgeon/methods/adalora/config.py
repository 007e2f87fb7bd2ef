"""AdaLoRA as the language and PEFT's AdaLoraConfig (0.21) know it. Torch-free.

AdaLoRA's config class extends LoraConfig; the LoRA fields it does not use (DoRA, LoftQ, ...)
are unmodeled here: written as PEFT's defaults, refused when a config sets them. Its
`rank_pattern` is training state (the ranks kept after pruning), an option, not a rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Dict, Enum, Int, List, Number
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PROBABILITY, Field, MethodConfig, Problem
from surgeon.methods.lora.config import FIELDS as LORA_FIELDS
from surgeon.methods.lora.config import INIT_LORA
from surgeon.methods.lora.config import PEFT_FIELDS as LORA_PEFT_FIELDS

FIELDS = (
    Field("init_r", Int(lo=1), 12, doc="rank each module starts with"),
    Field("target_r", Int(lo=1), 8, doc="average rank to prune down to"),
    Field("total_step", Int(lo=1), None, doc="training steps (required)"),
    Field("tinit", Int(lo=0), 0, doc="warm-up steps before pruning"),
    Field("tfinal", Int(lo=0), 0, doc="steps after pruning ends"),
    Field("deltaT", Int(lo=1), 1, doc="steps between two budget allocations"),
    Field("beta1", Number(lo=0.0, hi=1.0), 0.85, doc="EMA factor for sensitivity"),
    Field("beta2", Number(lo=0.0, hi=1.0), 0.85, doc="EMA factor for uncertainty"),
    Field("orth_reg_weight", Number(lo=0.0), 0.5, doc="orthogonal regularisation weight"),
    Field("rank_pattern", Dict(List(Bool())), None, doc="rank masks after pruning (training state)"),
    Field("r", Int(lo=1), 8, doc="ignored by AdaLoRA (use init_r / target_r)"),
    Field("lora_alpha", Number(positive=True), 8, alias="alpha", doc="scaling numerator"),
    Field("lora_dropout", PROBABILITY, 0.0, alias="dropout", doc="dropout on the adapter input"),
    Field("bias", Enum(("none", "all", "lora_only")), "none", doc="which biases train"),
    Field("init_lora_weights", INIT_LORA, True, alias="init", doc="initialisation scheme"),
    Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
)


class AdaLoraConfig(MethodConfig):
    """AdaLoRA's checks: a budgeting phase must exist, and `r` is ignored."""

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        total, tinit, tfinal = values["total_step"], values["tinit"], values["tfinal"]
        if isinstance(total, int) and tinit >= total - tfinal:
            where = next((f for f in ("tinit", "tfinal") if f in stated), "total_step")
            yield Problem(where, f"tinit={tinit} and tfinal={tfinal} leave no budgeting phase in "
                          f"total_step={total}",
                          hint="AdaLoRA prunes ranks between steps tinit and total_step - tfinal")
        if "r" in stated:
            yield Problem("r", "adalora ignores 'r'", hint="set the ranks with 'init_r' and 'target_r'",
                          warning=True, at="key")


_OWN = {f.name for f in FIELDS}
CONFIG = AdaLoraConfig(
    name="adalora",
    peft_type="ADALORA",
    fields=FIELDS + COMMON_FIELDS,
    peft_fields=LORA_PEFT_FIELDS + ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1",
                                    "beta2", "orth_reg_weight", "total_step"),
    rules=frozenset({"target", "exclude", "save"}),
    required=("total_step",),
    ignored=frozenset({"alpha_pattern"}),
    unmodeled=tuple(f for f in LORA_FIELDS if f.name not in _OWN),
    summary=("init_r", "target_r", "lora_alpha"),
    rule_hints=(("rank", "adalora chooses ranks itself; saved ranks go in the option rank_pattern={...}"),),
)
