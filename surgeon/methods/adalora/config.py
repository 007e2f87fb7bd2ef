"""AdaLoRA as the language and PEFT's AdaLoraConfig (0.21) know it. Torch-free; the runtime is
`layer.py`, the rank allocator `allocator.py` and the orthogonality loss `regularizer.py`.

AdaLoRA's config class extends LoraConfig; the LoRA fields it does not use (DoRA, LoftQ, ...)
are unmodeled here: written as PEFT's defaults, refused when a config sets them. Its
`rank_pattern` is training state (the ranks kept after pruning), an option, not a rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Dict, Enum, Int, List, Number
from surgeon.lang.values import Table, Value
from surgeon.methods.base import COMMON_FIELDS, PROBABILITY, Field, MethodConfig, Problem
from surgeon.methods.lora.config import FIELDS as LORA_FIELDS
from surgeon.methods.lora.config import INIT_LORA
from surgeon.methods.lora.config import PEFT_FIELDS as LORA_PEFT_FIELDS
from surgeon.methods.lycoris import article

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
    """AdaLoRA's hooks: its scaling (alpha itself; the layer divides by the rank), PEFT's base
    kinds and fan_in_fan_out per kind, and its checks (a budgeting phase must exist, `r` is
    ignored)."""

    def scaling(self, alpha: float, r: int, options: Mapping[str, Value]) -> float:
        return alpha if alpha > 0 else float(r)  # PEFT's AdaLoraLayer.update_layer

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        if kind in ("Linear", "Conv1D"):  # PEFT forces it: True for Conv1D, False for Linear
            options = dict(options, fan_in_fan_out=kind == "Conv1D")
        if isinstance(options.get("rank_pattern"), Table):  # sites hold plain, JSON-able tuples
            options = dict(options, rank_pattern=options["rank_pattern"].items)
        return options

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is {article(kind)} {kind}: PEFT's ADALORA adapts only {', '.join(KINDS)} layers"
        return None

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
KINDS = ("Linear", "Conv1D", "Conv2d")  # PEFT's SVDLinear (Linear, Conv1D) and SVDConv2d
CONFIG = AdaLoraConfig(
    name="adalora",
    peft_type="ADALORA",
    fields=FIELDS + COMMON_FIELDS,
    peft_fields=LORA_PEFT_FIELDS + ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1",
                                    "beta2", "orth_reg_weight", "total_step"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.adalora.layer:METHOD",
    checkpoint_codec="surgeon.methods.adalora.layer:CODEC",
    # the planner's per-site rank and alpha: every module starts at init_r (rank rules are
    # refused; the saved rank_pattern resizes modules when a checkpoint is loaded)
    rank_field="init_r",
    alpha_field="lora_alpha",
    site_options=("lora_dropout", "init_lora_weights", "rank_pattern", "inference_mode"),
    required=("total_step",),
    ignored=frozenset({"alpha_pattern"}),
    unmodeled=tuple(f for f in LORA_FIELDS if f.name not in _OWN),
    summary=("init_r", "target_r", "lora_alpha"),
    rule_hints=(("rank", "adalora chooses ranks itself; saved ranks go in the option rank_pattern={...}"),),
)
