"""A `Site`: one module of the host model that receives one adapter.

The Site is the contract between the planner (which decides *what* to adapt) and the lowering
(methods, adapted modules and passes, which decide *how*). It is plain data: no torch, no spec
objects, so a Plan can be printed, serialised to JSON and compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Base layer kinds a method can adapt, named after the class they stand for.
# "Conv1D" is transformers' fan-in/fan-out Conv1D (GPT-2); "Conv1d" is torch's convolution.
BASE_KINDS = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding")


@dataclass(frozen=True, slots=True)
class Site:
    """One adapter on one module, with every hyperparameter already resolved."""

    path: str  # dotted module path in the host model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # one of BASE_KINDS
    method: str  # registry key of the method, PEFT's peft_type lower-cased: "lora", "ia3", ...
    adapter: str  # adapter name, "default" unless the spec says otherwise
    r: int  # rank (0 for methods without one, e.g. IA3)
    alpha: float  # PEFT's lora_alpha / alpha after rank/alpha patterns
    scaling: float  # the factor the method multiplies its delta by (alpha/r, alpha/sqrt(r), ...)
    options: tuple[tuple[str, Any], ...] = ()  # method options by PEFT field name, sorted
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
