"""Decompile a PEFT 0.21 adapter_config.json (LoRA, IA3, AdaLoRA, LoHa, LoKr) into an Adapter.

The Adapter selects what PEFT would select on any model (see `peft_config_patterns` for how
PEFT's first-match `rank_pattern`/`alpha_pattern` becomes rules), and states only the options
that differ from PEFT's defaults.
"""

from __future__ import annotations

import difflib
import enum
import json
import re

from surgeon import methods as registry
from surgeon.lang.check_selection import STACK_NAME
from surgeon.lang.spec import (
    Adapter,
    AllLinear,
    Alpha,
    Atom,
    Exclude,
    Feedforward,
    Layers,
    LayerSlice,
    Name,
    Option,
    Rank,
    Regex,
    Rule,
    Save,
    Selection,
    Target,
    Tokens,
)
from surgeon.lang.vocabulary import canonical_order
from surgeon.peft_format.fields import (
    ConversionError,
    default_of,
    method_of_type,
    peft_fields,
    peft_type,
    role_of,
    same_value,
    selectors,
    spec_value,
)
from surgeon.peft_format.patterns import name_regex, rules_from_pattern, suffix_is_segment

_GLOB_CHARS = re.compile(r"[*?\[]")


def spec_from_peft_config(config: dict, *, name: str = "default") -> Adapter:
    """The Adapter equivalent to a PEFT adapter_config dict (as `json.load` or `to_dict()` gives).

    Args:
        config: the adapter_config.json object; `peft_type` picks the method.
        name: the adapter's name in the Spec.
    Returns:
        An Adapter whose rules select what PEFT selects and whose options are the fields that
        differ from PEFT's defaults (PEFT field names, canonical order).
    Raises:
        ConversionError: an unknown method or field, or something a spec cannot say (null
            `target_modules` or IA3 `feedforward_modules`, which PEFT fills from its
            per-architecture tables; an empty `target_modules`; a non-default field surgeon
            does not model, such as AdaLoRA's `use_rslora`).

    Example:
        >>> a = spec_from_peft_config({"peft_type": "LORA", "r": 16, "target_modules": ["q", "v"]})
        >>> a.options, a.rules
        ((Option(name='r', value=16),), (Target(selection=Selection(include=(Name(pattern='q'), ...
    """
    if not isinstance(config, dict):
        raise ConversionError(f"an adapter config is a JSON object, not {type(config).__name__}")
    method = _method(config)
    fields = peft_fields(method)
    _tolerate_unknown(config, fields, method)
    return Adapter(name, method, _options(config, method), _rules(config, method))



def _tolerate_unknown(config: dict, fields, method: str) -> None:
    """Fields this PEFT version does not know, as peft loads them: ignored, with one warning naming
    them all, when each is off (null, false, empty: a newer peft's new feature left at its default).
    One set to anything else may change the math in a way surgeon cannot know, so it is refused."""
    unknown = [k for k in config if k not in fields and k != "runtime_config"]  # PEFT drops it
    active = [k for k in unknown if config[k] not in (None, False, "", [], {})]
    if active:
        close = difflib.get_close_matches(str(active[0]), fields, n=1)
        hint = (f"; did you mean `{close[0]}`?" if close else "") + (
            " (if it is a newer peft's option, surgeon cannot tell whether it changes the math, so it "
            "refuses the config rather than ignore it)")
        raise ConversionError(f"`{active[0]}` is not a field of PEFT's {peft_type(method)} config{hint}")
    if unknown:
        import warnings

        names = ", ".join(f"`{k}`" for k in unknown)
        warnings.warn(f"adapter_config.json has fields PEFT 0.21's {peft_type(method)} config does not "
                      f"know: {names}; they are off (null/false/empty), so they are ignored, as peft "
                      "ignores them", UserWarning, stacklevel=3)

def _options(config: dict, method: str) -> tuple[Option, ...]:
    """The option fields that differ from PEFT's defaults, in the printer's canonical order."""
    found = []
    for field in peft_fields(method):
        role = role_of(method, field)
        if field not in config or role not in ("option", "unsupported"):
            continue
        value = spec_value(config[field])
        if same_value(value, spec_value(default_of(method, field))):
            continue
        option = registry.config_of(method).field(field)
        if option is not None and (problem := option.problem(value)):  # r: "8", r: -4, dropout: 5.0
            raise ConversionError(f"`{field}` {problem}; got {json.dumps(config[field], default=repr)}")
        if role == "unsupported":
            raise ConversionError(
                f"`{field}` = {config[field]!r}: surgeon's `{method}` has no such option "
                f"(PEFT's {peft_type(method)} config accepts it, but surgeon does not model it)")
        found.append(Option(field, value))
    order = {f: i for i, f in enumerate(canonical_order(method))}
    return tuple(sorted(found, key=lambda o: order[o.name]))


def _method(config: dict) -> str:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, (str, enum.Enum, type(None))):  # to_dict() holds PeftType
        raise ConversionError(f"`peft_type` must be a string such as \"LORA\", not {peft_type!r}")
    if peft_type is None:
        raise ConversionError("the config has no `peft_type`; is this a PEFT adapter_config.json?")
    peft_type = str(spec_value(peft_type))
    return method_of_type(peft_type)


