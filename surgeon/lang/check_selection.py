"""Checks selectors: atoms (roles, module types, names, globs, regexes), clauses and layers.

Role names come from `surgeon.capture.names.selector_names()`; module types from
`vocabulary.MODULE_TYPES`. Layer ranges are checked for emptiness where that is decidable
without the model (both ends given with the same sign, or an empty prefix).
"""

from __future__ import annotations

import re

from surgeon.capture.names import selector_names
from surgeon.lang.diagnostics import Diagnostic, did_you_mean, error
from surgeon.lang.spec import (
    Atom,
    Glob,
    Layers,
    LayerSlice,
    ModuleType,
    Name,
    Param,
    Regex,
    RoleRef,
    Selection,
)

# Rules whose selection may name bare parameters (`param ...`; LoRA's target_parameters).
PARAM_RULES = ("target", "rank", "alpha")
from surgeon.lang.syntax import Located, RawClause, RawLayers, RawSelection
from surgeon.lang.vocabulary import MODULE_TYPES

_HALF_OPEN = "slices are half-open as in Python: 'a:b' selects layers a, a+1, ..., b-1"


def check_selection(raw: RawSelection, kind: str, diags: list[Diagnostic]) -> Selection:
    """The Selection of one rule of kind `kind`; problems go to `diags`."""
    for atom in raw.include:
        check_atom(atom, diags)
        if isinstance(atom, Param) and kind not in PARAM_RULES:
            diags.append(error(atom.span, f"a '{kind}' rule selects modules, not parameters",
                               hint="`param` names parameters for target, rank and alpha rules"))
    if raw.layers is not None and kind in ("target", "feedforward"):
        diags.append(error(
            raw.layers.span, f"a '{kind}' rule must name modules, not only layers",
            hint=f"name the modules and restrict them: {kind} q_proj, v_proj in layers[0:4]",
        ))
    layers = check_layers(raw.layers, diags) if raw.layers is not None else None
    within: str | None = None
    exclude: tuple[Atom, ...] = ()
    seen: dict[str, RawClause] = {}
    for clause in raw.clauses:
        first = seen[clause.kind].span if clause.kind in seen else None
        if clause.kind == "in" and raw.layers is not None:
            first = raw.layers.span
        if first is not None:
            diags.append(error(
                clause.span, f"this selection already has {_describe(clause.kind)}",
                notes=[(first, "first given here")],
            ))
            continue
        seen[clause.kind] = clause
        if clause.kind == "in":
            layers = check_layers(clause.value, diags)
        elif clause.kind == "within":
            within = check_name(clause.value, diags, what="module path")
        else:
            exclude = clause.value
            for atom in exclude:
                check_atom(atom, diags)
                if isinstance(atom, Param):
                    diags.append(error(atom.span, "`except` removes modules; `param` cannot be used there",
                                       hint="list only the parameters you want"))
    return Selection(raw.include, layers, within, exclude, raw.span)


def _describe(kind: str) -> str:
    return {"in": "a layer restriction", "within": "a 'within' scope", "except": "an 'except' list"}[kind]


def check_atom(atom: Atom, diags: list[Diagnostic]) -> None:
    """Reports an atom whose vocabulary or pattern is wrong."""
    if isinstance(atom, RoleRef) and atom.role not in selector_names():
        choices = ["@" + r for r in selector_names()]
        diags.append(error(
            atom.span, f"unknown role '@{atom.role}'",
            hint=did_you_mean("@" + atom.role, choices) or "roles are " + ", ".join(choices),
        ))
    elif isinstance(atom, ModuleType) and atom.name not in MODULE_TYPES:
        diags.append(error(
            atom.span, f"unknown module type '{atom.name}'",
            hint=did_you_mean(atom.name, MODULE_TYPES)
            or f'a capitalised word names a module class; to match a module named {atom.name}, write "{atom.name}"',
        ))
    elif isinstance(atom, Name):
        check_name(Located(atom.pattern, atom.span), diags, what="module name")
    elif isinstance(atom, Glob) and not atom.pattern.strip():
        diags.append(error(atom.span, "this pattern is empty"))
    elif isinstance(atom, Regex):
        _check_regex(atom, diags)
    elif isinstance(atom, Param):
        check_name(Located(atom.name, atom.span), diags, what="parameter name")


# A layer stack name (PEFT's layers_pattern): PEFT builds a regex around it, so only plain
# names are accepted; a backtracking pattern there would hang every plan.
STACK_NAME = re.compile(r"[\w\-.]+")


def check_name(name: Located[str], diags: list[Diagnostic], what: str) -> str:
    """A module name or dotted path: non-empty, no empty dot segments, no whitespace."""
    text = name.value
    if not text:
        diags.append(error(name.span, f"this {what} is empty"))
    elif any(not part for part in text.split(".")):
        diags.append(error(name.span, f"the {what} '{text}' has an empty dot segment"))
    elif any(c.isspace() for c in text):
        diags.append(error(name.span, f"the {what} {text!r} contains whitespace"))
    return text


def _check_regex(atom: Regex, diags: list[Diagnostic]) -> None:
    try:
        re.compile(atom.pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        detail = e.msg if isinstance(e, re.error) else str(e) or type(e).__name__
        diags.append(error(atom.span, f"invalid regular expression: {detail}"))


def check_layers(raw: RawLayers, diags: list[Diagnostic]) -> Layers:
    """The Layers of `layers[...] of ...`; empty ranges and zero steps go to `diags`."""
    for item in raw.items:
        if isinstance(item.value, LayerSlice):
            _check_slice(item, diags)
    for pattern in raw.pattern:
        check_name(pattern, diags, what="layer stack name")
        if not STACK_NAME.fullmatch(pattern.value or "x"):  # PEFT puts it in a regex, unescaped
            diags.append(error(pattern.span, f"the layer stack name {pattern.value!r} is not a plain "
                                             "name (letters, digits, '_', '-', '.')",
                               hint='name the attribute holding the blocks, e.g. of "layers"'))
    return Layers(tuple(i.value for i in raw.items), tuple(p.value for p in raw.pattern), raw.span)


def _check_slice(item: Located[LayerSlice], diags: list[Diagnostic]) -> None:
    s = item.value
    text = slice_text(s)
    if s.step == 0:
        diags.append(error(item.span, f"the layer range '{text}' has a step of zero"))
    elif slice_is_empty(s):
        diags.append(error(item.span, f"the layer range '{text}' selects no layers", hint=_HALF_OPEN))


def slice_text(s: LayerSlice) -> str:
    """A slice as the language spells it: `0:4`, `::2`, `-2:`."""
    def part(v: int | None) -> str:
        return "" if v is None else str(v)

    text = f"{part(s.start)}:{part(s.stop)}"
    return text if s.step is None else f"{text}:{part(s.step)}"


def slice_is_empty(s: LayerSlice) -> bool:
    """Whether `s` selects no layer whatever the depth (only where that is decidable)."""
    step = 1 if s.step is None else s.step
    start, stop = s.start, s.stop
    if step > 0 and start is None:
        start = 0
    if start is None or stop is None or (start < 0) != (stop < 0):
        return False
    return start >= stop if step > 0 else start <= stop
