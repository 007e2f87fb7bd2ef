"""Compile an Adapter into a PEFT 0.21 adapter_config dict, with or without a resolved plan.

`peft_config_from_adapter` needs no model, so it accepts only selectors PEFT can say itself
(names, regexes, globs, all-linear, one layer restriction shared by all targets);
`peft_config_for_sites` writes what a resolved plan adapted, module path by module path.
Both return every field of the method's config class, as `Config.to_dict()` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from surgeon import methods as registry
from surgeon.lang.spec import (
    Adapter,
    AllLinear,
    Alpha,
    Atom,
    Exclude,
    Feedforward,
    Glob,
    Layers,
    LayerSlice,
    ModuleType,
    Name,
    Param,
    Rank,
    Regex,
    RoleRef,
    Save,
    Selection,
    Target,
    Tokens,
    to_python,
)
from surgeon.peft_format.fields import (
    ConversionError,
    NeedsModelError,
    default_of,
    peft_fields,
    role_of,
    selectors,
)
from surgeon.peft_format.patterns import (
    UnorderedRulesError,
    atom_regex,
    pattern_from_rules,
    suffix_is_segment,
)
from surgeon.planning.site import Site

_MODEL_FREE = (Name, Glob, Regex)
_NAME_REGEX = re.compile(r"\(\?:\.\*\\\.\)\?((?:\\.|[^\\.*?+()\[\]{}|^$])+)")


def peft_config_from_adapter(adapter: Adapter) -> dict:
    """The PEFT config dict that selects what `adapter` selects, on any model.

    Returns:
        Every field of the method's PEFT config class in `to_dict()` order; unstated options
        take PEFT's defaults; `peft_version` is the PEFT format written (PEFT_FORMAT_VERSION).
    Raises:
        NeedsModelError: a selector only the model can resolve (module type, role, `within`,
            `except`, layer restrictions that differ between targets, negative or open layer
            slices, rank/alpha rules whose winner depends on how many modules each selects).
            Use `peft_config_for_sites` on the planned sites instead.
        ConversionError: an option the method does not have.

    Example:
        >>> a = Adapter("default", "lora", (Option("r", 16),), (Target(Selection((Name("q"),))),))
        >>> peft_config_from_adapter(a)["target_modules"]
        ['q']
    """
    out = _header(adapter)
    selected = {
        **_targets(adapter),
        "exclude_modules": _excludes(adapter.rules_of(Exclude)),
        "modules_to_save": _saved(adapter),
        "feedforward_modules": _feedforward(adapter),
        "trainable_token_indices": _tokens(adapter.rules_of(Tokens)),
        **_patterns(adapter),
    }
    if selected["exclude_modules"] and "exclude_modules" not in selectors(adapter.method):
        # PEFT's config has no field for it (VeRA, RandLoRA): only the resolved sites can say it
        raise NeedsModelError(f"an exclude rule needs the model: PEFT's {out['peft_type']} config "
                              "has no exclude_modules", adapter.rules_of(Exclude)[0].span)
    if selected["layers_to_transform"] is not None and "layers_to_transform" not in selectors(adapter.method):
        # no layers_to_transform either (OSF, LN tuning): only the resolved sites can say it
        raise NeedsModelError(f"a layer restriction needs the model: PEFT's {out['peft_type']} config "
                              "has no layers_to_transform", adapter.rules_of(Target)[0].span)
    out.update((k, v) for k, v in selected.items() if k in selectors(adapter.method))
    if named := _parameter_names(adapter):  # `target param ...`: LoRA's target_parameters
        out["target_parameters"] = list(dict.fromkeys([*(out.get("target_parameters") or ()), *named]))
    return out


def peft_config_for_sites(adapter: Adapter, sites: Sequence[Site], *,
                          base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json of a resolved plan: PEFT adapts exactly `sites`, each with its rank
    and alpha.

    `target_modules` is one full-match regex of the escaped site paths; sites whose rank or
    alpha differs from the adapter's get a `^`-anchored escaped-path key in `rank_pattern` /
    `alpha_pattern` (PEFT matches `(.*\\.)?(KEY)$`, so the key selects that path only).
    Exclusions and layer restrictions are already applied, so they are not written.

    Example:
        >>> peft_config_for_sites(adapter, [Site("layers.0.q", "Linear", "lora", "default", 8, 16, 2)])
        {..., 'target_modules': '^(?:layers\\.0\\.q)$', ...}
    """
    mine = [s for s in sites if s.adapter == adapter.name]
    if len(mine) != len(sites) or not mine:
        raise ConversionError(f"the sites must be those of adapter `{adapter.name}`, and not none")
    out = _header(adapter)
    method = adapter.method
    stacks = [s for s in mine if s.kind == "Parameter"]  # LoRA's target_parameters, full paths
    if stacks:
        out["target_parameters"] = [f"{s.path}.{s.option('parameter_name')}" for s in stacks]
    mine = [s for s in mine if s.kind != "Parameter"]
    paths = list(dict.fromkeys(s.path for s in mine))
    selected: dict = {
        "target_modules": paths_regex(paths) if paths else [],
        "modules_to_save": _saved(adapter),
        "trainable_token_indices": _tokens(adapter.rules_of(Tokens)),
    }
    config = registry.config_of(method)
    if config.rank_field and config.alpha_field and "rank" in config.rules:
        base_r, base_alpha = out[config.rank_field], out[config.alpha_field]
        keyed = [(_site_key(s), s) for s in mine + stacks]
        selected["rank_pattern"] = {_path_key(k): s.r for k, s in keyed if s.r != base_r}
        selected["alpha_pattern"] = {_path_key(k): _number(s.alpha) for k, s in keyed
                                     if s.alpha != base_alpha}
    if "feedforward_modules" in selectors(method):
        forward = [s.path for s in mine if s.option("is_feedforward", False)]
        selected["feedforward_modules"] = paths_regex(forward) if forward else []
    out.update((k, v) for k, v in selected.items() if k in selectors(method))
    if base_model_name_or_path is not None:
        out["base_model_name_or_path"] = base_model_name_or_path
    return out


