"""Plan: a Spec resolved against one model, as plain data, before anything is touched.

`plan(spec, model)` decides every (module, adapter) pair that will be adapted and all of its
hyperparameters, so that `surgeon plan` can show it, `peft_config` can write it and the lowering
can build it, each without asking the spec again. Pure: the model is only read.

Semantics are PEFT 0.21's (see surgeon.planning.select): a target rule is a union of selectors, exclude
rules and modules_to_save remove modules (a saved module's whole subtree), and a module that is
no adaptable layer is an error, as in PEFT. A task_type whose PEFT task model saves its head
(SEQ_CLS, TOKEN_CLS: `classifier`, `score`; QUESTION_ANS: `qa_outputs`) saves it here too, so
the checkpoint has what PeftModel.from_pretrained expects. Stricter than PEFT: a target rule that matches
nothing is an error with "did you mean", not silence; a saved module that contains an adapted
one is an error, not a copy of adapter layers; a name equal to a whole path still obeys `in
layers[...]` (PEFT's `key in target_modules` skips the layer check).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from torch import nn

from surgeon import methods
from surgeon.integrations.peft_layers import peft_adapter_refusal
from surgeon.lang.spec import (
    NO_SPAN,
    Adapter,
    Alpha,
    Exclude,
    Name,
    Param,
    Rank,
    RoleRef,
    Save,
    Selection,
    Spec,
    Target,
)
from surgeon.layer_kinds import kind_of, whole_kind_of
from surgeon.planning import liveness, parameters
from surgeon.planning.extras import SavedAndTokens
from surgeon.planning.plans import AdapterPlan, Plan, Unmatched
from surgeon.planning.select import (
    PlanError,
    Resolver,
    closest,
    closest_paths,
    describe,
    did_you_mean,
    never_runs,
    unsupported,
)
from surgeon.planning.site import Site

__all__ = ["AdapterPlan", "Plan", "PlanError", "Unmatched", "plan"]

# PEFT 0.21's task models (PeftModelForSequenceClassification, ...ForTokenClassification,
# ...ForQuestionAnswering) append these names to modules_to_save, so the head trains, is saved,
# and is expected in the checkpoint. The names match like any modules_to_save name.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def plan(spec: Spec | str | os.PathLike, model: nn.Module, *, example_inputs=None) -> Plan:
    """Resolve `spec` against `model` without modifying it.

    Args:
        spec: a Spec, `.peft` text, or a path to a `.peft` file.
        model: the host model (may live on the meta device).
        example_inputs: inputs for graph capture, used only if a selector names a role.

    Returns:
        The Plan. Raises PlanError when a target rule matches nothing, a selected module is no
        adaptable layer, or the method is not lowered yet.

    Example:
        >>> p = plan('adapter default = lora(r=8) { target q_proj, v_proj }', model)
        >>> print(p)
    """
    if not isinstance(spec, Spec):
        from surgeon.lang.parser import load_spec

        spec = load_spec(spec)
    if (refusal := peft_adapter_refusal(model)) is not None:
        raise PlanError(refusal)
    resolver = Resolver(model, example_inputs=example_inputs, source=spec.source)
    planner = _Planner(resolver, spec.source)
    adapters = tuple(planner.adapter(a) for a in spec.adapters)
    return Plan(
        sites=tuple(s for a in adapters for s in a.sites),
        adapters=adapters,
        unmatched=tuple(planner.unmatched),
        trainable_params=sum(a.params for a in adapters),
        model_params=sum(p.numel() for p in model.parameters()),
    )


def _location(node) -> str:
    return "" if node.span == NO_SPAN else node.span.location()


class _Planner(SavedAndTokens):
    """Plans adapters one by one over a shared Resolver, collecting warnings."""

    def __init__(self, resolver: Resolver, source: str):
        self.resolver, self.source = resolver, source
        self.unmatched: list[Unmatched] = []

    def error(self, message: str, node, hint: str = "") -> PlanError:
        return PlanError(message, node.span, hint=hint, source=self.source)

    def text(self, node, fallback: str) -> str:
        span = node.span
        return fallback if span == NO_SPAN or not self.source else self.source[span.start : span.end]

    def adapter(self, adapter: Adapter) -> AdapterPlan:
        if not methods.applies(adapter.method):
            applied = ", ".join(m for m in methods.names() if methods.applies(m))
            raise self.error(
                f"method `{adapter.method}` is parsed and converted but not yet applied; "
                f"supported: {applied}", adapter)
        config = methods.config_of(adapter.method)
        for name in config.unplanned + config.unimplemented:
            if adapter.option(name):  # set (PEFT's defaults are false, null or empty)
                what = ("is converted but not planned or applied yet" if name in config.unplanned else
                        f"selects a PEFT variant of {adapter.method} that surgeon does not implement "
                        f"(it would build plain {adapter.method}, with other outputs)")
                raise self.error(f"adapter `{adapter.name}`: `{name}` {what}",
                                 next(o for o in adapter.options if o.name == name))
        task_type = adapter.option("task_type")
        wanted = tuple(adapter.option("target_parameters", None) or ())  # LoRA's bare params
        self.picked: dict[str, Target] = {}  # parameter path -> the target rule selecting it
        chosen = self.targets(adapter, task_type) if adapter.rules_of(Target) or not wanted else {}
        wanted += tuple(p for p in self.picked if p not in wanted)
        self.keys = tuple(f"{p}.{n}" for p, n in parameters.matches(self.resolver.model, wanted))
        removed = set().union(*(self.select(adapter, r, "exclude", task_type)
                                for r in adapter.rules_of(Exclude)))
        heads = TASK_HEADS.get(task_type, ())
        saved_names = tuple(n for rule in adapter.rules_of(Save) for n in rule.names) + heads
        kept = {p: loc for p, loc in chosen.items()
                if p not in removed and not _under_saved(p, saved_names)}
        if not kept and not wanted:
            also = f" or the heads task_type={task_type} saves ({', '.join(heads)})" if heads else ""
            raise self.error(
                f"adapter `{adapter.name}` adapts no module: its targets "
                f"({len(chosen)} modules) are all excluded by `exclude` or `save` rules{also}", adapter)
        sites = self.sites(adapter, kept, task_type) + self.parameter_sites(adapter, wanted, kept)
        save, tokens = self.save(adapter), self.tokens(adapter)
        head_paths = tuple(self.save_paths(heads))
        save += tuple(p for p in head_paths if p not in save)
        self.check_saved(adapter, sites, save)
        if conflict := set(save) & {p for p, _ in tokens}:
            raise self.error(f"`{min(conflict)}` is both saved whole and token-trained; "
                             "choose `save` or `tokens`", adapter)
        params = sum(s.params for s in sites) + self.extra_params(adapter, sites, save, tokens)
        self.check_size(adapter, params)
        return AdapterPlan(_with_heads(adapter, heads), sites, save, tokens, params, head_paths)

    def check_size(self, adapter: Adapter, params: int) -> None:
        """Refuse, before anything is allocated, an adapter larger than this machine's memory
        (a typo like r=1000000000 would otherwise allocate until killed, or crash in C++)."""
        need, have = params * 4, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # fp32
        if need > have:
            rank = methods.config_of(adapter.method).rank_field
            at = next((o for o in adapter.options if o.name == rank), adapter)
            raise self.error(f"adapter `{adapter.name}` needs {params:,} trainable parameters "
                             f"({need / 2**30:,.1f} GiB in float32), more than this machine's "
                             f"{have / 2**30:,.1f} GiB of memory", at, hint="is the rank a typo?")

    def targets(self, adapter: Adapter, task_type) -> dict[str, Target | None]:
        """Targeted path -> the first rule selecting it (None: default placement), model order."""
        rules = adapter.rules_of(Target)
        if not rules:
            return self.default_targets(adapter)
        found: dict[str, Target | None] = {}
        for rule in rules:
            paths = self.resolver.select(rule.selection, task_type=task_type)
            params = self.resolver.select_parameters(rule.selection)
            if not paths and not params:
                raise self.no_match(rule, task_type)
            if params and methods.config_of(adapter.method).field("target_parameters") is None:
                raise self.error(f"`{self.text(rule, 'target')}` selects bare parameters, which only "
                                 f"LoRA adapts (target_parameters); {adapter.method} cannot", rule)
            self.picked.update((p, rule) for p in params if p not in self.picked)
            self.note_dead_atoms(adapter, rule, task_type)
            for p in paths:
                found.setdefault(p, rule)
        order = {p: i for i, p in enumerate(self.resolver.paths)}
        return dict(sorted(found.items(), key=lambda item: order[item[0]]))

    def default_targets(self, adapter: Adapter) -> dict[str, Target | None]:
        selection = _default_selection(adapter.method, self.resolver.model)
        hint = "add a `target` rule (names, types or all-linear)"
        if not selection.include:
            raise self.error(f"adapter `{adapter.name}` has no target rule, and {adapter.method} has "
                             "no classic placement", adapter, hint=hint)
        paths = self.resolver.select(selection)
        text = ", ".join(describe(a) for a in selection.include)
        if not paths:
            raise self.error(f"adapter `{adapter.name}` has no target rule and the default "
                             f"placement ({text}) found no module in this model", adapter, hint=hint)
        return dict.fromkeys(paths)

    def no_match(self, rule: Target, task_type) -> PlanError:
        sel = self.resolver
        text = self.text(rule, "target " + ", ".join(describe(a) for a in rule.selection.include))
        within = rule.selection.within
        if within is not None and within not in sel.modules:
            near = closest_paths(within, sel)
            return self.error(f"`within {within}`: the model has no module at this path",
                              rule, hint=did_you_mean(near))
        loose = Selection(rule.selection.include)
        if rule.selection.include and sel.select(loose, task_type=task_type):
            return self.error(f"`{text}` matches modules, but none inside its restrictions "
                              f"({_restrictions(rule.selection, sel)})", rule)
        near = [n for a in rule.selection.include for n in closest(a, sel)]
        what = "parameter" if any(isinstance(a, Param) for a in rule.selection.include) else "module"
        return self.error(f"`{text}` matches no {what} of `{type(sel.model).__name__}`", rule,
                          hint=did_you_mean(list(dict.fromkeys(near))))

    def note_dead_atoms(self, adapter: Adapter, rule: Target, task_type) -> None:
        atoms = rule.selection.include
        for atom in atoms if len(atoms) > 1 else ():
            if not self.resolver.atom(atom, task_type=task_type) and not self.resolver.param_atom(atom):
                self.unmatched.append(Unmatched(adapter.name, "target", describe(atom),
                                                _location(atom) or _location(rule)))

    def select(self, adapter: Adapter, rule, kind: str, task_type) -> set[str]:
        """A non-target rule's selection; one that matches nothing is recorded as unmatched."""
        paths = set(self.resolver.select(rule.selection, task_type=task_type))
        if not paths:
            self.note(adapter, rule, kind)
        return paths

    def note(self, adapter: Adapter, rule, kind: str) -> None:
        if isinstance(rule, Save):
            fallback = "save " + ", ".join(rule.names)
        else:
            value = f" {rule.value:g} on" if isinstance(rule, (Rank, Alpha)) else ""
            fallback = f"{kind}{value} " + ", ".join(describe(a) for a in rule.selection.include)
        self.unmatched.append(Unmatched(adapter.name, kind, self.text(rule, fallback), _location(rule)))

    def sites(self, adapter: Adapter, kept: dict[str, Target | None], task_type) -> tuple[Site, ...]:
        """One Site per kept path, with the method's per-site values (rank and alpha after the
        `rank`/`alpha` rules, its scaling and the options its layer part reads)."""
        config = methods.config_of(adapter.method)
        runtime = methods.runtime_of(adapter.method)
        ranks = self.patterns(adapter, Rank, "rank", kept, task_type)
        alphas = self.patterns(adapter, Alpha, "alpha", kept, task_type)
        self.values = {"rank": ranks, "alpha": alphas}  # parameter sites read theirs here
        r0 = adapter.option(config.rank_field) if config.rank_field else 0
        alpha0 = adapter.option(config.alpha_field) if config.alpha_field else 0
        base = {n: adapter.option(n) for n in config.site_options}
        classic = _default_selection(adapter.method, self.resolver.model)
        default = "default(" + ", ".join(map(describe, classic.include)) + ")"
        where = {id(r): _location(r) for r in adapter.rules_of(Target)}
        flags = self.flags(adapter, config, kept, task_type)
        out = []
        for path, rule in kept.items():
            module = self.resolver.modules[path]
            kind = whole_kind_of(module) if config.whole_modules else kind_of(module)
            if kind is None:
                raise unsupported(path, module, rule.span if rule else adapter.span, self.source)
            if dead := never_runs(self.resolver.model, path):  # warns of fast paths too
                raise self.error(f"`{path}` {dead[0]}", rule or adapter, hint=dead[1])
            if (why := liveness.refusal(self.resolver, path)) is not None:
                raise self.error(f"`{path}` {why[0]}", rule or adapter, hint=why[1])
            options = config.site_options_for(
                kind, {**base, **{name: path in paths for name, paths in flags.items()}})
            if problem := config.site_problem(kind, options):
                raise self.error(f"`{path}` {problem}", adapter)
            r, alpha = ranks.get(path, r0), alphas.get(path, alpha0)
            site = Site(
                path=path, kind=kind, method=adapter.method, adapter=adapter.name, r=r,
                alpha=float(alpha), scaling=config.scaling(alpha, r, options) if r else 1.0,
                options=tuple(sorted(options.items())), rule=where[id(rule)] if rule else default,
            )
            if problem := _module_problem(runtime, module, site):
                raise self.error(f"`{path}` {problem}", rule or adapter)
            out.append(replace(site, params=runtime.num_params(module, site)))
        liveness.warn_unreached(self.resolver, adapter.name, [s.path for s in out])
        return tuple(out)

    def parameter_sites(self, adapter: Adapter, wanted: tuple[str, ...], kept) -> tuple[Site, ...]:
        """One Site per parameter `target_parameters` or a `param`/`@moe` rule selects, with
        `rank`/`alpha` rules applied by parameter path (surgeon.planning.parameters)."""
        if not wanted:
            return ()
        return parameters.planned_sites(self, adapter, wanted, set(kept), self.values)

    def flags(self, adapter: Adapter, config, kept, task_type) -> dict[str, set[str]]:
        """Site option -> the kept paths its flag rules select (`MethodConfig.flag_rules`, such
        as IA3's `feedforward`; the classic placement brings its default roles); a rule
        selecting no kept path is recorded as unmatched."""
        out: dict[str, set[str]] = {}
        for kind, option, roles in config.flag_rules:
            classic = roles and not adapter.rules_of(Target)
            out[option] = set(self.resolver.select(Selection(tuple(map(RoleRef, roles))))) & \
                set(kept) if classic else set()
            for rule in (r for r in adapter.rules if type(r).__name__.lower() == kind):
                hits = set(self.resolver.select(rule.selection, task_type=task_type)) & set(kept)
                if not hits:
                    self.note(adapter, rule, kind)
                out[option] |= hits
        return out

    def patterns(self, adapter: Adapter, kind: type, name: str, kept, task_type) -> dict[str, Any]:
        """Per-path value of `rank`/`alpha` rules: most specific (fewest sites) wins, then later.
        Planned parameter paths (`self.keys`) count as sites too, matched as PEFT matches
        rank_pattern keys against them (surgeon.planning.select.Resolver.select_parameters)."""
        best: dict[str, tuple[tuple[int, int], Any]] = {}
        for order, rule in enumerate(adapter.rules_of(kind)):
            hits = [p for p in self.resolver.select(rule.selection, task_type=task_type) if p in kept]
            if self.keys:
                hits += self.resolver.select_parameters(rule.selection, keys=self.keys)
            if not hits:
                self.note(adapter, rule, name)
            key = (len(hits), -order)
            for p in hits:
                if p not in best or key < best[p][0]:
                    best[p] = (key, rule.value)
        return {p: value for p, (_, value) in best.items()}


