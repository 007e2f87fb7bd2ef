"""Resolve selectors against a model's module tree, with PEFT 0.21's matching semantics.

Which modules a `Selection` names, as a set of dotted paths from `model.named_modules()` (PEFT's
key list, so a submodule reused under two parents is seen once, under its first path).

    Name       path == name or path ends with "." + name      (PEFT list target_modules)
    Regex      re.fullmatch(pattern, path), time-bounded          (PEFT str target_modules)
    Glob       fnmatch per dot segment, whole path or a suffix of segments
    ModuleType a class of that name in the module's MRO (isinstance by class name)
    AllLinear  nn.Linear and transformers Conv1D, minus the output head (PEFT's all-linear)
    RoleRef    the role inferred from the dataflow graph (surgeon.capture.infer, only when used)
    within     the subtree at that path;  layers[...]  see surgeon.planning.layers;  except  difference

Name, type and layer selectors read only the module tree, so planning them costs no capture.
"""

from __future__ import annotations

import difflib
import warnings
from fnmatch import fnmatchcase
from functools import cached_property

from torch import nn

from surgeon.capture.names import PARAMETER_ROLES, role_matches
from surgeon.errors import UserError
from surgeon.lang.diagnostics import Diagnostic, error, render_one
from surgeon.lang.matching import RegexTooSlow, full_matches
from surgeon.lang.spec import (
    NO_SPAN,
    AllLinear,
    Atom,
    Glob,
    Layers,
    ModuleType,
    Name,
    Param,
    Regex,
    RoleRef,
    Selection,
    Span,
)
from surgeon.layer_kinds import (
    ANY_MODULE_KINDS,
    KINDS,
    LINEAR_KINDS,
    is_transformers_model,
    kind_of,
    output_embedding,
)
from surgeon.planning.layers import LayerMap, pattern_layers, structural_layers


class PlanError(UserError, ValueError):
    """A spec that cannot be planned on this model, located at the rule that caused it.

    `str()` is the language's diagnostic rendering (`file:line:col: error: ...`, the source line
    with a caret under the span, a hint) when the spec's text is known; `diagnostic` is the same
    as a `surgeon.lang.diagnostics.Diagnostic`, so tools can treat it like a SpecError's.
    """

    rendered = True

    def __init__(self, message: str, span: Span | None = None, *, hint: str = "", source: str = ""):
        self.message, self.span, self.hint, self.source = message, span, hint, source
        super().__init__(self.render())

    def __reduce__(self):
        return (_rebuild, (self.message, self.span, self.hint, self.source))

    @property
    def location(self) -> str:
        return self.span.location() if self.span is not None and self.span != NO_SPAN else ""

    @property
    def diagnostic(self) -> Diagnostic | None:
        return error(self.span, self.message, hint=self.hint or None) if self.location else None

    def render(self) -> str:
        if self.diagnostic is not None and self.source and self.span.end <= len(self.source):
            return render_one(self.diagnostic, self.source)
        head = f"{self.location}: error: {self.message}" if self.location else f"error: {self.message}"
        return head + (f"\n    hint: {self.hint}" if self.hint else "")


def _rebuild(message: str, span: Span | None, hint: str, source: str) -> PlanError:
    return PlanError(message, span, hint=hint, source=source)


def describe(atom: Atom) -> str:
    """An atom as `.peft` text, for messages."""
    if isinstance(atom, Name):
        return atom.pattern
    if isinstance(atom, Glob):
        return f'"{atom.pattern}"'
    if isinstance(atom, Regex):
        return f"/{atom.pattern}/"
    if isinstance(atom, ModuleType):
        return atom.name
    if isinstance(atom, RoleRef):
        return f"@{atom.role}"
    if isinstance(atom, Param):
        return f"param {atom.name}"
    return "all-linear"


def unsupported(path: str, module: nn.Module, span: Span | None = None, source: str = "") -> PlanError:
    """PEFT raises too when a target is no adaptable layer (e.g. a name matching a container)."""
    container = next(module.children(), None) is not None
    # bare parameters: target_parameters; whole modules: methods with `whole_modules` only
    kinds = ", ".join(k for k in KINDS if k != "Parameter" and k not in ANY_MODULE_KINDS)
    return PlanError(
        f"`{path}` ({type(module).__name__}) cannot be adapted; supported kinds: {kinds}",
        span, source=source,
        hint="it contains other modules: select its projections instead" if container else
        "to adapt one of its parameters, use LoRA's target_parameters=[\"<path>.<name>\"]",
    )