# --------------------------------------------------------------------------- header


def _header(adapter: Adapter) -> dict:
    """Every field but the selectors: stated options, else PEFT's defaults."""
    method = adapter.method
    if method not in registry.names():
        raise ConversionError(f"method `{method}` has no PEFT config (supported: {', '.join(registry.names())})")
    for option in adapter.options:
        if role_of(method, option.name) != "option":
            raise ConversionError(f"`{option.name}` is not an option of PEFT's {registry.config_of(method).peft_type} config")
    for rule in adapter.rules:
        if type(rule).__name__.lower() not in registry.config_of(method).rules:
            raise ConversionError(f"PEFT's {registry.config_of(method).peft_type} config has no field for "
                                  f"`{type(rule).__name__.lower()}` rules")
    return {f: to_python(adapter.option(f)) if role_of(method, f) == "option" else default_of(method, f)
            for f in peft_fields(method)}


def _number(value: float):
    return int(value) if float(value).is_integer() else value


# --------------------------------------------------------------------------- regexes of paths


def _site_key(site: Site) -> str:
    """What PEFT matches rank_pattern keys against: the module path, or for a bare parameter
    (a ParamWrapper) `<module path>.<parameter name>`."""
    return f"{site.path}.{site.option('parameter_name')}" if site.kind == "Parameter" else site.path


def _path_key(path: str) -> str:
    return "^" + re.escape(path)


def paths_regex(paths: Iterable[str]) -> str:
    """A full-match regex that matches exactly `paths`, factored on the first numeric segment:
    `model.layers.0.q`, `model.layers.1.q` -> `^(?:model\\.layers\\.(?:0|1)\\.q)$`."""
    groups: dict[tuple[str, str], list[str]] = {}
    for path in paths:
        parts = path.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit() and 0 < i < len(parts) - 1), None)
        if at is None:
            groups.setdefault((re.escape(path), ""), [])
            continue
        head, tail = ".".join(parts[:at]), ".".join(parts[at + 1 :])
        groups.setdefault((head, tail), []).append(parts[at])
    by_indices: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (head, tail), indices in groups.items():
        by_indices.setdefault((head, tuple(indices)), []).append(tail)
    alternatives = []
    for (head, indices), tails in by_indices.items():
        if not indices:
            alternatives.append(head)
            continue
        alternatives.append(re.escape(head) + r"\." + _alternation(indices) + r"\."
                            + _alternation([re.escape(t) for t in tails]))
    return "^(?:" + "|".join(alternatives) + ")$"


