"""LoRA on a bare `nn.Parameter` (PEFT's `target_parameters`), as PEFT 0.21's `lora.ParamWrapper`.

Why a module-level path: the parameter (a transformers 5 MoE expert stack `(experts, d1, d2)`,
or a 2D `(out, in)` matrix) is read by its module's own code, with no Linear to call through.
As PEFT does, the layer wraps the module owning the parameter and calls it with the parameter
replaced by `W + delta` (`torch.func.functional_call`: the base parameter stays untouched and
gradients reach the factors; PEFT registers a parametrization for the call instead).

Factors, as PEFT builds them (`lora_A`/`lora_B` are `nn.Linear`, so the keys are a Linear's):
- 2D `(out, in)`: `A (r, in)`, `B (out, r)`, delta `B @ A`;
- 3D `(E, d1, d2)`: `A (r*E, d2)`, `B (d1, r*E)`; expert e uses rows `e*r:(e+1)*r` of A and
  columns `e::E` of B (PEFT's reshapes), delta[e] `B_e @ A_e`. A module with a true
  `is_transposed` stores `(E, in, out)`: then `A (r*E, d1)`, `B (d2, r*E)`, delta[e] `(B_e @ A_e).T`.

PEFT refuses dropout, fan_in_fan_out, lora_bias and DoRA here (it cannot factor x out of the
weight), and mixed-adapter batches; so does this file.

Several targeted parameters on one module (a transformers 5 MoE's `experts.gate_up_proj` and
`experts.down_proj`): PEFT nests one ParamWrapper per parameter, the first matched innermost,
and surgeon nests adapted layers the same way (`surgeon.runtime.transaction` builds the nest:
one Site per parameter, each layer adapting one parameter). Why real nesting and not one layer
holding several parameters: the state_dict, and so the checkpoint, is then PEFT's by
construction (`experts.lora_A.<a>` for the last parameter, `experts.base_layer.lora_A.<a>` for
the one before, the module at `experts.base_layer.base_layer`), and every model-level walk
(merge, unload innermost first, checkpoint layout, freezing) already handles one layer per
path. Each layer reads its parameter on the host module below the nest (`host`); an outer
layer calls the inner one with its own parameter substituted at `base_layer.<...>.<name>`, so
the host runs with every nested delta applied, as PEFT's stacked parametrizations do. A new
adapter joins the layer adapting the same parameter (PEFT's `find_existing_param_wrapper`; each
layer remembers its parameter as `parameter_name`, as a ParamWrapper does); adapters targeting
different parameter sets are refused, as PEFT refuses them (`transaction._check_parameter_sets`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import LayerView

KIND = "Parameter"
NAME_OPTION = "parameter_name"  # the Site option holding the parameter's name on its module


def host(layer: LayerView) -> nn.Module:
    """The module owning the parameter: below every nested layer (see the module docstring)."""
    base = layer.base_layer
    while isinstance(base, type(layer)):
        base = base.base_layer
    return base


def _key(layer: LayerView) -> str:
    """The parameter's name as `functional_call` on `layer.base_layer` sees it."""
    base, prefix = layer.base_layer, ""
    while isinstance(base, type(layer)):
        base, prefix = base.base_layer, prefix + "base_layer."
    return prefix + _name(layer)


def parameter(layer: LayerView) -> nn.Parameter:
    """The wrapped parameter (of the module, not a copy)."""
    return getattr(host(layer), _name(layer))


def _name(layer: LayerView) -> str:
    return next(iter(layer.sites.values())).option(NAME_OPTION)


def _transposed(base: nn.Module) -> bool:
    return bool(getattr(base, "is_transposed", False))


def shapes(param: torch.Tensor, base: nn.Module) -> tuple[int, int, int]:
    """`(experts, in_features, out_features)` of the LoRA factors, as PEFT derives them."""
    if param.dim() == 2:
        return 1, param.shape[1], param.shape[0]
    if param.dim() != 3:
        raise ValueError(f"lora.ParamWrapper was initialized with {param.dim()} dimensional "
                         "Parameter, but only 2d and 3d are supported.")
    experts, d1, d2 = param.shape
    return (experts, d1, d2) if _transposed(base) else (experts, d2, d1)


def check(site: Site, dropout: float, use_dora: bool, lora_bias: bool) -> None:
    """PEFT's refusals for a ParamWrapper."""
    for bad, what in ((dropout, "lora_dropout != 0"), (site.option("fan_in_fan_out"), "fan_in_fan_out"),
                      (lora_bias, "lora_bias=True"), (use_dora, "use_dora=True")):
        if bad:
            raise ValueError(f"lora.ParamWrapper does not work with {what} (site `{site.path}`, "
                             f"parameter `{site.option(NAME_OPTION)}`).")


def check_same_parameter(layer: LayerView, site: Site) -> None:
    """Every adapter of one layer adapts the same parameter (PEFT: all adapters using
    target_parameters target the same set)."""
    names = {s.option(NAME_OPTION) for s in layer.sites.values()} | {site.option(NAME_OPTION)}
    names |= {layer.__dict__[NAME_OPTION]} if NAME_OPTION in layer.__dict__ else set()
    if len(names) > 1:
        raise ValueError(f"`{site.path}`: all adapters must target the same parameter with "
                         f"target_parameters, got {sorted(names)}.")


