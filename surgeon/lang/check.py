"""Syntax tree -> Spec: every semantic check, all errors collected before anyone raises.

Checks adapters (names, duplicates, methods), which rules a method accepts, and every rule's
parts; option values are checked in check_options.py and selectors in check_selection.py.
"""

from __future__ import annotations

import re

from surgeon import methods as registry
from surgeon.lang import vocabulary as vocab
from surgeon.lang.check_options import check_options
from surgeon.lang.check_selection import check_name, check_selection
from surgeon.lang.diagnostics import Diagnostic, did_you_mean, error
from surgeon.lang.kinds import is_int, is_number, show
from surgeon.lang.spec import Adapter, Alpha, Exclude, Feedforward, Rank, Rule, Save, Spec, Target, Tokens
from surgeon.lang.syntax import Located, RawAdapter, RawRule, RawSpec
from surgeon.methods.missing import why_missing

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def adapter_name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter (None: it can). PEFT saves an adapter in a folder of
    that name, so this is checked wherever a name enters (specs, configs, API arguments)."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        return (f"the adapter name {name!r} is not a plain name: use letters, digits, '_', '-' "
                "and '.', starting with a letter, digit or '_' (PEFT saves it as a folder name)")
    if len(name.encode()) > 200:
        return f"the adapter name {name[:20]!r}... is longer than 200 bytes (it becomes a folder name)"
    return None


def check(raw: RawSpec, source: str, file: str) -> tuple[Spec | None, list[Diagnostic]]:
    """The checked Spec (None if any error) and every diagnostic found."""
    diags: list[Diagnostic] = []
    if not raw.adapters:
        diags.append(error(
            raw.span, "this spec defines no adapter",
            hint="a spec looks like: adapter default = lora(r=8) { target q_proj, v_proj }",
        ))
    first: dict[str, Located[str]] = {}
    adapters = []
    for raw_adapter in raw.adapters:
        name = raw_adapter.name
        if name.value in first:
            diags.append(error(
                name.span, f"the adapter '{name.value}' is defined twice",
                notes=[(first[name.value].span, "first defined here")],
            ))
        first.setdefault(name.value, name)
        adapters.append(_adapter(raw_adapter, diags))
    if any(d.severity == "error" for d in diags):
        return None, diags
    return Spec(tuple(adapters), source=source, file=file), diags


def _adapter(raw: RawAdapter, diags: list[Diagnostic]) -> Adapter:
    name, method = raw.name, raw.method
    if adapter_name_problem(name.value):
        diags.append(error(
            name.span, f"the adapter name {show(name.value)} is not a plain name",
            hint="use letters, digits, '_', '-' and '.' (PEFT saves it as a folder name)",
        ))
    methods = vocab.methods()
    known = method.value in methods
    missing = None if known else why_missing(method.value)
    if missing:
        diags.append(error(
            method.span, f"'{method.value}' is a PEFT method surgeon does not implement: {missing}",
            hint="methods are " + ", ".join(methods),
        ))
    elif not known:
        diags.append(error(
            method.span, f"unknown method '{method.value}'",
            hint=did_you_mean(method.value, methods) or "methods are " + ", ".join(methods),
        ))
    options = check_options(method, raw.options, diags) if known else ()
    rules = tuple(r for r in (_rule(rule, method.value if known else None, diags) for rule in raw.rules) if r)
    # no target rule: the method's classic placement, by roles (LoRA: @attn.q, @attn.v)
    _check_tokens_once(raw.rules, diags)
    return Adapter(name.value, method.value, options, rules, raw.span)


def _rule_allowed(rule: RawRule, method: str | None, diags: list[Diagnostic]) -> bool:
    if method is None or rule.kind in vocab.rules_of(method):
        return True
    owners = [m for m in vocab.methods() if rule.kind in vocab.rules_of(m)]
    owners_text = owners[0] if len(owners) == 1 else ", ".join(owners[:-1]) + " and " + owners[-1]
    hint = dict(registry.config_of(method).rule_hints).get(rule.kind)
    diags.append(error(
        rule.keyword, f"'{rule.kind}' rules apply only to {owners_text} adapters, not {method}", hint=hint
    ))
    return False


def _rule(raw: RawRule, method: str | None, diags: list[Diagnostic]) -> Rule | None:
    allowed = _rule_allowed(raw, method, diags)
    before = len(diags)
    if raw.kind in ("save", "tokens"):
        names = tuple(check_name(n, diags, what="module name") for n in raw.names)
        rule = Save(names, raw.span) if raw.kind == "save" else _tokens(raw, diags)
    else:
        selection = check_selection(raw.selection, raw.kind, diags)
        rule = _selecting(raw, selection, diags)
    return rule if allowed and len(diags) == before else None


def _selecting(raw: RawRule, selection, diags: list[Diagnostic]) -> Rule | None:
    if raw.kind == "target":
        return Target(selection, raw.span)
    if raw.kind == "exclude":
        return Exclude(selection, raw.span)
    if raw.kind == "feedforward":
        return Feedforward(selection, raw.span)
    value = raw.value.value
    if raw.kind == "rank":
        if not (is_int(value) and value >= 1):
            diags.append(error(raw.value.span, f"a rank must be a positive integer; got {show(value)}"))
            return None
        return Rank(value, selection, raw.span)
    if not (is_number(value) and value > 0):
        diags.append(error(raw.value.span, f"an alpha must be a positive number; got {show(value)}"))
        return None
    return Alpha(value, selection, raw.span)


def _tokens(raw: RawRule, diags: list[Diagnostic]) -> Tokens | None:
    if not raw.indices:
        diags.append(error(raw.span, "'tokens' needs at least one token index", hint="tokens embed_tokens [0, 1]"))
        return None
    for index in raw.indices:
        if index.value < 0:
            diags.append(error(index.span, f"a token index cannot be negative; got {index.value}"))
    module = raw.names[0].value if raw.names else None
    return Tokens(module, tuple(i.value for i in raw.indices), raw.span)


def _check_tokens_once(rules: tuple[RawRule, ...], diags: list[Diagnostic]) -> None:
    """PEFT keys trainable tokens by embedding module, so each module gets one `tokens` rule."""
    seen: dict[str | None, RawRule] = {}
    for rule in rules:
        if rule.kind != "tokens":
            continue
        module = rule.names[0].value if rule.names else None
        if module in seen:
            what = f"the module '{module}'" if module else "the input embedding"
            diags.append(error(
                rule.keyword, f"{what} already has a 'tokens' rule",
                hint="list every index in one rule", notes=[(seen[module].keyword, "first defined here")],
            ))
        seen.setdefault(module, rule)
