"""What the language knows: methods and their options (from the method registry), module
types and rule keywords. Torch-free and peft-free (peft is only the test oracle:
tests/lang/test_vocabulary.py checks every name and default against peft's dataclasses).

Options are the scalar hyperparameters of a method; each method's folder defines them
(`surgeon.methods.<name>.config`), and this module only answers questions about them. What PEFT
spells as module-selection fields (target_modules, exclude_modules, layers_to_transform,
layers_pattern, rank_pattern, alpha_pattern, modules_to_save, feedforward_modules,
trainable_token_indices) are rules in the language (see RULE_FIELDS), except AdaLoRA's
rank_pattern, which is training state (a table).
"""

from __future__ import annotations

from surgeon import methods as registry
from surgeon.lang.spec import Option, Value
from surgeon.layer_kinds import ANY_MODULE_KINDS, KINDS
from surgeon.methods.base import Field

__all__ = [
    "MODULE_TYPES",
    "RULE_FIELDS",
    "RULE_KEYWORDS",
    "Field",
    "alias_of",
    "aliases",
    "canonical_order",
    "default_of",
    "field_of",
    "fields_of",
    "in_canonical_order",
    "methods",
    "methods_with",
    "required",
    "rules_of",
]


def methods() -> tuple[str, ...]:
    """Every method a spec may name (built-in and registered)."""
    return registry.names()


# Class names a bare capitalised word may name in a selector (matched by class or subclass).
MODULE_TYPES: tuple[str, ...] = (
    # adaptable by the methods (surgeon.layer_kinds.KINDS; "Norm" and "Module" name no class)
    # and their quantized / lazy forms
    *(k for k in KINDS if k not in ANY_MODULE_KINDS),
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

def rules_of(method: str) -> frozenset[str]:
    """The rule kinds `method` accepts (`target` and `exclude` are everywhere)."""
    return registry.config_of(method).rules


def required(method: str) -> tuple[str, ...]:
    """Options `method` cannot run without (PEFT raises when they are missing)."""
    return registry.config_of(method).required


def fields_of(method: str) -> tuple[Field, ...]:
    """The options of `method` in canonical order (the order the printer writes them)."""
    return registry.config_of(method).fields


def field_of(method: str, name: str) -> Field | None:
    """The option `name` of `method`, by PEFT field name or alias; None if it has none."""
    if method not in registry.names():
        return None
    return registry.config_of(method).field(name)


def default_of(method: str, field: str) -> Value:
    """PEFT's default for option `field` (PEFT name) of `method`, as a Spec value.

    Raises:
        KeyError: `method` has no option of that name.
    """
    return registry.config_of(method).default(field)


def canonical_order(method: str) -> tuple[str, ...]:
    """PEFT field names of `method`'s options in the order the printer writes them."""
    return tuple(f.name for f in fields_of(method))


def in_canonical_order(method: str, options: tuple[Option, ...]) -> tuple[Option, ...]:
    """`options` sorted into `method`'s canonical order, as the parser stores them (build Specs
    with this so they compare equal to parsed ones); unknown names go last, in their order."""
    rank = {name: i for i, name in enumerate(canonical_order(method))}
    return tuple(sorted(options, key=lambda o: rank.get(o.name, len(rank))))


def aliases(method: str) -> dict[str, str]:
    """`{alias: PEFT field name}` for `method` (e.g. `alpha` -> `lora_alpha` for lora)."""
    return {f.alias: f.name for f in fields_of(method) if f.alias}


def alias_of(method: str, field: str) -> str:
    """How the printer spells option `field`: its alias when it has one, else its name."""
    found = field_of(method, field)
    return found.alias if found is not None and found.alias else field


def methods_with(name: str) -> tuple[str, ...]:
    """The methods that have an option spelled `name` (name or alias)."""
    return tuple(m for m in methods() if field_of(m, name) is not None)
