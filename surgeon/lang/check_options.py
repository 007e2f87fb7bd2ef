"""Checks an adapter header's options against the method's vocabulary.

Resolves aliases to PEFT field names, validates each value, rejects options the method does not
have (with "did you mean"), and applies the few cross-field rules PEFT enforces at config time
(so `surgeon check` catches them, not a training job an hour later).
"""

from __future__ import annotations

from surgeon import methods as registry
from surgeon.lang import vocabulary as vocab
from surgeon.lang.diagnostics import Diagnostic, did_you_mean, error, warning
from surgeon.lang.kinds import Enum, show
from surgeon.lang.spec import Option
from surgeon.lang.syntax import Located, RawOption


def check_options(
    method: Located[str], raw: tuple[RawOption, ...], diags: list[Diagnostic]
) -> tuple[Option, ...]:
    """The valid options of one adapter, in canonical order; problems go to `diags`."""
    found: dict[str, RawOption] = {}
    for option in raw:
        field = _field(method.value, option.key, diags)
        if field is None:
            continue
        if field.name in found:
            first = found[field.name].key
            diags.append(error(
                option.key.span, f"the option '{field.name}' is given twice",
                notes=[(first.span, f"first given here as '{first.value}'")],
            ))
            continue
        if _value_ok(field, option, diags):
            found[field.name] = option
    order = vocab.canonical_order(method.value)
    options = tuple(
        Option(name, found[name].value.value, found[name].span) for name in order if name in found
    )
    _check_required(method, found, diags)
    _check_combinations(method, found, diags)
    _check_applicable(method, found, diags)
    return options


def _field(method: str, key: Located[str], diags: list[Diagnostic]) -> vocab.Field | None:
    field = vocab.field_of(method, key.value)
    if field is not None:
        return field
    owners = vocab.methods_with(key.value)
    if owners:
        diags.append(error(
            key.span, f"{method} adapters have no option '{key.value}'",
            hint=f"'{key.value}' is an option of {', '.join(owners)}",
        ))
        return None
    names = [f.name for f in vocab.fields_of(method)] + list(vocab.aliases(method))
    some = ", ".join(vocab.alias_of(method, n) for n in vocab.canonical_order(method)[:6])
    diags.append(error(
        key.span, f"unknown option '{key.value}' for {method}",
        hint=did_you_mean(key.value, names) or f"{method} options include {some}, ...",
    ))
    return None


def _value_ok(field: vocab.Field, option: RawOption, diags: list[Diagnostic]) -> bool:
    value = option.value.value
    problem = field.problem(value)
    if problem is None:
        return True
    hint = None
    if isinstance(field.kind, Enum) and isinstance(value, str):
        hint = did_you_mean(value, field.kind.choices)
    diags.append(error(
        option.value.span, f"the option '{option.key.value}' {problem}; got {show(value)}", hint=hint
    ))
    return False


def _check_required(method: Located[str], found: dict[str, RawOption], diags: list[Diagnostic]) -> None:
    for name in vocab.required(method.value):
        if name not in found or found[name].value.value is None:
            diags.append(error(
                method.span, f"{method.value} needs the option '{name}'",
                hint=f"for example {method.value}({name}=1000, ...)",
            ))


def _check_combinations(method: Located[str], found: dict[str, RawOption], diags: list[Diagnostic]) -> None:
    """The method's cross-field rules (PEFT's `__post_init__`), so that `surgeon check` catches
    what would otherwise fail at training time (a missing required option reads as None)."""
    config = registry.config_of(method.value)
    values = {f.name: found[f.name].value.value if f.name in found else f.default for f in config.fields}
    for problem in config.check(values, frozenset(found)):
        diags.append((warning if problem.warning else error)(
            _span_of(problem, found, method), problem.message, hint=problem.hint))


def _check_applicable(method: Located[str], found: dict[str, RawOption], diags: list[Diagnostic]) -> None:
    """Options that convert to a PEFT config but that `plan` and `apply` refuse (a variant surgeon
    does not implement, or one a Site cannot express yet): warned here, so `surgeon check` does not
    pass a spec that no model can be adapted with."""
    config = registry.config_of(method.value)
    for name in config.unplanned + config.unimplemented:
        option = found.get(name)
        if option is None or not option.value.value:  # PEFT's defaults are false, null or empty
            continue
        what = ("is converted to PEFT's config but not planned or applied yet" if name in config.unplanned
                else f"selects a PEFT variant of {method.value} that surgeon does not implement")
        diags.append(warning(option.key.span, f"the option '{option.key.value}' {what}",
                             hint="`surgeon plan` and `surgeon apply` refuse it; remove it to adapt a model"))


def _span_of(problem, found: dict[str, RawOption], method: Located[str]):
    option = found.get(problem.field)
    if option is None:
        return method.span
    return {"key": option.key.span, "value": option.value.span}.get(problem.at, option.span)
