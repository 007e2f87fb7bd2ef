"""What planning produces, as plain data: `Plan` (every site of every adapter), `AdapterPlan`
(what one adapter does besides its sites) and `Unmatched` (rules that selected nothing).
Printable (`str(plan)`, see render.py) and JSON-able (`to_json`), so `surgeon plan` can show a
plan and the runtime and the PEFT format can consume it without asking the spec again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgeon.lang.spec import Adapter, to_python
from surgeon.planning.site import Site


@dataclass(frozen=True, slots=True)
class Unmatched:
    """A rule (or one selector of a target rule) that selected nothing: a warning, not an error."""

    adapter: str
    rule: str  # "target", "exclude", "rank", "alpha" or "save"
    text: str  # the rule as written (for one selector of a target rule: that selector)
    location: str  # "file:line:col", "" for a spec built in Python

    def to_json(self) -> dict[str, str]:
        return {"adapter": self.adapter, "rule": self.rule, "text": self.text, "location": self.location}


@dataclass(frozen=True, slots=True)
class AdapterPlan:
    """What one adapter does to this model besides its sites."""

    adapter: Adapter  # the spec's adapter, plus a `save` rule for the task heads PEFT adds
    sites: tuple[Site, ...]  # its sites, in model order
    save: tuple[str, ...]  # module paths trained and saved whole (PEFT modules_to_save)
    tokens: tuple[tuple[str, tuple[int, ...]], ...]  # (embedding path, trainable token rows)
    params: int  # trainable parameters: sites + saved copies + token rows + trainable biases
    heads: tuple[str, ...] = ()  # paths in `save` that task_type saves (PEFT's task models add them)

    @property
    def name(self) -> str:
        return self.adapter.name

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "method": self.adapter.method,
            "options": {o.name: to_python(o.value) for o in self.adapter.options},
            "save": list(self.save), "task_heads": list(self.heads),
            "tokens": {p: list(ix) for p, ix in self.tokens},
            "sites": len(self.sites), "params": self.params,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """Every site of every adapter, with resolved hyperparameters and provenance."""

    sites: tuple[Site, ...]  # one per adapter per module, adapters in spec order
    adapters: tuple[AdapterPlan, ...]  # per-adapter facts, in spec order
    unmatched: tuple[Unmatched, ...]  # rules that selected nothing (warnings)
    trainable_params: int  # parameters training will update, all adapters together
    model_params: int  # parameters of the model as given

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.model_params if self.model_params else 0.0

    def adapter(self, name: str) -> AdapterPlan:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)

    def paths(self, adapter: str | None = None) -> tuple[str, ...]:
        """Module paths with a site (of `adapter`, or of any adapter), in plan order, unique."""
        found = (s.path for s in self.sites if adapter is None or s.adapter == adapter)
        return tuple(dict.fromkeys(found))

    def __str__(self) -> str:
        from surgeon.planning.render import render_plan

        return render_plan(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": [s.to_json() for s in self.sites],
            "adapters": [a.to_json() for a in self.adapters],
            "unmatched": [u.to_json() for u in self.unmatched],
            "trainable_params": self.trainable_params, "model_params": self.model_params,
            "trainable_percent": self.trainable_percent,
        }
