"""A `Site`: one module of the host model that receives one adapter.

The Site is the contract between the planner (which decides *what* to adapt) and the lowering
(methods, adapted modules and passes, which decide *how*). It is plain data: no torch, no spec
objects, so a Plan can be printed, serialised to JSON and compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Site:
    """One adapter on one module, with every hyperparameter already resolved."""

    path: str  # dotted module path in the host model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # one of surgeon.layer_kinds.KINDS
    method: str  # registry key of the method, PEFT's peft_type lower-cased: "lora", "ia3", ...
    adapter: str  # adapter name, "default" unless the spec says otherwise
    # The values of the language's `rank` and `alpha` rules at this site: the method's rank_field
    # and alpha_field (MethodConfig) after the rules, 0 for a method without one (IA3).
    r: int
    alpha: float
    scaling: float  # MethodConfig.scaling(alpha, r, options): what the delta is multiplied by
    options: tuple[tuple[str, Any], ...] = ()  # MethodConfig.site_options by PEFT name, sorted
    rule: str = ""  # "file:line:col" of the rule that selected this site (provenance)
    params: int = 0  # trainable parameters this site adds

    def option(self, name: str, default: Any = None) -> Any:
        """The value of method option `name` (PEFT field name), or `default`."""
        return dict(self.options).get(name, default)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind, "method": self.method, "adapter": self.adapter,
            "r": self.r, "alpha": self.alpha, "scaling": self.scaling,
            "options": {k: v for k, v in self.options}, "rule": self.rule, "params": self.params,
        }
