"""What an adapter trains and saves beyond its sites: modules_to_save, token rows, biases.

PEFT resolves these differently from target modules (plain `endswith` on every path, shared
modules under each of their names), so they live apart from the target selection. A mixin of
the planner: it reads `self.resolver` and reports through `self.error` and `self.note`.
"""

from __future__ import annotations

from functools import cached_property

from torch import nn

from surgeon import methods
from surgeon.lang.spec import Adapter, Save, Tokens
from surgeon.layer_kinds import input_embedding, kind_of
from surgeon.planning.select import closest_paths, did_you_mean
from surgeon.planning.site import Site


class SavedAndTokens:
    """modules_to_save and trainable token rows, resolved and counted as PEFT does."""

    def save(self, adapter: Adapter) -> tuple[str, ...]:
        """modules_to_save resolved as PEFT's `_set_trainable` does (plain `endswith`)."""
        found: list[str] = []
        for rule in adapter.rules_of(Save):
            hits = self.save_paths(rule.names)
            if not hits:
                self.note(adapter, rule, "save")
            for p in hits:  # PEFT's ModulesToSaveWrapper refuses containers without a forward
                module = self.resolver.model.get_submodule(p)
                if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
                    raise self.error(f"`save` cannot keep `{p}` ({type(module).__name__}): it has no "
                                     "forward of its own; save the modules inside it", rule)
            found += hits
        found = list(dict.fromkeys(found))
        if nested := next(((o, i) for o in found for i in found if i.startswith(o + ".")), None):
            raise self.error(f"`save` selects `{nested[0]}` and `{nested[1]}` inside it: PEFT then "
                             "wraps the inner one again inside the saved copy and the original, a "
                             "layout surgeon does not reproduce", adapter.rules_of(Save)[0],
                             hint="give `save` names that select only one of them")
        return tuple(found)

    def save_paths(self, names: tuple[str, ...]) -> list[str]:
        """Paths PEFT wraps for modules_to_save `names`: every path (shared modules under each of
        their names) ending with one of them, as plain strings. A task head the model lacks
        (`score` on BERT) matches nothing, silently, as in PEFT."""
        return [p for p in self.all_paths if any(p.endswith(n) for n in names)]

    def check_saved(self, adapter: Adapter, sites: tuple[Site, ...], save: tuple[str, ...]) -> None:
        """A saved module must not be, nor contain, an adapted one. PEFT raises for the former
        and silently copies adapter layers into the saved copy for the latter (reachable when a
        `save` name is a plain suffix like `lp` of `mlp`, or through a module shared by two paths).
        """
        model = self.resolver.model
        adapted = {id(self.resolver.modules[s.path]): s.path for s in sites}
        for path in save:
            inside = next((adapted[id(m)] for m in model.get_submodule(path).modules()
                           if id(m) in adapted), None)
            if inside is not None:
                what = "is" if inside == path else f"contains `{inside}`, which is"
                raise self.error(
                    f"saved module `{path}` {what} also adapted: `save` names match by plain suffix "
                    "(as PEFT's modules_to_save), targets by whole segments",
                    adapter.rules_of(Save)[0], hint="give `save` a longer name or exclude those targets")

    def tokens(self, adapter: Adapter) -> tuple[tuple[str, tuple[int, ...]], ...]:
        out = []
        for rule in adapter.rules_of(Tokens):
            name = rule.module or self.input_embedding()
            hits = [p for p in self.all_paths if p.endswith(name)]
            if not hits:
                raise self.error(f"`tokens {name}`: no module of the model ends with `{name}`", rule,
                                 hint=did_you_mean(closest_paths(name, self.resolver)))
            for p in hits:
                module = self.resolver.model.get_submodule(p)
                if kind_of(module) != "Embedding":
                    raise self.error(f"`tokens` needs an Embedding, `{p}` is not one", rule)
                if bad := [i for i in rule.indices if not -module.num_embeddings <= i < module.num_embeddings]:
                    raise self.error(f"token index {bad[0]} is outside `{p}`'s vocabulary of "
                                     f"{module.num_embeddings:,} rows", rule)
                out.append((p, tuple(rule.indices)))
        return tuple(out)

    @cached_property
    def all_paths(self) -> list[str]:
        """Every path including repeats of shared modules, as PEFT's `_set_trainable` sees them."""
        return [p for p, _ in self.resolver.model.named_modules(remove_duplicate=False) if p]

    def input_embedding(self) -> str:
        model = self.resolver.model
        emb = input_embedding(model)
        if emb is None:
            return "embed_tokens"
        return next((p for p, m in model.named_modules() if m is emb), "embed_tokens")

    def extra_params(self, adapter: Adapter, sites, save, tokens) -> int:
        """Trainable parameters outside the sites: saved copies, token rows, trainable biases."""
        model = self.resolver.model
        # a module reachable under two paths is wrapped once: count each copy once (a saved
        # module inside another is refused by `save`)
        outer = {id(m): m for m in (model.get_submodule(p) for p in save if not _inside(p, save))}
        total = sum(_numel(m) for m in outer.values())
        total += sum(len(ix) * model.get_submodule(p).weight.shape[-1] for p, ix in tokens)
        # trainable tensors shared by the sites (VB-LoRA's vector bank), the runtime's optional
        # `shared_params(sites)` (surgeon.runtime.method)
        shared = getattr(methods.runtime_of(adapter.method), "shared_params", None) if sites else None
        total += shared(sites) if shared is not None else 0
        bias = adapter.option("bias", "none")
        if bias == "all":  # PEFT: every parameter named `bias`, except a saved module's frozen original
            total += sum(p.numel() for n, p in model.named_parameters()
                         if n.rpartition(".")[2] == "bias" and not _inside(n, save))
        elif bias.endswith("_only"):  # lora_only, vera_only, oft_only, ...
            own = (dict(self.resolver.modules[s.path].named_parameters(recurse=False)) for s in sites)
            total += sum(params["bias"].numel() for params in own if "bias" in params)
        return total


def _inside(name: str, roots: tuple[str, ...]) -> bool:
    return any(name.startswith(r + ".") for r in roots)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