def _alternation(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


# --------------------------------------------------------------------------- selectors


def _parameter_names(adapter: Adapter) -> list[str]:
    """The `param` atoms of target rules, which PEFT matches as target_parameters entries (no
    layer restriction, scope or `except` applies to those: they need the model)."""
    names = []
    for rule in adapter.rules_of(Target):
        params = [a for a in rule.selection.include if isinstance(a, Param)]
        if params and (rule.selection.layers or rule.selection.within or rule.selection.exclude):
            raise NeedsModelError("a `param` target with a layer restriction, `within` or `except` "
                                  "needs the model (PEFT's target_parameters has none)", params[0].span)
        names += [a.name for a in params]
    return names


def _targets(adapter: Adapter) -> dict:
    selections = [t.selection for t in adapter.rules_of(Target)]
    none = {"target_modules": None, "layers_to_transform": None, "layers_pattern": None}
    if not selections:
        return none  # PEFT's per-architecture default targets
    modules = [replace(s, include=tuple(a for a in s.include if not isinstance(a, Param)))
               for s in selections]
    selections = [s for s in modules if s.include]
    if not selections:
        return {**none, "target_modules": []}  # parameters only
    for s in selections:
        _no_restrictions(s, "target", layers_ok=True)
    atoms = [a for s in selections for a in s.include]
    if any(isinstance(a, AllLinear) for a in atoms):
        if len(atoms) > 1 or selections[0].layers is not None:
            bad = next(a for a in atoms if isinstance(a, AllLinear))
            raise NeedsModelError(
                "`all-linear` combined with other selectors or a layer restriction needs the "
                "model (PEFT's target_modules='all-linear' stands alone)", bad.span)
        return {**none, "target_modules": "all-linear"}
    layers = {s.layers for s in selections}
    if len(layers) > 1:
        odd = next(s for s in selections if s.layers != selections[0].layers)
        raise NeedsModelError(
            "targets with different layer restrictions need the model (PEFT's "
            "layers_to_transform applies to every target)", odd.span)
    restriction = layers.pop()
    names = [_as_name(a) for a in atoms]
    if restriction is None:
        value = list(dict.fromkeys(names)) if None not in names else _alternatives(atoms)
        return {**none, "target_modules": value}
    if None in names:
        bad = atoms[names.index(None)]
        raise NeedsModelError("a regex or glob target with a layer restriction needs the model "
                              "(PEFT ignores layers_to_transform for a regex)", bad.span)
    return {"target_modules": list(dict.fromkeys(names)), **_layer_fields(restriction)}


def _layer_fields(layers: Layers) -> dict:
    indices: list[int] = []
    for item in layers.items:
        if isinstance(item, LayerSlice):
            if (item.stop is None or item.stop < 0 or (item.start or 0) < 0
                    or (item.step is not None and item.step <= 0)):
                raise NeedsModelError("an open-ended or negative layer slice needs the model "
                                      "(to know how many layers there are)", layers.span)
            indices += range(item.start or 0, item.stop, item.step or 1)
        elif item < 0:
            raise NeedsModelError("a negative layer index needs the model (to know how many "
                                  "layers there are)", layers.span)
        else:
            indices.append(item)
    patterns = list(layers.pattern)
    return {"layers_to_transform": list(dict.fromkeys(indices)),
            "layers_pattern": None if not patterns else patterns[0] if len(patterns) == 1 else patterns}


def _excludes(rules: tuple[Exclude, ...]):
    atoms = []
    for rule in rules:
        _no_restrictions(rule.selection, "exclude")
        atoms += rule.selection.include
    if not atoms:
        return None
    names = [_as_name(a) for a in atoms]
    return list(dict.fromkeys(names)) if None not in names else _alternatives(atoms)


def _saved(adapter: Adapter):
    names = [n for rule in adapter.rules_of(Save) for n in rule.names]
    return list(dict.fromkeys(names)) or None


def _feedforward(adapter: Adapter):
    """IA3's feedforward_modules: a list (matched by `str.endswith`) when each atom says exactly
    that and the list is a subset of a target list, as PEFT requires; else one regex."""
    atoms = []
    for rule in adapter.rules_of(Feedforward):
        _no_restrictions(rule.selection, "feedforward")
        atoms += rule.selection.include
    if not atoms:  # null makes PEFT pick them from its per-architecture table, as targets
        return None if not adapter.rules_of(Target) else []
    targets = [t for rule in adapter.rules_of(Target) for t in rule.selection.include]
    target_names = [_as_name(t) for t in targets]
    listed = [_endswith_entry(a, target_names) for a in atoms]
    # PEFT checks the subset only when target_modules is a list too
    target_list = bool(target_names) and None not in target_names
    if None not in listed and (not target_list or set(listed) <= set(target_names)):
        return list(dict.fromkeys(listed))
    return _alternatives(atoms)


def _endswith_entry(atom: Atom, targets: list[str | None]) -> str | None:
    if isinstance(atom, Regex) and atom.pattern.startswith(".*"):
        literal = _unescape(atom.pattern[2:])
        if literal is not None and ".*" + re.escape(literal) == atom.pattern:
            return literal
    if (isinstance(atom, Name) and targets and None not in targets
            and suffix_is_segment(atom.pattern, targets)):  # type: ignore[arg-type]
        return atom.pattern
    return None


def _tokens(rules: tuple[Tokens, ...]):
    if not rules:
        return None
    if all(r.module is None for r in rules) and len(rules) == 1:
        return list(rules[0].indices)
    if any(r.module is None for r in rules):
        bad = next(r for r in rules if r.module is None)
        raise NeedsModelError("`tokens` without a module next to other `tokens` rules needs the "
                              "model (PEFT's default is the input embedding, by its path)", bad.span)
    out: dict[str, list[int]] = {}
    for r in rules:
        out.setdefault(r.module, []).extend(r.indices)
    return out


def _patterns(adapter: Adapter) -> dict:
    out = {}
    for kind, field in ((Rank, "rank_pattern"), (Alpha, "alpha_pattern")):
        rules = tuple(_params_as_names(r) for r in adapter.rules_of(kind))
        for rule in rules:
            _no_restrictions(rule.selection, kind.__name__.lower(), except_ok=True)
        try:
            out[field] = pattern_from_rules(rules)
        except UnorderedRulesError as e:
            raise NeedsModelError(str(e), e.atom.span) from None
    return out


# --------------------------------------------------------------------------- atoms


def _params_as_names(rule):
    """`rank 4 on param x`: PEFT matches a pattern key against a parameter's path as against a
    module's, so the key is the name's."""
    include = tuple(Name(a.name, a.span) if isinstance(a, Param) else a for a in rule.selection.include)
    return replace(rule, selection=replace(rule.selection, include=include))


def _no_restrictions(selection: Selection, rule: str, *, layers_ok: bool = False,
                     except_ok: bool = False) -> None:
    if selection.within is not None:
        raise NeedsModelError(f"`within` in a {rule} rule needs the model", selection.span)
    if selection.layers is not None and not layers_ok:
        raise NeedsModelError(f"a layer restriction in a {rule} rule needs the model", selection.layers.span)
    if selection.exclude and not except_ok:
        raise NeedsModelError(f"`except` in a {rule} rule needs the model", selection.exclude[0].span)
    if not selection.include:
        raise NeedsModelError(f"a {rule} rule that selects by layer only needs the model", selection.span)
    for atom in (*selection.include, *selection.exclude):
        if isinstance(atom, (ModuleType, RoleRef)) or (isinstance(atom, AllLinear) and rule != "target"):
            what = {ModuleType: "a module type", RoleRef: "a role", AllLinear: "`all-linear`"}[type(atom)]
            raise NeedsModelError(f"{what} in a {rule} rule needs the model", atom.span)


def _as_name(atom: Atom) -> str | None:
    """The PEFT list entry that matches like `atom` (a Name, or the regex `(?:.*\\.)?LITERAL`)."""
    if isinstance(atom, Name):
        return atom.pattern
    if isinstance(atom, Regex):
        m = _NAME_REGEX.fullmatch(atom.pattern)
        literal = _unescape(m.group(1)) if m else None
        if literal is not None and atom_regex(Name(literal)) == atom.pattern:
            return literal
    return None


def _unescape(text: str) -> str | None:
    """`text` as the literal it escapes, or None when it holds regex syntax."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            if i + 1 == len(text) or text[i + 1].isalnum():
                return None
            out.append(text[i + 1])
            i += 2
        elif text[i] in ".*?+()[]{}|^$":
            return None
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _alternatives(atoms: list[Atom]) -> str:
    """One full-match regex for the union of model-free atoms (PEFT's str form)."""
    return "|".join(dict.fromkeys(atom_regex(a) for a in atoms))
