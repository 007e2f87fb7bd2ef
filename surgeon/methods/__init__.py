"""PEFT methods, one file each, behind one small interface; a registry keyed by `peft_type`.

A method owns everything specific to it: the parameter containers it adds to an adapted layer
(named as PEFT names them in memory), their creation and initialisation for each base kind, the
adapter subgraph it contributes to the layer's forward graph, and its merge math. The adapted
layer (`surgeon.modules`) and the passes (`surgeon.passes`) are generic over this interface.

Example:
    >>> from surgeon.methods import get_method
    >>> get_method("lora").containers[0][0]
    'lora_dropout'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

    from surgeon.modules import AdaptedLayer
    from surgeon.modules_graph import Builder
    from surgeon.site import Site

# peft_type (lower case) -> module defining `METHOD`; imported on first use.
METHODS: dict[str, str] = {"lora": "surgeon.methods.lora"}


class Method(Protocol):
    """What the lowering needs from a method."""

    name: str
    # (attribute, container type) created empty on every adapted layer, in PEFT's order.
    containers: tuple[tuple[str, type[nn.Module]], ...]

    def add(self, layer: AdaptedLayer, site: Site) -> None:
        """Create and initialise `site.adapter`'s parameters in `layer`'s containers."""

    def remove(self, layer: AdaptedLayer, adapter: str) -> None:
        """Delete `adapter`'s parameters from `layer`."""

    def num_params(self, base: nn.Module, site: Site) -> int:
        """Trainable parameters `site` adds to `base` (works on the meta device)."""

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        """Emit `adapter`'s branch after result `prev`; return its result node.

        `rows` is None for a whole-batch forward, else the node holding the batch rows that
        use this adapter (mixed-adapter batch).
        """

    def check_mixed(self, layer: AdaptedLayer, adapter: str) -> None:
        """Raise if `adapter` cannot serve rows of a mixed-adapter batch."""

    def delta_weight(self, layer: AdaptedLayer, adapter: str) -> torch.Tensor:
        """The adapter's weight delta in the base weight's layout and dtype (PEFT's)."""

    def fold(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        """Out-major fp32 `weight` with `adapter` merged; `unmerged` is it without any merges."""

    def unfold(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `fold` on an out-major fp32 weight."""

    def bias_delta(self, layer: AdaptedLayer, adapter: str) -> torch.Tensor | None:
        """What merging adds to the base bias (None when the adapter has no bias)."""

    def clear_caches(self, layer: AdaptedLayer) -> None:
        """Forget values cached from the weights (they may have changed unseen)."""


def get_method(name: str) -> Any:
    """The method registered under `name` (PEFT's peft_type, lower case)."""
    if name not in METHODS:
        known = ", ".join(f"`{m}`" for m in sorted(METHODS))
        raise NotImplementedError(f"Method `{name}` cannot be lowered yet; supported: {known}.")
    return importlib.import_module(METHODS[name]).METHOD
