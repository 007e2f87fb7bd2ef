"""What a method is to the language, the planner and the PEFT format: `MethodConfig`.

Torch-free. A method's folder defines one `MethodConfig` (in `config.py`): its options with PEFT
names, defaults, aliases and value kinds; the rules it accepts; its classic placement by roles;
how its hyper-parameters become per-site values; its cross-field checks; PEFT's config fields
and quirks. The language's vocabulary, the planner, PEFT config conversion and the CLI read these
objects through the registry (`surgeon.methods`) and hold no per-method table of their own.

The runtime part (parameters per base layer kind, initialisation, emitted subgraph, merge delta)
lives beside it in `layer.py` and is named by `MethodConfig.runtime`, so the language never
imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from surgeon.lang.kinds import Bool, Enum, Kind, Number, Str
from surgeon.lang.values import Value

# Filled in by PEFT itself, never meaningful for what a checkpoint computes.
BOOKKEEPING = frozenset({"peft_type", "auto_mapping", "peft_version", "runtime_config"})
# The fields every PEFT config starts with, in `to_dict()` order.
PEFT_HEAD = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
             "revision", "inference_mode")


@dataclass(frozen=True, slots=True)
class Field:
    """One option: PEFT field name, accepted values, PEFT's default, short alias if any."""

    name: str
    kind: Kind
    default: Value
    alias: str | None = None
    doc: str = ""

    @property
    def nullable(self) -> bool:
        """Whether `null` is accepted (PEFT's Optional fields, default None)."""
        return self.default is None

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.nullable else f"must be {self.kind.describe()}, not null"
        return self.kind.problem(value)


@dataclass(frozen=True, slots=True)
class Problem:
    """A cross-field problem found by `MethodConfig.check`, located at option `field`.

    `at` says which part of the option the caret goes under: "option" (all of `k=v`), "key" or
    "value"; a field the spec does not state points at the adapter's method name.
    """

    field: str
    message: str
    hint: str | None = None
    warning: bool = False
    at: str = "option"


PROBABILITY = Number(lo=0.0, below=1.0)
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Fields every method has (PeftConfig), written last.
COMMON_FIELDS = (
    Field("task_type", Enum(TASK_TYPES), None, doc="the model head PEFT wraps (CAUSAL_LM, ...)"),
    Field("base_model_name_or_path", Str(), None, doc="the base model this adapter belongs to"),
    Field("revision", Str(), None, doc="the base model's revision"),
    Field("inference_mode", Bool(), False, doc="load frozen, for inference only"),
)


@dataclass(frozen=True)
class MethodConfig:
    """Everything about one method that needs no torch. Subclass it to override the hooks
    (`scaling`, `site_options_for`, `site_problem`, `check`); the fields are plain data.

    Attributes:
        name: the registry key, PEFT's peft_type lower-cased ("lora").
        peft_type: PEFT's peft_type ("LORA").
        fields: the options in canonical (printing) order, COMMON_FIELDS last.
        peft_fields: every field of PEFT's config class, in `to_dict()` order.
        rules: the rule kinds the method accepts ("target", "exclude", "rank", ...).
        runtime: "module:attribute" of the layer part; None while the method is parsed and
            converted but not applied.
        default_targets: the roles of the classic placement, used when no target rule is given.
        rank_field / alpha_field: the options that `rank` / `alpha` rules override per site.
        site_options: options copied into every Site (what the layer part reads).
        required: options the method cannot run without.
        unplanned: options that change what is adapted in ways a Site cannot say yet: refused.
        unimplemented: options that select a PEFT variant the runtime does not implement (KaSA,
            VeLoRA, ...): parsed and converted, but refused by the planner at their span when
            set, because building the plain method instead would silently compute other outputs.
        ignored: PEFT fields PEFT accepts but ignores for this method (dropped when read).
        unmodeled: PEFT fields the language does not model, with PEFT's defaults (written as
            those defaults; reading another value is an error, never a silent loss).
        summary: options a one-line summary shows (`lora r=16 alpha=32`), by PEFT name.
        summary_flags: boolean options the summary names when true (`dora`).
        rule_hints: (rule kind, hint) for a rule the method refuses, when a hint helps.
        bare_keys: containers whose `<name>.<adapter>.weight` PEFT saves as `<name>` alone
            (DoRA's magnitude vector), a quirk of PEFT's checkpoint keys.
        flag_rules: (rule kind, site option, default roles): a rule of that kind (its class
            name lower-cased) marks the targeted sites it selects with the option true, every
            other site false (IA3's `feedforward` rule -> `is_feedforward`), so the planner
            needs no per-method case; with the classic placement (no target rule) the default
            roles select them instead.
        shared_keys: containers holding one tensor per adapter for the whole model (VeRA's
            projections), which every adapted layer references; the checkpoint holds each once
            as PEFT's `base_model.<name>` (see `surgeon.runtime.method`'s shared containers).
        checkpoint_codec: "module:attribute" of an object re-encoding the method's checkpoint
            tensors where PEFT's keys or values are not the state_dict's (VB-LoRA's top-k
            logits): `encode(tensors, config) -> tensors` on save (PEFT keys, the adapter's
            config dict), `decode(tensors, model_state, adapter) -> tensors` on load, which
            must return tensors it does not recognise unchanged (every codec sees every load).
        whole_modules: the method adapts any module as a whole (LN tuning's per-adapter copies):
            its sites' kinds are `surgeon.layer_kinds.whole_kind_of`'s ("Norm" or "Module").
        default_names: (model_type, names) pairs: PEFT's per-architecture classic placement by
            module names, for methods whose placement no role names (LN tuning's norms); with
            no target rule, a model whose `config.model_type` is listed gets those names.
    """

    name: str
    peft_type: str
    fields: tuple[Field, ...]
    peft_fields: tuple[str, ...]
    rules: frozenset[str]
    runtime: str | None = None
    default_targets: tuple[str, ...] = ()
    rank_field: str | None = None
    alpha_field: str | None = None
    site_options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    unplanned: tuple[str, ...] = ()
    unimplemented: tuple[str, ...] = ()
    ignored: frozenset[str] = frozenset()
    unmodeled: tuple[Field, ...] = ()
    summary: tuple[str, ...] = ()
    summary_flags: tuple[str, ...] = ()
    rule_hints: tuple[tuple[str, str], ...] = ()
    bare_keys: tuple[str, ...] = ()
    flag_rules: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    shared_keys: tuple[str, ...] = ()
    checkpoint_codec: str | None = None
    whole_modules: bool = False
    default_names: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def field(self, name: str) -> Field | None:
        """The option `name` (PEFT field name or alias), or None."""
        for f in self.fields:
            if name == f.name or name == f.alias:
                return f
        return None

    def default(self, name: str) -> Value:
        """PEFT's default for option `name` (PEFT field name).

        Raises:
            KeyError: the method has no option of that name.
        """
        for f in self.fields:
            if f.name == name:
                return f.default
        raise KeyError(f"{self.name} has no option {name!r}")

    # ----------------------------------------------------------------- hooks, per method

    def scaling(self, alpha: float, r: int, options: Mapping[str, Value]) -> float:
        """The factor the method multiplies its delta by at a site with this rank and alpha."""
        return 1.0

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        """The options a Site on a `kind` base layer carries (PEFT forces some per kind)."""
        return options

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        """Why this method cannot adapt a `kind` layer with these options (None: it can)."""
        return None

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        """Cross-field rules PEFT enforces at config time. `values` holds every option (stated
        or default), `stated` the names the spec gives."""
        return ()
