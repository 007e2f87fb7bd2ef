"""What the language knows: methods, their options (PEFT 0.21 field names and defaults),
aliases, module types and rule keywords. Torch-free and peft-free (peft is only the test oracle:
tests/lang/test_vocabulary.py checks every name and default here against peft's dataclasses).

Options are the scalar hyperparameters of a method. What PEFT spells as module-selection fields
(target_modules, exclude_modules, layers_to_transform, layers_pattern, rank_pattern,
alpha_pattern, modules_to_save, feedforward_modules, trainable_token_indices) are rules in the
language (see RULE_FIELDS), except AdaLoRA's rank_pattern, which is training state (a table).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.lang.kinds import Bool, Dict, Enum, Int, Kind, List, Number, Str
from surgeon.lang.spec import Option, Table, Value

METHODS: tuple[str, ...] = ("lora", "ia3", "adalora", "loha", "lokr")

# Class names a bare capitalised word may name in a selector (matched by class or subclass).
MODULE_TYPES: tuple[str, ...] = (
    # adaptable by the methods (site.BASE_KINDS) and their quantized / lazy forms
    "Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding",
    "LazyLinear", "NonDynamicallyQuantizableLinear", "Linear4bit", "Linear8bitLt",
    "MultiheadAttention", "Bilinear", "EmbeddingBag",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    # containers and other layers, useful in `except` and `save`-like selections
    "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "Dropout", "Identity", "Sequential", "ModuleList", "ModuleDict",
    "RNN", "LSTM", "GRU", "Transformer", "TransformerEncoderLayer", "TransformerDecoderLayer",
)

# Rule keywords, in the order the printer writes rule kinds' examples (rules keep file order).
RULE_KEYWORDS: tuple[str, ...] = ("target", "exclude", "rank", "alpha", "save", "feedforward", "tokens")

# PEFT config fields that the language spells as rules, and the rule that writes each.
RULE_FIELDS: dict[str, str] = {
    "target_modules": "target",
    "layers_to_transform": "target",  # from `in layers[...]`
    "layers_pattern": "target",  # from `layers[...] of "h"`
    "exclude_modules": "exclude",
    "rank_pattern": "rank",
    "alpha_pattern": "alpha",
    "modules_to_save": "save",
    "feedforward_modules": "feedforward",
    "trainable_token_indices": "tokens",
}

# Which rule kinds each method accepts (`target` and `exclude` are everywhere).
RULES_OF: dict[str, frozenset[str]] = {
    "lora": frozenset({"target", "exclude", "rank", "alpha", "save", "tokens"}),
    "ia3": frozenset({"target", "exclude", "save", "feedforward"}),
    "adalora": frozenset({"target", "exclude", "save"}),
    "loha": frozenset({"target", "exclude", "rank", "alpha", "save"}),
    "lokr": frozenset({"target", "exclude", "rank", "alpha", "save"}),
}

# Options a method cannot run without (PEFT raises when they are missing).
REQUIRED: dict[str, tuple[str, ...]] = {"adalora": ("total_step",)}


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


_PROB = Number(lo=0.0, below=1.0)
_TABLE = Dict()
_INIT_LORA = Enum(
    ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga"),
    bools=True,
    patterns=(r"pissa_niter_\d+",),
)
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Fields every method has (PeftConfig), written last.
_COMMON = (
    Field("task_type", Enum(_TASK_TYPES), None, doc="the model head PEFT wraps (CAUSAL_LM, ...)"),
    Field("base_model_name_or_path", Str(), None, doc="the base model this adapter belongs to"),
    Field("revision", Str(), None, doc="the base model's revision"),
    Field("inference_mode", Bool(), False, doc="load frozen, for inference only"),
)

_LORA_CORE = (
    Field("r", Int(lo=1), 8, doc="rank of the update"),
    Field("lora_alpha", Number(positive=True), 8, alias="alpha", doc="scaling numerator"),
    Field("lora_dropout", _PROB, 0.0, alias="dropout", doc="dropout on the adapter input"),
    Field("bias", Enum(("none", "all", "lora_only")), "none", doc="which biases train"),
    Field("use_rslora", Bool(), False, alias="rslora", doc="scale by alpha/sqrt(r), not alpha/r"),
    Field("use_dora", Bool(), False, alias="dora", doc="weight-decomposed LoRA (DoRA)"),
    Field("init_lora_weights", _INIT_LORA, True, alias="init", doc="initialisation scheme"),
    Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
)

_LORA = _LORA_CORE + (
    Field("lora_bias", Bool(), False, doc="also train a bias on lora_B"),
    Field("use_qalora", Bool(), False, doc="QA-LoRA pooling of the input"),
    Field("qalora_group_size", Int(lo=1), 16, doc="QA-LoRA pooling group size"),
    Field("layer_replication", List(List(Int(lo=0), length=2)), None, doc="[start, end) ranges to stack"),
    Field("alora_invocation_tokens", List(Int(lo=0)), None, doc="aLoRA activation token ids"),
    Field("target_parameters", List(Str()), None, doc="nn.Parameter names to adapt (MoE experts)"),
    Field("ensure_weight_tying", Bool(), False, doc="keep tied embeddings tied"),
    Field("megatron_config", _TABLE, None, doc="Megatron TransformerConfig arguments"),
    Field("megatron_core", Str(), "megatron.core", doc="Megatron core module"),
    Field("loftq_config", _TABLE, Table(()), doc="LoftQ settings (with init=loftq)"),
    Field("eva_config", _TABLE, None, doc="EVA settings (with init=eva)"),
    Field("corda_config", _TABLE, None, doc="CorDA settings (with init=corda)"),
    Field("lora_ga_config", _TABLE, None, doc="LoRA-GA settings (with init=lora_ga)"),
    Field("velora_config", _TABLE, None, doc="VeLoRA settings"),
    Field("kasa_config", _TABLE, None, doc="KaSA settings"),
    Field("arrow_config", _TABLE, None, doc="Arrow routing settings"),
    Field("monteclora_config", _TABLE, None, doc="MonteCLoRA settings"),
    Field("use_bdlora", _TABLE, None, doc="block-diagonal LoRA settings"),
)

_IA3 = (
    Field("init_ia3_weights", Bool(), True, alias="init", doc="start the scales at one"),
    Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
)

_ADALORA = (
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
    Field("lora_dropout", _PROB, 0.0, alias="dropout", doc="dropout on the adapter input"),
    Field("bias", Enum(("none", "all", "lora_only")), "none", doc="which biases train"),
    Field("init_lora_weights", _INIT_LORA, True, alias="init", doc="initialisation scheme"),
    Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
)

_LYCORIS = (
    Field("r", Int(lo=1), 8, doc="rank of the factors"),
    Field("alpha", Number(positive=True), 8, doc="scaling numerator"),
    Field("rank_dropout", _PROB, 0.0, doc="dropout over rank dimensions"),
    Field("module_dropout", _PROB, 0.0, doc="probability of skipping the adapter"),
    Field("use_effective_conv2d", Bool(), False, doc="decompose conv kernels (CP)"),
)

_LOHA = _LYCORIS + (Field("init_weights", Bool(), True, alias="init", doc="start as a no-op"),)

_LOKR = _LYCORIS + (
    Field("decompose_both", Bool(), False, doc="also factor the left Kronecker matrix"),
    Field("decompose_factor", Int(lo=-1), -1, doc="Kronecker split factor (-1: automatic)"),
    Field("rank_dropout_scale", Bool(), False, doc="rescale after rank dropout"),
    Field("init_weights", Enum(("lycoris",), bools=True), True, alias="init", doc="start as a no-op"),
)

_FIELDS: dict[str, tuple[Field, ...]] = {
    "lora": _LORA + _COMMON,
    "ia3": _IA3 + _COMMON,
    "adalora": _ADALORA + _COMMON,
    "loha": _LOHA + _COMMON,
    "lokr": _LOKR + _COMMON,
}

# PEFT fields of each config class that are neither options nor rules: bookkeeping PEFT fills
# in itself, runtime-only settings, or fields the method rejects (AdaLoRA's use_dora, loftq).
UNMODELED: dict[str, frozenset[str]] = {
    m: frozenset({"peft_type", "auto_mapping", "peft_version", "runtime_config"}) for m in METHODS
}
UNMODELED["adalora"] = UNMODELED["adalora"] | {
    f.name for f in _LORA if f.name not in {g.name for g in _ADALORA}
}


def fields_of(method: str) -> tuple[Field, ...]:
    """The options of `method` in canonical order (the order the printer writes them)."""
    return _FIELDS[method]


def field_of(method: str, name: str) -> Field | None:
    """The option `name` of `method`, by PEFT field name or alias; None if it has none."""
    for f in _FIELDS.get(method, ()):
        if name == f.name or name == f.alias:
            return f
    return None


def default_of(method: str, field: str) -> Value:
    """PEFT's default for option `field` (PEFT name) of `method`, as a Spec value.

    Raises:
        KeyError: `method` has no option of that name.
    """
    for f in _FIELDS[method]:
        if f.name == field:
            return f.default
    raise KeyError(f"{method} has no option {field!r}")


def canonical_order(method: str) -> tuple[str, ...]:
    """PEFT field names of `method`'s options in the order the printer writes them."""
    return tuple(f.name for f in _FIELDS[method])


def in_canonical_order(method: str, options: tuple[Option, ...]) -> tuple[Option, ...]:
    """`options` sorted into `method`'s canonical order, as the parser stores them (build Specs
    with this so they compare equal to parsed ones); unknown names go last, in their order."""
    rank = {name: i for i, name in enumerate(canonical_order(method))}
    return tuple(sorted(options, key=lambda o: rank.get(o.name, len(rank))))


def aliases(method: str) -> dict[str, str]:
    """`{alias: PEFT field name}` for `method` (e.g. `alpha` -> `lora_alpha` for lora)."""
    return {f.alias: f.name for f in _FIELDS[method] if f.alias}


def alias_of(method: str, field: str) -> str:
    """How the printer spells option `field`: its alias when it has one, else its name."""
    found = field_of(method, field)
    return found.alias if found is not None and found.alias else field


def methods_with(name: str) -> tuple[str, ...]:
    """The methods that have an option spelled `name` (name or alias)."""
    return tuple(m for m in METHODS if field_of(m, name) is not None)
