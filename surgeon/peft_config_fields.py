"""What a PEFT 0.21 adapter_config.json holds, field by field, and how the Spec spells each.

Every field of a method's config class (in `Config.to_dict()` order) is one of:

- an option: a method hyperparameter the language models (`surgeon.lang.vocabulary`);
- a selector: module selection, spelled as rules (`target`, `exclude`, `rank`, ... );
- bookkeeping: filled in by PEFT itself (`peft_type` is the method; the version is PEFT's);
- unsupported: a field the language does not model for this method (AdaLoRA's LoRA-only fields).
  Reading one with a non-default value is an error rather than a silent loss.

The field lists are PEFT facts; tests/test_peft_config_fields.py checks them against peft.
"""

from __future__ import annotations

import enum

from surgeon.lang import vocabulary
from surgeon.lang.spec import NO_SPAN, Span, Table, Value, to_python


class ConversionError(ValueError):
    """A PEFT config that has no Spec equivalent, or a Spec with no PEFT config equivalent."""


class NeedsModelError(ConversionError):
    """A selector whose modules only the model can tell (types, roles, `within`, ...).

    `str()` starts with the selector's `file:line:col` when it has a span.
    """

    def __init__(self, message: str, span: Span = NO_SPAN):
        self.message, self.span = message, span
        where = "" if span == NO_SPAN else f"{span.location()}: "
        super().__init__(f"{where}{message}")


PEFT_TYPES: dict[str, str] = {m: m.upper() for m in vocabulary.METHODS}
METHOD_OF_TYPE: dict[str, str] = {t: m for m, t in PEFT_TYPES.items()}

_HEAD = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
         "revision", "inference_mode")
_LORA = _HEAD + (
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core",
    "trainable_token_indices", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "use_dora", "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
    "monteclora_config", "layer_replication", "lora_bias", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config", "ensure_weight_tying",
)
_LYCORIS = _HEAD + ("rank_pattern", "alpha_pattern", "r", "alpha", "rank_dropout", "module_dropout",
                    "use_effective_conv2d")
_LYCORIS_TAIL = ("target_modules", "exclude_modules", "init_weights", "layers_to_transform",
                 "layers_pattern", "modules_to_save")

# Every field of each method's config class, in `to_dict()` order.
PEFT_FIELDS: dict[str, tuple[str, ...]] = {
    "lora": _LORA,
    "ia3": _HEAD + ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                    "modules_to_save", "init_ia3_weights"),
    "adalora": _LORA + ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                        "orth_reg_weight", "total_step"),
    "loha": _LYCORIS + _LYCORIS_TAIL,
    "lokr": _LYCORIS + ("decompose_both", "decompose_factor", "rank_dropout_scale") + _LYCORIS_TAIL,
}

# PEFT's defaults for the selection fields (what an adapter with no such rule writes).
SELECTOR_DEFAULTS: dict[str, object] = {
    "target_modules": None, "exclude_modules": None, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    "feedforward_modules": None, "trainable_token_indices": None,
}

# The selection fields each method spells as rules (AdaLoRA's rank_pattern is an option).
SELECTORS: dict[str, frozenset[str]] = {
    "lora": frozenset(SELECTOR_DEFAULTS) - {"feedforward_modules"},
    "ia3": frozenset({"target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"}),
    "adalora": frozenset({"target_modules", "exclude_modules", "layers_to_transform",
                          "layers_pattern", "modules_to_save"}),
    "loha": frozenset(SELECTOR_DEFAULTS) - {"feedforward_modules", "trainable_token_indices"},
    "lokr": frozenset(SELECTOR_DEFAULTS) - {"feedforward_modules", "trainable_token_indices"},
}

# Filled in by PEFT, never meaningful for what a checkpoint computes.
BOOKKEEPING = frozenset({"peft_type", "auto_mapping", "peft_version", "runtime_config"})
# Fields PEFT accepts but ignores for this method: dropped when read, defaults when written.
IGNORED: dict[str, frozenset[str]] = {"adalora": frozenset({"alpha_pattern"})}

# The per-module rank and alpha fields of the methods that have rank/alpha rules.
RANK_FIELD = "r"
ALPHA_FIELD: dict[str, str] = {"lora": "lora_alpha", "loha": "alpha", "lokr": "alpha"}


def role_of(method: str, name: str) -> str:
    """`option`, `selector`, `bookkeeping`, `ignored` or `unsupported` (see the module doc)."""
    if name in BOOKKEEPING:
        return "bookkeeping"
    if name in SELECTORS[method]:
        return "selector"
    if _is_option(method, name):
        return "option"
    return "ignored" if name in IGNORED.get(method, ()) else "unsupported"


def _is_option(method: str, name: str) -> bool:
    found = vocabulary.field_of(method, name)
    return found is not None and found.name == name


def default_of(method: str, name: str):
    """PEFT's default for field `name` of `method`, as plain JSON-able Python."""
    if name == "peft_type":
        return PEFT_TYPES[method]
    if name in BOOKKEEPING:
        return None
    if name in SELECTOR_DEFAULTS and not _is_option(method, name):
        return _copy(SELECTOR_DEFAULTS[name])
    for owner in (method, "lora"):  # AdaLoRA's unsupported fields are LoRA options
        if _is_option(owner, name):
            return to_python(vocabulary.default_of(owner, name))
    raise KeyError(f"{method} has no field {name!r}")


def _copy(value):
    return dict(value) if isinstance(value, dict) else value


def spec_value(value) -> Value:
    """A JSON value (or what `to_dict()` holds: enums, sets, tuples) as a Spec value."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, dict):
        return Table(tuple((str(k), spec_value(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return tuple(spec_value(v) for v in sorted(value, key=repr))
    if isinstance(value, (list, tuple)):
        return tuple(spec_value(v) for v in value)
    return value


def same_value(a: Value, b: Value) -> bool:
    """Spec-value equality that tells `true` from `1` (PEFT's init fields take both kinds)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b or (_number(a) and _number(b) and a == b)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
