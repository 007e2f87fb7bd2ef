"""What a method's layer part implements: `MethodRuntime`, the interface the runtime calls.

A method (`surgeon/methods/<name>/`) has a torch-free config part and this runtime part. The
runtime part owns everything about its parameters on one adapted layer: the containers it adds
(named as PEFT names them in memory, so state_dict keys match), their creation and
initialisation for each base kind, the branch it contributes to the layer's forward graph, and
its merge math. `surgeon.runtime.adapted.AdaptedLayer`, the passes and the fold step are generic
over it; `surgeon.methods.runtime_of(name)` finds a method's runtime object.

Every method hook receives the layer as a `LayerView` (`surgeon.runtime.graph`): the base layer,
its kind, the sites by adapter, and the method's own containers as attributes. Merge math works
on the *out-major* view of the base weight (`surgeon.runtime.base_kinds`), in at least fp32, so
one formula serves every base kind.

Example (the LoRA runtime):
    >>> from surgeon.methods import runtime_of
    >>> runtime_of("lora").containers[0][0]
    'lora_dropout'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from surgeon.runtime.graph import LayerView

if TYPE_CHECKING:
    from torch import fx

    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder


class MethodRuntime(Protocol):
    """A method's layer part (see the module docstring)."""

    name: str  # the registry key, PEFT's peft_type lower-cased ("lora")
    # (attribute, container type) created empty on every adapted layer, in PEFT's order.
    containers: tuple[tuple[str, type[nn.Module]], ...]

    def add(self, layer: LayerView, site: Site) -> None:
        """Create and initialise `site.adapter`'s parameters in `layer`'s containers."""
        ...

    def remove(self, layer: LayerView, adapter: str) -> None:
        """Delete `adapter`'s parameters from `layer` (whatever `add` created, even partly)."""
        ...

    def num_params(self, base: nn.Module, site: Site) -> int:
        """Trainable parameters `site` adds to `base` (works on the meta device)."""
        ...

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        """Emit `adapter`'s branch after result `prev`; return its result node.

        The output part ends in a result node whose spine (`args[0]` chain) reaches `prev`:
        `b.result(prev, delta)` for `prev + delta`, or `b.as_result(node)` for any other
        transform (IA3's `prev * scale`). A method that changes the base call's input emits an input part
        through `b.before_base()` ending in `input_result(node)` (HRA, OFT); one that changes the
        weight the inlined base call reads emits a weight part through `b.weight_part()` ending
        in `weight_result(node)` (BOFT on Conv2d); a branch with no output part returns `prev`. `rows` is None for a whole-batch forward, else the node holding
        the batch rows that use this adapter (mixed-adapter batch).
        """
        ...

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        """Raise if `adapter` cannot serve rows of a mixed-adapter batch."""
        ...

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """The adapter's weight delta in the base weight's layout and dtype (PEFT's)."""
        ...

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        """Out-major fp32 `weight` with `adapter` merged; `unmerged` is it without any merges."""
        ...

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `fold` on an out-major fp32 weight."""
        ...

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        """What merging adds to the base bias (None when the adapter has no bias)."""
        ...

    def clear_caches(self, layer: LayerView) -> None:
        """Forget values cached from the weights (they may have changed unseen)."""
        ...


# Optional parts of a runtime, read with a default by `surgeon.runtime.fold` (added after the
# protocol's first version, so runtimes written before them keep working):
#   merges_grouped_conv: bool = False  -- its fold handles convolutions with groups > 1.
#   additive_factors(layer, adapter) -> (b, a, scaling) | None  -- `fold` adds exactly
#       `scaling * b @ a` (out-major `b` (out, r), `a` (r, in*k)); then a plain fp32 weight is
#       merged in place with one `addmm_`, no weight-sized temporaries (LoRA; None for DoRA).
#   fold_bias(layer, adapter, bias) -> Tensor | None     -- the merged base bias (given in at
#   unfold_bias(layer, adapter, bias) -> Tensor | None      least fp32), for a merge that is
#                                                          not `bias + bias_delta` (IA3 scales).
#   shared_containers: tuple[str, ...] = ()  -- containers that are ONE module for the whole
#       model (VeRA's projections): `transaction.prepare` gives every new layer of the method
#       the same instance, so each tensor exists once however many layers read it.
#   init_shared(old, adapter, sites, bases) -> dict[str, nn.Module]  -- called once per adapter
#       before its layers are built, with the model's current shared containers (`old`, empty
#       for the first adapter), the adapter's sites and their base modules; returns NEW
#       containers holding the adapter's shared tensors as well (the model's are swapped for
#       them at commit, undoably, so prepare stays read-only).
#   autocast_adapters: bool = True  -- False: its tensors keep the base dtype on half-precision
#       bases (LN tuning's copies of the base module, as PEFT's `_cast_adapter_dtype` skips them).
#   forward_module(layer, x, *args, **kwargs), merge_module(layer, adapters, safe_merge),
#   unmerge_module(layer)  -- the forward and merge of a whole-module kind
#       (`surgeon.layer_kinds.WHOLE_MODULE_KINDS`), which `AdaptedLayer` never lowers.
#   module_problem(base, site) -> str | None  -- why this very base module cannot take the
#       site (its sizes: GraLoRA's gralora_k must divide in and out features); the planner
#       refuses the site at its rule with it, before anything is built (works on meta modules).
#   shared_params(sites) -> int  -- trainable parameters in the shared containers (VB-LoRA's
#       vector bank, a Parameter trained through every layer), counted once per adapter.
#   checkpoint_buffers: tuple[str, ...] = ()  -- containers of non-persistent buffers, one per
#       adapter, that PEFT keeps out of its state_dict but writes to (and reads from) the
#       checkpoint (SHiRA's indices): `surgeon.api` adds them to the state_dict it saves and
#       loads through, under the key a persistent buffer would have.


def checkpoint_buffers(method: MethodRuntime) -> tuple[str, ...]:
    """The method's checkpoint-only containers (optional part `checkpoint_buffers`, default none)."""
    return getattr(method, "checkpoint_buffers", ())


def shared_containers(method: MethodRuntime) -> tuple[str, ...]:
    """The method's model-level containers (optional part `shared_containers`, default none)."""
    return getattr(method, "shared_containers", ())


class MethodLayer(LayerView, Protocol):
    """A `LayerView` whose adapters all belong to one method: what the passes and the fold step
    need (they call the method). `AdaptedLayer` implements it."""

    method: MethodRuntime


def remove_entries(layer: LayerView, containers: tuple[tuple[str, type], ...], adapter: str) -> None:
    """Delete `adapter`'s entry from each of `containers` on `layer` (what most `remove`s do;
    model-level shared containers included, as PEFT's delete_adapter drops them too)."""
    for name, _ in containers:
        table = layer._modules[name]
        if adapter in table:
            del table[adapter]


def base_parameter(value: torch.Tensor, weight: torch.Tensor) -> nn.Parameter:
    """`value` as a Parameter on the base weight's device, in its dtype when that is a float one
    (a quantised base's integer weight keeps the adapter in `value`'s dtype), as PEFT places them."""
    dtype = weight.dtype if weight.dtype.is_floating_point else None
    return nn.Parameter(value.to(weight.device, dtype))


class AdditiveMerge:
    """The merge half of a method whose delta is one out-major matrix added to the weight
    (AdaLoRA, VeRA, ...): subclasses define `_out_major(layer, adapter)`, in at least fp32."""

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        return weight + self._out_major(layer, adapter).to(weight.dtype)

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self._out_major(layer, adapter).to(weight.dtype)

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None

    def clear_caches(self, layer: LayerView) -> None:
        pass