def _rules(config: dict, method: str) -> tuple[Rule, ...]:
    get = config.get
    only_parameters = bool(get("target_parameters")) and not get("target_modules")
    rules: list[Rule] = [] if only_parameters else list(
        _targets(get("target_modules"), get("layers_to_transform"), get("layers_pattern")))
    if get("exclude_modules"):
        rules.append(Exclude(Selection(_atoms(get("exclude_modules"), "exclude_modules"))))
    if role_of(method, "rank_pattern") == "selector" and get("rank_pattern"):
        rules += rules_from_pattern(_pattern(get("rank_pattern"), "rank_pattern"), Rank)
    if role_of(method, "alpha_pattern") == "selector" and get("alpha_pattern"):
        rules += rules_from_pattern(_pattern(get("alpha_pattern"), "alpha_pattern"), Alpha)
    if get("modules_to_save"):
        rules.append(Save(tuple(_strings(get("modules_to_save"), "modules_to_save"))))
    feedforward = "feedforward_modules" in selectors(method)
    if feedforward and get("feedforward_modules") is None and get("target_modules") is not None:
        raise ConversionError(
            "`feedforward_modules` is null: PEFT then picks them from its per-architecture table "
            "(by the model's `model_type`), which a spec does not name; list them (or [])")
    if get("feedforward_modules"):
        rules.append(Feedforward(Selection(_feedforward(get("feedforward_modules"),
                                                        get("target_modules")))))
    if get("trainable_token_indices") is not None:
        rules += _tokens(get("trainable_token_indices"))
    return tuple(rules)


def _pattern(value, field: str) -> dict:
    """rank_pattern / alpha_pattern: {str: positive int} / {str: positive number}."""
    if not isinstance(value, dict):
        raise ConversionError(f"`{field}` must be an object of {{pattern: value}}, not {value!r}")
    for key, v in value.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        if not number or (field == "rank_pattern" and not isinstance(v, int)):
            what = "a positive integer" if field == "rank_pattern" else "a positive number"
            raise ConversionError(f"`{field}` [{key!r}] must be {what}, not {v!r}")
    return value


def _targets(targets, layers, pattern) -> list[Target]:
    restriction = _layers(layers, pattern)
    if targets is None and restriction is None:
        return []  # PEFT's per-architecture default; a spec says it with no target rule (roles)
    if targets is None:
        raise ConversionError(
            "`target_modules` is null: PEFT then picks targets from its per-architecture table "
            "(by the model's `model_type`), which a spec does not name; list them in the config, "
            "or write a target rule such as `target @attn.q, @attn.v`")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return [Target(Selection((AllLinear(),)))]
    atoms = _atoms(targets, "target_modules")
    if not atoms:
        raise ConversionError(
            "`target_modules` is empty and `target_parameters` is not set: PEFT adapts nothing")
    return [Target(Selection(atoms, layers=restriction))]


def _atoms(value, field: str) -> tuple[Atom, ...]:
    """A PEFT str (full-match regex) or list of names (suffix match on dot segments)."""
    if isinstance(value, str):
        return (Regex(value),)
    return tuple(_name(n) for n in _strings(value, field))


def _name(name: str) -> Name | Regex:
    # `*?[` in a quoted name would read back as a glob: say the same suffix match as a regex
    return Regex(name_regex(name)) if _GLOB_CHARS.search(name) else Name(name)


def _strings(value, field: str) -> list[str]:
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConversionError(f"`{field}` must be a string or a list of strings, not {value!r}")
    return list(dict.fromkeys(value))


def _layers(layers, pattern) -> Layers | None:
    """PEFT's layers_to_transform / layers_pattern as a restriction (None or [] restrict nothing)."""
    if layers is None or layers == []:
        return None
    indices = [layers] if isinstance(layers, int) else list(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ConversionError(f"`layers_to_transform` must be an int or a list of ints, not {layers!r}")
    patterns = [pattern] if isinstance(pattern, str) else pattern or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConversionError(f"`layers_pattern` must be a string or a list of strings, not {pattern!r}")
    if bad := [p for p in patterns if p and not STACK_NAME.fullmatch(p)]:
        raise ConversionError(f"`layers_pattern` {bad[0]!r} is not a plain name of the block stack "
                              "(such as \"layers\" or \"h\")")
    return Layers(_compress(sorted(set(indices))), tuple(p for p in patterns if p))


def _compress(indices: list[int]) -> tuple[int | LayerSlice, ...]:
    """Runs of three or more consecutive indices as slices: [0, 1, 2, 3, 7] -> 0:4, 7."""
    out: list[int | LayerSlice] = []
    start = 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[i - 1] + 1:
            run = indices[start:i]
            out += [LayerSlice(run[0], run[-1] + 1)] if len(run) >= 3 else run
            start = i
    return tuple(out)


def _feedforward(value, targets) -> tuple[Atom, ...]:
    """IA3's feedforward_modules. A list entry matches by plain `str.endswith` (not on dot
    segments like target_modules), so an entry becomes a Name only where the two agree on every
    module the targets select; otherwise the exact regex `.*ENTRY`."""
    if isinstance(value, str):
        return (Regex(value),)
    names = None if isinstance(targets, str) or targets is None else _strings(targets, "target_modules")
    return tuple(
        Name(f) if names is not None and suffix_is_segment(f, names) and not _GLOB_CHARS.search(f)
        else Regex(".*" + re.escape(f))
        for f in _strings(value, "feedforward_modules"))


def _tokens(value) -> list[Tokens]:
    if isinstance(value, dict):
        return [Tokens(str(k), tuple(_ints(v))) for k, v in value.items()]
    return [Tokens(None, tuple(_ints(value)))]


def _ints(value) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        and i >= 0 for i in value):
        raise ConversionError(f"`trainable_token_indices` must hold lists of token ids (ints >= 0), not {value!r}")
    return list(value)
