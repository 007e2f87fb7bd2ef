"""Spec -> canonical `.peft` text, so that `parse(print_spec(s)) == s`.

Canonical means: options in the method's canonical order under their short aliases, one rule
per line in the Spec's order, 4-space indentation (options one per line when the header
would pass 100 columns), names bare where the grammar reads them back
as the same atom (quoted otherwise), a blank line between adapters.
"""

from __future__ import annotations

import math
import re

from surgeon.lang import vocabulary as vocab
from surgeon.lang.check_selection import slice_text
from surgeon.lang.spec import (
    Adapter,
    AllLinear,
    Alpha,
    Atom,
    Exclude,
    Feedforward,
    Glob,
    Layers,
    ModuleType,
    Name,
    Param,
    Rank,
    Regex,
    RoleRef,
    Rule,
    Save,
    Selection,
    Spec,
    Table,
    Target,
    Tokens,
    Value,
)

_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# Words the grammar reads as keywords somewhere; a name spelled like one is always quoted.
RESERVED = frozenset(
    {"adapter", "true", "false", "null", "in", "within", "except", "on", "of", "layers", "param"}
    | set(vocab.RULE_KEYWORDS)
)
INDENT = "    "
MAX_WIDTH = 100


def print_spec(spec: Spec) -> str:
    """The canonical `.peft` text of `spec` (ends with a newline)."""
    return "\n".join(print_adapter(a) for a in spec.adapters)


def print_adapter(adapter: Adapter) -> str:
    ordered = vocab.in_canonical_order(adapter.method, adapter.options)
    options = [f"{vocab.alias_of(adapter.method, o.name)}={print_value(o.value)}" for o in ordered]
    head = f"adapter {_word(adapter.name)} = {adapter.method}({', '.join(options)}) {{"
    if len(head) > MAX_WIDTH:  # one option per line, so a diff shows which one changed
        lines = "".join(f"{INDENT}{o},\n" for o in options)
        head = f"adapter {_word(adapter.name)} = {adapter.method}(\n{lines}) {{"
    body = [INDENT + print_rule(r) for r in adapter.rules]
    return "\n".join([head, *body, "}"]) + "\n"


def print_rule(rule: Rule) -> str:
    if isinstance(rule, Target):
        return "target " + print_selection(rule.selection)
    if isinstance(rule, Exclude):
        return "exclude " + print_selection(rule.selection)
    if isinstance(rule, Feedforward):
        return "feedforward " + print_selection(rule.selection)
    if isinstance(rule, Rank):
        return f"rank {print_value(rule.value)} on {print_selection(rule.selection)}"
    if isinstance(rule, Alpha):
        return f"alpha {print_value(rule.value)} on {print_selection(rule.selection)}"
    if isinstance(rule, Save):
        return "save " + ", ".join(_word(n) for n in rule.names)
    if isinstance(rule, Tokens):
        module = "" if rule.module is None else _word(rule.module) + " "
        return f"tokens {module}[{', '.join(str(i) for i in rule.indices)}]"
    raise TypeError(f"not a rule: {rule!r}")


def print_selection(selection: Selection) -> str:
    """`A, B within path in layers[...] except C` (a bare `layers[...]` when there are no atoms)."""
    if selection.include:
        parts = [", ".join(print_atom(a) for a in selection.include)]
        if selection.within is not None:
            parts.append("within " + _word(selection.within))
        if selection.layers is not None:
            parts.append("in " + print_layers(selection.layers))
    else:
        parts = [print_layers(selection.layers)] if selection.layers is not None else []
        if selection.within is not None:
            parts.append("within " + _word(selection.within))
    if selection.exclude:
        parts.append("except " + ", ".join(print_atom(a) for a in selection.exclude))
    return " ".join(parts)


def print_layers(layers: Layers) -> str:
    items = ", ".join(str(i) if isinstance(i, int) else slice_text(i) for i in layers.items)
    text = f"layers[{items}]"
    return text + (" of " + ", ".join(_word(p) for p in layers.pattern) if layers.pattern else "")


def print_atom(atom: Atom) -> str:
    if isinstance(atom, RoleRef):
        return "@" + atom.role
    if isinstance(atom, AllLinear):
        return "all-linear"
    if isinstance(atom, ModuleType):
        return atom.name
    if isinstance(atom, Name):
        # a capitalised bare word without dots would read back as a module type
        as_type = atom.pattern[:1].isupper() and "." not in atom.pattern
        return _quote(atom.pattern) if as_type else _word(atom.pattern)
    if isinstance(atom, Glob):
        return _quote(atom.pattern)
    if isinstance(atom, Regex):
        return "/" + _slash(atom.pattern) + "/"
    if isinstance(atom, Param):
        return "param " + _word(atom.name)
    raise TypeError(f"not a selector atom: {atom!r}")


def print_value(value: Value) -> str:
    """A value as the grammar spells it: true/false/null, numbers, words, "strings", [..], {..}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no spelling in the language")
        return repr(value)
    if isinstance(value, str):
        return _word(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(print_value(v) for v in value) + "]"
    if isinstance(value, Table):
        return "{" + ", ".join(f"{_word(k)}: {print_value(v)}" for k, v in value.items) + "}"
    raise TypeError(f"not a spec value: {value!r}")


def _word(text: str) -> str:
    """`text` bare when it reads back as the same word, else as a string."""
    return text if _BARE.fullmatch(text) and text not in RESERVED else _quote(text)


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _slash(pattern: str) -> str:
    """Escapes each `/` that is not already escaped, so the regex literal ends where it should."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(pattern[i : i + 2])
            i += 2
            continue
        out.append("\\/" if pattern[i] == "/" else pattern[i])
        i += 1
    return "".join(out)
