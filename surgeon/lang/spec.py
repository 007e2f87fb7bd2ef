"""The checked Spec: what a `.peft` file says, as frozen dataclasses.

Torch-free. Every node keeps the `Span` it was parsed from, but spans never take part in
equality, so `parse(print(spec)) == spec` compares meaning, not layout.

Reading guide:
    Spec        -> adapters, in file order
    Adapter     -> name, method, options (PEFT field names), rules in file order
    Rule        -> Target | Exclude | Rank | Alpha | Save | Feedforward | Tokens
    Selection   -> a union of atoms, restricted (layers, within) and minus `except` atoms
    Atom        -> Name | Glob | Regex | ModuleType | RoleRef | AllLinear | Param

Precedence of `rank`/`alpha` rules (several may match one module): the *most specific* rule
wins, meaning the rule whose selection matches the fewest of the adapter's sites; among equally
specific rules the later one in the file wins. (PEFT's "first pattern key that matches" is
order-dependent in a way a reader cannot see; this rule is not.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from surgeon.lang.values import Table, Value, to_python  # noqa: F401 - part of the Spec model

# --------------------------------------------------------------------------- source spans


@dataclass(frozen=True, slots=True)
class Span:
    """Where a node came from: file name, 0-based offsets, 1-based line and column."""

    file: str
    start: int
    end: int
    line: int
    column: int

    def location(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


NO_SPAN = Span("<built>", 0, 0, 1, 1)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)  # type: ignore[return-value]


# --------------------------------------------------------------------------- selectors


@dataclass(frozen=True, slots=True)
class Name:
    """`q_proj`, `"mlp.fc1"`: PEFT's name match (the path ends with these whole dot segments)."""

    pattern: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Glob:
    """`"layers.*.q_proj"`: shell glob over dot segments (full path, or a suffix of segments)."""

    pattern: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Regex:
    """`/.*\\.q_proj/`: Python regex that must match the whole module path (PEFT's str form)."""

    pattern: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class ModuleType:
    """`Linear`, `Conv2d`, `Conv1D`, `Embedding`: modules of this class (or a subclass)."""

    name: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class RoleRef:
    """`@attn.q`: layers whose role inferred from the dataflow graph matches (see role_names)."""

    role: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class AllLinear:
    """`all-linear`: every Linear/Conv1D except the output head of a PreTrainedModel (as PEFT)."""

    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Param:
    """`param experts.gate_up_proj`: bare parameters, PEFT's target_parameters match (the
    parameter's path equals the name or ends with "." + it); LoRA adapts them (MoE experts)."""

    name: str
    span: Span = _span()


Atom = Union[Name, Glob, Regex, ModuleType, RoleRef, AllLinear, Param]


@dataclass(frozen=True, slots=True)
class LayerSlice:
    """`a:b:c` inside `layers[...]`, Python semantics, negative indices count from the end."""

    start: int | None
    stop: int | None
    step: int | None = None


@dataclass(frozen=True, slots=True)
class Layers:
    """`layers[0:4, 7, -1]` optionally `of "h"`: indices in the model's repeated-block stack.

    `pattern` is PEFT's layers_pattern (the stack's attribute name); empty means inferred
    from the model structure.
    """

    items: tuple[int | LayerSlice, ...]
    pattern: tuple[str, ...] = ()
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Selection:
    """`A, B within "lm" in layers[0:4] except C`: (union of include) ∩ restrictions − exclude."""

    include: tuple[Atom, ...]
    layers: Layers | None = None
    within: str | None = None  # module path whose subtree the selection is confined to
    exclude: tuple[Atom, ...] = ()
    span: Span = _span()


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Target:
    """`target SELECTION`: modules that receive the adapter (union over all target rules)."""

    selection: Selection
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Exclude:
    """`exclude SELECTION`: never adapt these, whatever a target says (PEFT exclude_modules)."""

    selection: Selection
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Rank:
    """`rank 64 on SELECTION`: per-module rank (PEFT rank_pattern). See precedence above."""

    value: int
    selection: Selection
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Alpha:
    """`alpha 8 on SELECTION`: per-module alpha (PEFT alpha_pattern). See precedence above."""

    value: float
    selection: Selection
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Save:
    """`save score, classifier`: train and save these modules whole (PEFT modules_to_save)."""

    names: tuple[str, ...]
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Feedforward:
    """`feedforward SELECTION` (IA3): these targets scale their input, not their output."""

    selection: Selection
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Tokens:
    """`tokens embed_tokens [0, 5, 9]`: train only these embedding rows (trainable_token_indices).

    `module` None means PEFT's default (the input embedding).
    """

    module: str | None
    indices: tuple[int, ...]
    span: Span = _span()


Rule = Union[Target, Exclude, Rank, Alpha, Save, Feedforward, Tokens]


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True, slots=True)
class Option:
    """A method hyperparameter, by its PEFT field name (`lora_alpha`, not the alias `alpha`)."""

    name: str
    value: Value
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Adapter:
    """`adapter NAME = METHOD(options) { rules }`.

    `options` holds only what the file states, in the method's canonical field order; defaults
    live in the method's folder (`surgeon.methods.<method>.config`), read them through `option()`.
    """

    name: str
    method: str  # PEFT's peft_type, lower-cased: "lora", "ia3", "adalora", "loha", "lokr"
    options: tuple[Option, ...] = ()
    rules: tuple[Rule, ...] = ()
    span: Span = _span()

    def stated(self, name: str) -> bool:
        return any(o.name == name for o in self.options)

    def option(self, name: str, missing=KeyError):
        """The stated value of PEFT field `name`, else the method's default; `missing` when the
        method has no such option (a KeyError unless given: generic code asking for a field
        only some methods have, such as `bias`, passes what absence means)."""
        for o in self.options:
            if o.name == name:
                return o.value
        from surgeon.methods import config_of  # the registry reads method folders on demand

        config = config_of(self.method)
        if missing is not KeyError and config.field(name) is None:
            return missing
        return config.default(name)

    def rules_of(self, kind: type) -> tuple:
        return tuple(r for r in self.rules if isinstance(r, kind))


@dataclass(frozen=True, slots=True)
class Spec:
    """A whole `.peft` file: its adapters in file order (the first is the default one)."""

    adapters: tuple[Adapter, ...]
    source: str = field(default="", compare=False, repr=False)  # the text, for diagnostics
    file: str = field(default="<spec>", compare=False, repr=False)

    def adapter(self, name: str) -> Adapter:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)
