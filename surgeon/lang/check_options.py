"""Checks an adapter header's options against the method's vocabulary.

Resolves aliases to PEFT field names, validates each value, rejects options the method does not
have (with "did you mean"), and applies the few cross-field rules PEFT enforces at config time
(so `surgeon check` catches them, not a training job an hour later).
"""

from __future__ import annotations

from surgeon.lang import vocabulary as vocab
from surgeon.lang.diagnostics import Diagnostic, did_you_mean, error, warning
from surgeon.lang.kinds import Enum, show
from surgeon.lang.spec import Option, Table
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
    _check_combinations(method.value, found, diags)
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
    for name in vocab.REQUIRED.get(method.value, ()):
        if name not in found or found[name].value.value is None:
            diags.append(error(
                method.span, f"{method.value} needs the option '{name}'",
                hint=f"for example {method.value}({name}=1000, ...)",
            ))


def _value(method: str, found: dict[str, RawOption], name: str):
    return found[name].value.value if name in found else vocab.default_of(method, name)


def _check_combinations(method: str, found: dict[str, RawOption], diags: list[Diagnostic]) -> None:
    """Cross-field rules of PEFT's `__post_init__` that would otherwise fail at training time."""
    if method == "lora":
        _check_lora(found, diags)
    if method == "adalora" and "total_step" in found and isinstance(_value(method, found, "total_step"), int):
        total = _value(method, found, "total_step")
        tinit, tfinal = _value(method, found, "tinit"), _value(method, found, "tfinal")
        if tinit >= total - tfinal:
            where = found.get("tinit", found.get("tfinal", found["total_step"]))
            diags.append(error(
                where.span,
                f"tinit={tinit} and tfinal={tfinal} leave no budgeting phase in total_step={total}",
                hint="AdaLoRA prunes ranks between steps tinit and total_step - tfinal",
            ))
    if method == "adalora" and "r" in found:
        diags.append(warning(
            found["r"].key.span, "adalora ignores 'r'", hint="set the ranks with 'init_r' and 'target_r'"
        ))


def _check_lora(found: dict[str, RawOption], diags: list[Diagnostic]) -> None:
    init = _value("lora", found, "init_lora_weights")
    if _value("lora", found, "lora_bias") is True:
        where = found["lora_bias"].span
        if not isinstance(init, bool):
            diags.append(error(where, f"lora_bias=true needs init_lora_weights true or false, not '{init}'"))
        if _value("lora", found, "use_dora") is True:
            diags.append(error(where, "lora_bias=true cannot be combined with DoRA (use_dora=true)"))
    loftq = _value("lora", found, "loftq_config")
    if init == "loftq" and (not isinstance(loftq, Table) or not loftq.items):
        diags.append(error(
            found["init_lora_weights"].value.span, "init=loftq needs the option 'loftq_config'",
            hint="for example loftq_config={loftq_bits: 4, loftq_iter: 1}",
        ))
    if _value("lora", found, "use_dora") is True and _value("lora", found, "megatron_config") is not None:
        diags.append(error(found["use_dora"].span, "DoRA does not support Megatron (megatron_config)"))