def never_runs(model: nn.Module, path: str) -> tuple[str, str] | None:
    """(why, hint) when an adapter at `path` could never run: its parent reads the module's
    weight directly instead of calling it (a MultiheadAttention's out_proj; PEFT adapts it and
    silently ignores it, as its own MultiheadAttention docstring warns). Warns when a fast path
    may skip it: nn.TransformerEncoderLayer's inference path (eval mode, batch_first, frozen
    weights or no grad) hands `linear1/2.weight` and the attention's weights to one fused
    kernel, in PEFT too; whether it runs is decided per call, so a warning, not a refusal."""
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent)
    if name == "out_proj" and isinstance(owner, nn.MultiheadAttention):
        why = ("is the out_proj of a MultiheadAttention, which reads `out_proj.weight` directly "
               "and never calls the module: an adapter there would never run")
        hint = (f"target the MultiheadAttention `{parent}` itself: LoRA then adapts its in_proj "
                f"and out_proj, as PEFT does; or exclude this one (`except {name}` or "
                f"`exclude {path}`)")
        return why, hint
    if name in ("linear1", "linear2", "self_attn") and isinstance(owner, nn.TransformerEncoderLayer):
        warnings.warn(
            f"`{path}` is inside a TransformerEncoderLayer whose inference fast path (eval mode, "
            "batch_first, frozen weights or no grad) reads its weight directly: the adapter is "
            "skipped there, as in PEFT. Call `torch.backends.mha.set_fastpath_enabled(False)` "
            "to apply it in eval mode.", UserWarning, stacklevel=5)
    return None


# --------------------------------------------------------------------------- resolver


