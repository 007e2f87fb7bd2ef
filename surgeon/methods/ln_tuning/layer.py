"""LN tuning: PEFT 0.21's `peft.tuners.ln_tuning`, each adapter a trained copy of the module.

`add` deep-copies the base module into `ln_tuning_layers[adapter]` (PEFT's `update_layer`), so
state_dict and checkpoint keys are PEFT's (`<path>.ln_tuning_layers.<adapter>.weight` in memory,
`<path>.ln_tuning_layers.weight` saved) and initialisation is the base's values, exactly.

Forward: the layer is a whole-module kind ("Norm"/"Module", `surgeon.layer_kinds`), never
lowered to a graph: the module itself is the computation, so the forward calls the one active
adapter's copy with the call's own arguments (a norm may take more than `x`), or the base module
when adapters are disabled, merged or none is active here. There is nothing to fuse and no delta:
one module call, as PEFT's. Several active adapters raise at forward, as PEFT's layer does;
mixed-adapter batches (`adapter_names`) are refused (PEFT's LN tuning has no such forward: it
ignores the argument and runs the active adapter for every row).

Merge is PEFT's swap: the merged adapter's copy becomes `base_layer` and the original module
waits in `ln_tuning_layers[adapter]` until unmerge swaps them back; one adapter at a time.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from surgeon.errors import UserError

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView


class MixedBatchError(UserError, ValueError):
    """PEFT's LN tuning layers take no `adapter_names` (one adapter per batch row)."""


class LnTuningError(UserError, ValueError):
    """What PEFT's LNTuningLayer refuses: several adapters at once, a module with nothing to tune."""


class LnTuning:
    """The `ln_tuning` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "ln_tuning"
    containers = (("ln_tuning_layers", nn.ModuleDict),)
    autocast_adapters = False  # PEFT keeps the copies in the base dtype (`_cast_adapter_dtype`)

    def add(self, layer: LayerView, site: Site) -> None:
        if next(layer.base_layer.parameters(), None) is None:
            raise LnTuningError(f"`{site.path}` ({type(layer.base_layer).__name__}) has no "
                                "parameters: LN tuning would train nothing there")
        layer.ln_tuning_layers[site.adapter] = copy.deepcopy(layer.base_layer)

    def remove(self, layer: LayerView, adapter: str) -> None:
        if adapter in layer.ln_tuning_layers:
            del layer.ln_tuning_layers[adapter]

    def num_params(self, base: nn.Module, site: Site) -> int:
        return sum(p.numel() for p in base.parameters())

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise MixedBatchError(
            f"`adapter_names` (one adapter per batch row) is not supported by LN tuning adapters "
            f"(`{layer.path}`): PEFT ignores it and runs the active adapter for every row; run "
            "one adapter per batch with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        return prev  # never lowered: `forward_module` calls the module (module docstring)

    # ------------------------------------------------------------------ the whole-module kind
    def forward_module(self, layer: LayerView, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop("adapter_names", None)
        if names is not None or layer.adapter_names is not None:
            self.check_mixed(layer, next(iter(layer.sites)))
        if layer.disable_adapters or layer.merged_adapters or not layer.active_adapters:
            return layer.base_layer(x, *args, **kwargs)
        if len(layer.active_adapters) != 1:
            raise LnTuningError(
                f"Trying to run forward with {len(layer.active_adapters)} active adapters, but LN "
                "tuning does not allow inference with more than one adapter at a time")
        active = layer.active_adapters[0]
        # an adapter absent from this layer adds nothing here (PEFT's layer raises KeyError)
        module = layer.ln_tuning_layers[active] if active in layer.sites else layer.base_layer
        return module(x, *args, **kwargs)

    def merge_module(self, layer: LayerView, adapters: list[str], safe_merge: bool) -> bool:
        """PEFT's merge: swap the adapter's copy in as the base module (one adapter only)."""
        todo = [a for a in adapters if a in layer.sites and a not in layer.merged_adapters]
        if not todo:
            return False
        if len(todo) > 1:
            raise LnTuningError(f"Trying to merge {len(todo)} adapters, but LN tuning does not "
                                "allow merging more than one adapter at a time")
        if layer.merged_adapters:
            warnings.warn(f"Already merged with {set(layer.merged_adapters)}. Unmerging first.",
                          stacklevel=4)
            self.unmerge_module(layer)
        _swap(layer, todo[0])
        layer.merged_adapters.append(todo[0])
        return True

    def unmerge_module(self, layer: LayerView) -> bool:
        """PEFT's unmerge: swap the original module back."""
        if not layer.merged_adapters:
            return False
        _swap(layer, layer.merged_adapters.pop())
        return True

    # --------------------------------------------------- the weight-merge protocol: none here
    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        raise LnTuningError("LN tuning has no delta weight: an adapter is a copy of the module")

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        raise LnTuningError("LN tuning merges by swapping modules (`merge_module`)")

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        raise LnTuningError("LN tuning unmerges by swapping modules (`unmerge_module`)")

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None

    def clear_caches(self, layer: LayerView) -> None:
        pass


def _swap(layer: LayerView, adapter: str) -> None:
    """Exchange `base_layer` and the adapter's module, as PEFT's merge and unmerge do."""
    base, copied = layer.base_layer, layer.ln_tuning_layers[adapter]
    layer.base_layer, layer.ln_tuning_layers[adapter] = copied, base


METHOD = LnTuning()