def _with_heads(adapter: Adapter, heads: tuple[str, ...]) -> Adapter:
    """`adapter` with a `save` rule for the task-head names its rules lack: PEFT appends them to
    the config it trains with and writes, so adapter_config.json must list them too."""
    stated = {n for rule in adapter.rules_of(Save) for n in rule.names}
    missing = tuple(n for n in heads if n not in stated)
    return replace(adapter, rules=adapter.rules + (Save(missing),)) if missing else adapter


def _under_saved(path: str, names: tuple[str, ...]) -> bool:
    """PEFT never adapts a module_to_save nor anything inside one (whole dot segments)."""
    return any(path == n or path.endswith("." + n) or path.startswith(n + ".") or f".{n}." in path
               for n in names)


def _module_problem(runtime, module: nn.Module, site: Site) -> str | None:
    """Why the method cannot adapt this very module (its sizes: GraLoRA's k must divide
    them), from the runtime's optional `module_problem` (`surgeon.runtime.method`)."""
    check = getattr(runtime, "module_problem", None)
    return None if check is None else check(module, site)


def _default_selection(method: str, model: nn.Module) -> Selection:
    """The method's classic placement (LoRA: Hu et al.'s query and value projections), by role
    instead of PEFT's per-architecture name tables; a method no role places (LN tuning's norms)
    takes PEFT's names for the model's type (`MethodConfig.default_names`)."""
    config = methods.config_of(method)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = dict(config.default_names).get(model_type)
    if names is not None:
        return Selection(tuple(Name(n) for n in names))
    return Selection(tuple(RoleRef(role) for role in config.default_targets))


def _restrictions(selection: Selection, resolver: Resolver) -> str:
    parts = []
    if selection.within is not None:
        parts.append(f"within `{selection.within}`")
    if selection.layers is not None:
        stacks = resolver.layers_of(selection.layers.pattern).sizes
        listed = ", ".join(f"`{s or '<root>'}` has {n}" for s, n in stacks.items()) or "none found"
        parts.append(f"layers: {listed}")
    return "; ".join(parts)