def create(layer: LayerView, site: Site) -> None:
    """The factors in PEFT's order (dropout, A, B), so a seeded RNG draws the same numbers."""
    param = getattr(host(layer), site.option(NAME_OPTION))
    experts, n_in, n_out = shapes(param, host(layer))
    a = site.adapter
    # remembered, as PEFT's `ParamWrapper.parameter_name`, when every adapter is deleted
    layer.__dict__[NAME_OPTION] = site.option(NAME_OPTION)
    layer.lora_dropout[a] = nn.Identity()
    layer.lora_A[a] = nn.Linear(n_in, site.r * experts, bias=False)
    layer.lora_B[a] = nn.Linear(site.r * experts, n_out, bias=False)


def move_to_param(layer: LayerView, adapter: str) -> None:
    """PEFT's `_move_adapter_to_device_of_base_layer`: the parameter's device and float dtype."""
    param = parameter(layer)
    dtype = param.dtype if param.dtype.is_floating_point else None
    for name in ("lora_A", "lora_B"):
        layer._modules[name][adapter].to(param.device, dtype)


def num_params(base: nn.Module, site: Site) -> int:
    experts, n_in, n_out = shapes(getattr(base, site.option(NAME_OPTION)), base)
    return site.r * experts * (n_in + n_out)


def _per_expert(layer: LayerView, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B_e, A_e)` stacked per expert: `(E, out, r)` and `(E, r, in)`."""
    param = parameter(layer)
    experts = 1 if param.dim() == 2 else param.shape[0]
    wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    a = wa.reshape(experts, -1, wa.shape[-1])
    b = wb.reshape(wb.shape[0], -1, experts).permute(2, 0, 1)
    return b, a


def delta(layer: LayerView, adapter: str) -> torch.Tensor:
    """PEFT's `get_delta_weight`: the parameter's shape, device and dtype."""
    param = parameter(layer)
    scaling = layer.sites[adapter].scaling
    if param.dim() == 2:
        wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if wb.dtype in (torch.float16, torch.bfloat16):
            out = (wb.float() @ wa.float()) * scaling
        else:
            out = (wb @ wa) * scaling
    else:
        b, a = _per_expert(layer, adapter)
        out = torch.bmm(b, a) * scaling
        if _transposed(host(layer)):
            out = out.transpose(-2, -1)
    return out.to(param.device, param.dtype)


def _substituted(layer: LayerView, adapters: list[str]) -> torch.Tensor:
    """`W + delta` for the call: one adapter on a 3D parameter as PEFT's one `baddbmm` of the
    factors, else the summed deltas."""
    param = parameter(layer)
    if len(adapters) == 1 and param.dim() == 3 and param.shape[0] > 1 \
            and param.dtype not in (torch.float16, torch.bfloat16):
        b, a = _per_expert(layer, adapters[0])
        lhs, rhs = (a.transpose(-2, -1), b.transpose(-2, -1)) if _transposed(host(layer)) \
            else (b, a)
        return torch.baddbmm(param, lhs.to(param.dtype), rhs.to(param.dtype),
                             alpha=layer.sites[adapters[0]].scaling)
    total = None
    for adapter in adapters:
        d = delta(layer, adapter)
        total = d if total is None else total + d
    return param + total


def forward(layer: LayerView, *args: Any, **kwargs: Any) -> Any:
    """The module's call with the parameter replaced by `W + delta` of the active adapters."""
    if "adapter_names" in kwargs or layer.adapter_names is not None:
        raise TypeError("lora.ParamWrapper does not support mixed adapter batches.")
    adapters = layer.lowered_adapters()
    base = layer.base_layer
    if not adapters:
        return base(*args, **kwargs)
    swapped = {_key(layer): _substituted(layer, adapters)}
    return torch.func.functional_call(base, swapped, args, kwargs)


def merge_weights(layer: LayerView, adapters: list[str], safe_merge: bool) -> bool:
    """PEFT's `ParamWrapper.merge`: each not-yet-merged adapter's delta into the parameter."""
    todo = [a for a in adapters if a in layer.sites and a not in layer.merged_adapters]
    param = parameter(layer)
    for adapter in todo:
        with torch.no_grad():
            new = param.detach() + delta(layer, adapter)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} "
                                 "seems to be broken")
            param.copy_(new)
        layer.merged_adapters.append(adapter)
    return bool(todo)


def unmerge_weights(layer: LayerView) -> bool:
    """PEFT's `ParamWrapper.unmerge`: every merged adapter out, newest first."""
    unfolded = bool(layer.merged_adapters)
    param = parameter(layer)
    while layer.merged_adapters:
        adapter = layer.merged_adapters.pop()
        with torch.no_grad():
            param.sub_(delta(layer, adapter))
    return unfolded