class Resolver:
    """One model's module tree, with the derived views selectors need, built on first use."""

    def __init__(self, model: nn.Module, *, example_inputs=None, source: str = ""):
        self.model = model
        self.example_inputs = example_inputs
        self.source = source  # the spec's text, for located errors
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.modules.pop("", None)  # the root is never a target (PEFT skips the empty key)
        self.paths: tuple[str, ...] = tuple(self.modules)
        self._by_pattern: dict[tuple[str, ...], LayerMap] = {}
        self._atoms: dict[tuple[Atom, str | None], frozenset[str]] = {}

    @cached_property
    def layers(self) -> LayerMap:
        return structural_layers(self.model.named_modules())

    def layers_of(self, pattern: tuple[str, ...]) -> LayerMap:
        if not pattern:
            return self.layers
        if pattern not in self._by_pattern:
            self._by_pattern[pattern] = pattern_layers(self.paths, pattern)
        return self._by_pattern[pattern]

    @cached_property
    def analysis(self):
        """Roles of layers and expert stacks, and reach, from one capture (only when a role
        selector needs it: capture is costly)."""
        from surgeon.capture.infer import analyse

        try:
            return analyse(self.model, example_inputs=self.example_inputs)
        except Exception as error:
            error.add_note("roles were needed by a role selector (`@...`); name, type, layer and "
                           "all-linear selectors work from the module tree alone")
            raise

    @cached_property
    def roles(self) -> dict[str, str]:
        return {p: role for p, role in self.analysis.roles.items() if p in self.modules}

    def unreached(self, path: str) -> tuple[str, bool] | None:
        """(why, certain) when the captured forward never calls `path` (surgeon.capture.reach).
        Only when a role selector already made a capture: a plan by names alone is unchecked."""
        return self.analysis.unreached.get(path) if "analysis" in self.__dict__ else None

    @cached_property
    def parameters(self) -> tuple[str, ...]:
        """Every parameter path (owner path + name, each owner once), PEFT's matching order."""
        return tuple(f"{p}.{n}" if p else n for p, m in self.model.named_modules()
                     for n, _ in m.named_parameters(recurse=False))

    def select_parameters(self, selection: Selection, *, keys: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Parameter paths `selection` names: its `param` atoms and the roles of expert stacks
        (`@moe.up`), within its `within`/`layers` restrictions (by the owning module), minus the
        parameters its `except` atoms select and those of the modules they select.

        With `keys` (the planned parameter paths, for `rank`/`alpha` rules), names, globs and
        regexes match them too, as PEFT matches rank_pattern keys against a parameter's path,
        and a bare layer restriction selects those in its layers."""
        pool = keys or self.parameters
        if not selection.include:
            chosen = set(keys)
        else:
            chosen = set().union(*(self.param_atom(a, pool, names=bool(keys)) for a in selection.include))
        owners = {p: p.rpartition(".")[0] for p in chosen}
        if selection.within is not None:
            chosen = {p for p in chosen if owners[p] in self.subtree(selection.within)}
        if selection.layers is not None:
            chosen = {p for p in chosen if owners[p] in self.in_layers(selection.layers)}
        for atom in selection.exclude:
            gone = self.atom(atom)
            chosen = {p for p in chosen if owners[p] not in gone} - self.param_atom(atom, pool)
        return tuple(p for p in pool if p in chosen)

    def param_atom(self, atom: Atom, pool: tuple[str, ...] = (), names: bool = False) -> set[str]:
        """Parameter paths of `pool` (default: all) one atom names; module selectors (names,
        globs, regexes) only with `names`, for rank/alpha rules."""
        pool = pool or self.parameters
        if isinstance(atom, Param) or (names and isinstance(atom, Name)):
            name = atom.name if isinstance(atom, Param) else atom.pattern
            return {p for p in pool if p == name or p.endswith("." + name)}
        if isinstance(atom, RoleRef) and _may_name_parameters(atom.role):
            roles = self.analysis.parameters
            return {p for p in pool if p in roles and role_matches(atom.role, roles[p])}
        if names and isinstance(atom, Glob):
            return {p for p in pool if glob_matches(atom.pattern, p)}
        if names and isinstance(atom, Regex):
            return set(full_matches(atom.pattern, pool))
        return set()

    def select(self, selection: Selection, *, task_type: str | None = None) -> tuple[str, ...]:
        """Paths `selection` names, in model order: (∪ include) ∩ within ∩ layers − except."""
        if selection.include:
            chosen = set().union(*(self.atom(a, task_type=task_type) for a in selection.include))
        else:  # a bare restriction (`alpha 8 on layers[-2:]`) selects everything it allows
            chosen = set(self.paths)
        if selection.within is not None:
            chosen &= self.subtree(selection.within)
        if selection.layers is not None:
            chosen &= self.in_layers(selection.layers)
        for atom in selection.exclude:
            chosen -= self.atom(atom, task_type=task_type)
        self._refuse_uncertain(selection)
        return tuple(p for p in self.paths if p in chosen)

    def _refuse_uncertain(self, selection: Selection) -> None:
        """Never guess: a role selector fails when a layer in its scope has an uncertain role
        (read from an incomplete graph), unless `within`/`layers`/`except` leave it out."""
        refs = [a for a in selection.include if isinstance(a, RoleRef)]
        if not refs:
            return
        doubt = {p for p, r in self.roles.items() if getattr(r, "uncertain", "")}
        doubt |= {p.rpartition(".")[0] for p, r in self.analysis.parameters.items()
                  if r.uncertain and any(_may_name_parameters(a.role) for a in refs)}
        if selection.within is not None:
            doubt &= self.subtree(selection.within)
        if selection.layers is not None:
            doubt &= self.in_layers(selection.layers)
        for atom in selection.exclude:
            doubt -= self.atom(atom)
        if doubt:
            first = next(p for p in self.paths if p in doubt)
            why = getattr(self.roles.get(first), "uncertain", "") or next(
                r.uncertain for p, r in self.analysis.parameters.items()
                if p.startswith(first + ".") and r.uncertain)
            raise PlanError(
                f"`{describe(refs[0])}` cannot be resolved with certainty: {len(doubt)} layer(s) in "
                f"its scope have uncertain roles, e.g. `{first}`: {why}",
                refs[0].span, source=self.source,
                hint="pass inputs that reach them (`--input`, `example_inputs=`), leave them out "
                     "with `within`/`except`, or select by name or type")

    def subtree(self, root: str) -> frozenset[str]:
        prefix = root + "."
        return frozenset(p for p in self.paths if p == root or p.startswith(prefix))

    def in_layers(self, layers: Layers) -> frozenset[str]:
        return self.layers_of(layers.pattern).select(layers)

    def atom(self, atom: Atom, *, task_type: str | None = None) -> frozenset[str]:
        """Paths one atom names (before restrictions), memoised: rules often repeat atoms."""
        key = (atom, task_type if isinstance(atom, AllLinear) else None)
        if key not in self._atoms:
            self._atoms[key] = self._match(atom, task_type)
        return self._atoms[key]

    def _match(self, atom: Atom, task_type: str | None) -> frozenset[str]:
        if isinstance(atom, Name):
            name, suffix = atom.pattern, "." + atom.pattern
            return frozenset(p for p in self.paths if p == name or p.endswith(suffix))
        if isinstance(atom, Regex):
            try:
                return frozenset(full_matches(atom.pattern, self.paths))
            except RegexTooSlow as slow:  # located at the selector (a PEFT config's has no span)
                raise PlanError(str(slow), atom.span, source=self.source,
                                hint="a regex runs against every module path") from None
        if isinstance(atom, Glob):
            return frozenset(p for p in self.paths if glob_matches(atom.pattern, p))
        if isinstance(atom, ModuleType):
            return frozenset(p for p, m in self.modules.items()
                             if any(c.__name__ == atom.name for c in type(m).__mro__))
        if isinstance(atom, RoleRef):
            return frozenset(p for p, role in self.roles.items() if role_matches(atom.role, role))
        if isinstance(atom, Param):
            return frozenset()  # selects parameters: select_parameters
        assert isinstance(atom, AllLinear), atom
        return self.all_linear(task_type)

    def all_linear(self, task_type: str | None) -> frozenset[str]:
        """PEFT's `_maybe_include_all_linear_layers`: Linear/Conv1D minus the output layer."""
        found = {p for p, m in self.modules.items() if kind_of(m) in LINEAR_KINDS}
        return frozenset(found - set(self._heads(task_type)))

    def _heads(self, task_type: str | None) -> list[str]:
        if not is_transformers_model(self.model):
            return []
        head = output_embedding(self.model)
        if head is None and task_type == "SEQ_CLS":
            # PEFT's SEQ_CLS_HEAD_NAMES, looked up as attributes of the model
            heads = (getattr(self.model, n, None) for n in ("score", "classifier"))
            head = next((h for h in heads if h is not None), None)
        return [p for p, m in self.modules.items() if m is head][:1] if head is not None else []


def _may_name_parameters(selector: str) -> bool:
    """Whether a role selector may select expert stacks (`@moe`, `@moe.up`, `@moe.down`)."""
    return any(role_matches(selector, r) for r in PARAMETER_ROLES)


def glob_matches(pattern: str, path: str) -> bool:
    """Shell glob per dot segment, against the whole path or its last segments."""
    want, have = pattern.split("."), path.split(".")
    if len(want) > len(have):
        return False
    return all(fnmatchcase(h, w) for h, w in zip(have[len(have) - len(want):], want))


# --------------------------------------------------------------------------- suggestions


def closest(atom: Atom, resolver: Resolver, n: int = 3) -> list[str]:
    """Names in this model that look like what `atom` meant, for "did you mean" hints."""
    if isinstance(atom, (Name, Glob)):
        depth = atom.pattern.count(".") + 1
        pool = {".".join(p.split(".")[-depth:]) for p in resolver.paths}
        return difflib.get_close_matches(atom.pattern, sorted(pool), n=n, cutoff=0.5)
    if isinstance(atom, Regex):
        leaves = sorted({p.rsplit(".", 1)[-1] for p in resolver.paths})
        return difflib.get_close_matches(atom.pattern.rsplit("\\.", 1)[-1], leaves, n=n, cutoff=0.4)
    if isinstance(atom, ModuleType):
        names = sorted({type(m).__name__ for m in resolver.modules.values()})
        return difflib.get_close_matches(atom.name, names, n=n, cutoff=0.5)
    if isinstance(atom, RoleRef):
        return ["@" + r for r in sorted(set(resolver.roles.values()))][: n * 3]
    if isinstance(atom, Param):
        depth = atom.name.count(".") + 1
        pool = {".".join(p.split(".")[-depth:]) for p in resolver.parameters}
        return ["param " + m for m in difflib.get_close_matches(atom.name, sorted(pool), n=n, cutoff=0.5)]
    return []


def closest_paths(path: str, resolver: Resolver, n: int = 3) -> list[str]:
    return difflib.get_close_matches(path, resolver.paths, n=n, cutoff=0.5)


def did_you_mean(names: list[str]) -> str:
    """A hint naming the closest candidates, or nothing when there are none."""
    return "did you mean " + ", ".join(f"`{n}`" for n in names) + "?" if names else ""
