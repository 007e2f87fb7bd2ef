"""What a PEFT 0.21 adapter_config.json holds, field by field, and how the Spec spells each.

Every field of a method's config class (in `Config.to_dict()` order) is one of:

- an option: a method hyperparameter the language models (`surgeon.lang.vocabulary`);
- a selector: module selection, spelled as rules (`target`, `exclude`, `rank`, ... );
- bookkeeping: filled in by PEFT itself (`peft_type` is the method; the version is PEFT's);
- unsupported: a field the language does not model for this method (AdaLoRA's LoRA-only fields).
  Reading one with a non-default value is an error rather than a silent loss.

Each method's folder holds its PEFT facts (`MethodConfig.peft_fields`, `ignored`, `unmodeled`);
this module only classifies them. tests/peft_format/test_fields.py checks them against peft.
"""

from __future__ import annotations

import enum

from surgeon import methods as registry
from surgeon.errors import UserError
from surgeon.lang import vocabulary
from surgeon.lang.spec import NO_SPAN, Span, Table, Value, to_python
from surgeon.methods.base import BOOKKEEPING


class ConversionError(UserError, ValueError):
    """A PEFT config that has no Spec equivalent, or a Spec with no PEFT config equivalent."""


class NeedsModelError(ConversionError):
    """A selector whose modules only the model can tell (types, roles, `within`, ...).

    `str()` starts with the selector's `file:line:col` when it has a span.
    """

    def __init__(self, message: str, span: Span = NO_SPAN):
        self.message, self.span = message, span
        where = "" if span == NO_SPAN else f"{span.location()}: "
        super().__init__(f"{where}{message}")


# PEFT's defaults for the selection fields (what an adapter with no such rule writes).
SELECTOR_DEFAULTS: dict[str, object] = {
    "target_modules": None, "exclude_modules": None, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    "feedforward_modules": None, "trainable_token_indices": None,
}


# The PEFT release whose file format surgeon writes (peft_version in adapter_config.json).
PEFT_FORMAT_VERSION = "0.21.0"


def peft_fields(method: str) -> tuple[str, ...]:
    """Every field of `method`'s PEFT config class, in `to_dict()` order."""
    return registry.config_of(method).peft_fields


def peft_type(method: str) -> str:
    return registry.config_of(method).peft_type


def method_of_type(peft_type_: str) -> str:
    """The method whose PEFT peft_type is `peft_type_`.

    Raises:
        ConversionError: no method has it.
    """
    config = registry.by_peft_type(peft_type_)
    if config is None:
        known = ", ".join(registry.config_of(m).peft_type for m in registry.names())
        raise ConversionError(f"`peft_type` {peft_type_!r} is not supported (supported: {known})")
    return config.name


def selectors(method: str) -> frozenset[str]:
    """The PEFT selection fields `method` spells as rules: those of its config class whose rule
    the method accepts (AdaLoRA's rank_pattern is then an option, LoRA's a `rank` rule)."""
    config = registry.config_of(method)
    return frozenset(f for f in config.peft_fields
                     if f in vocabulary.RULE_FIELDS and vocabulary.RULE_FIELDS[f] in config.rules)


def role_of(method: str, name: str) -> str:
    """`option`, `selector`, `bookkeeping`, `ignored` or `unsupported` (see the module doc)."""
    if name in BOOKKEEPING:
        return "bookkeeping"
    if name in selectors(method):
        return "selector"
    if _is_option(method, name):
        return "option"
    return "ignored" if name in registry.config_of(method).ignored else "unsupported"


def _is_option(method: str, name: str) -> bool:
    found = vocabulary.field_of(method, name)
    return found is not None and found.name == name


def default_of(method: str, name: str):
    """PEFT's default for field `name` of `method`, as plain JSON-able Python."""
    config = registry.config_of(method)
    if name == "peft_type":
        return config.peft_type
    if name == "peft_version":  # PEFT's loaders read it (OFT's check_kwargs fails on null)
        return PEFT_FORMAT_VERSION
    if name in BOOKKEEPING:
        return None
    if name in SELECTOR_DEFAULTS and not _is_option(method, name):
        return _copy(SELECTOR_DEFAULTS[name])
    for field in config.fields + config.unmodeled:
        if field.name == name:
            return to_python(field.default)
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
