"""LoRA on `nn.MultiheadAttention`, as PEFT 0.21's `lora.MultiheadAttention`.

Why a module-level path: MultiheadAttention has no Linear to call through. Its q/k/v projection
is the bare parameter `in_proj_weight`, and it reads `out_proj.weight` directly instead of
calling `out_proj`. So, as PEFT does, the adapter covers both halves through the module:

- in_proj: the MHA's adapted layer holds `lora_A` `(r, E)` and `lora_B` `(3E, r)`; its delta is
  added to `in_proj_weight` for the call;
- out_proj: a nested adapted Linear at `<mha>.base_layer.out_proj` (PEFT's nested `lora.Linear`,
  hence its checkpoint keys `<mha>.base_layer.out_proj.lora_A.weight`).

The forward calls the MHA with all its arguments (key, value, masks, need_weights...) and the
two deltas substituted (`torch.func.functional_call`: the base parameters stay untouched and
gradients reach the factors). PEFT merges the weights for the call instead, so, as there,
`lora_dropout` is never applied and a mixed-adapter batch is refused. DoRA, `lora_bias` and
separate q/k/v weights (`_qkv_same_embed_dim=False`) are refused, as PEFT refuses the first
and last (`lora_bias` would be silently ignored by PEFT's merged forward).

Merging folds in_proj here (`merge_weights`); the out_proj half is its own adapted layer and
merges as one. This module imports no runtime class: the nested layer is built with the MHA
layer's own type, so the import graph stays acyclic.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import LayerView

KIND = "MultiheadAttention"
# PEFT 0.21 adds the out_proj delta twice: `MultiheadAttention.merge` writes `W + dW` into
# out_proj and then calls the nested `lora.Linear.merge`, which adds `dW` again (its unmerge
# subtracts both; huggingface/peft#3774, open). Its forward merges for every call, so PEFT-trained
# adapters were trained with `W + 2 dW`: to give their outputs, surgeon does the same. Set to 1
# when PEFT's fix is released.
PEFT_OUT_PROJ_TIMES = 2
OUT_PROJ = "base_layer.out_proj"  # where PEFT nests the out_proj adapter, below the MHA layer


def check(base: nn.Module, site: Site, use_dora: bool, lora_bias: bool) -> None:
    """PEFT's refusals for an MHA target, plus `lora_bias` (see the module docstring)."""
    if not base._qkv_same_embed_dim:
        raise ValueError("Only same embed for query/key/value is supported as of now for "
                         "MultiheadAttention.")
    if use_dora:
        raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora "
                         "to False")
    if lora_bias:
        raise ValueError("lora_bias=True is not supported for MultiheadAttention (PEFT's "
                         f"merged forward ignores it); site `{site.path}`.")
    if not isinstance(base.out_proj, nn.Linear) and not _is_nested(base.out_proj):
        raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention.")


def _is_nested(module: nn.Module) -> bool:
    """Whether `module` is the adapted layer this file put on an out_proj."""
    return isinstance(module.__dict__.get("sites"), dict)


def out_site(site: Site) -> Site:
    """The out_proj half of an MHA site: a Linear site at PEFT's nested path."""
    return dataclasses.replace(site, kind="Linear", path=f"{site.path}.{OUT_PROJ}", params=0)


def add_out_proj(layer: LayerView, site: Site) -> None:
    """Adapt the MHA's out_proj (wrapping it on the first adapter), or redo it: PEFT builds the
    out_proj adapter in its nested Linear's constructor and again in `update_layer`, so
    doing the same keeps a seeded RNG in step with PEFT."""
    base = layer.base_layer
    nested = base.out_proj
    if not _is_nested(nested):
        base.out_proj = type(layer)(nested, out_site(site))
        return
    if site.adapter in nested.sites:  # the redo: drop the first draw, keep the active set
        nested.method.remove(nested, site.adapter)
        del nested.sites[site.adapter]
    nested.add_adapter(out_site(site))


def remove_out_proj(layer: LayerView, adapter: str) -> None:
    """Drop `adapter`'s out_proj half; the last one gone restores the plain out_proj."""
    base = layer.base_layer
    nested = base.out_proj
    if not _is_nested(nested) or adapter not in nested.sites:
        return
    if len(nested.sites) == 1:
        base.out_proj = nested.base_layer
    else:
        nested.delete_adapter(adapter)


def delta(layer: LayerView, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    """PEFT's `get_delta_weight` for in_proj: `(B @ A) * scaling`, in fp32 for half factors."""
    wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if wb.dtype in (torch.float16, torch.bfloat16):
        return ((wb.float() @ wa.float()) * layer.sites[adapter].scaling).to(dtype)
    return ((wb @ wa) * layer.sites[adapter].scaling).to(dtype)


def forward(layer: LayerView, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The MHA's call with the active adapters' deltas added to both weights (PEFT's merge,
    call, unmerge, without writing the weights)."""
    if "adapter_names" in kwargs or layer.adapter_names is not None:
        raise TypeError("lora.MultiheadAttention does not support mixed adapter batches.")
    base = layer.base_layer
    nested = base.out_proj
    ins = layer.lowered_adapters()
    outs = nested.lowered_adapters() if _is_nested(nested) else []
    if not ins and not outs:
        result = base(query, *args, **kwargs)
    else:
        w_in = base.in_proj_weight
        for adapter in ins:
            w_in = w_in + delta(layer, adapter, w_in.dtype)
        w_out = nested.base_layer.weight
        for adapter in outs:  # PEFT's extra copy is written through `.data`: no gradient
            once = delta(nested, adapter, w_out.dtype)
            w_out = w_out + once + (PEFT_OUT_PROJ_TIMES - 1) * once.detach()
        swapped = {"in_proj_weight": w_in, "out_proj.base_layer.weight": w_out}
        result = torch.func.functional_call(base, swapped, (query, *args), kwargs)
    dtype = query.dtype
    return result[0].to(dtype), (None if result[1] is None else result[1].to(dtype))


def merge_weights(layer: LayerView, adapters: list[str], safe_merge: bool) -> bool:
    """PEFT's `MultiheadAttention.merge`: each not-yet-merged adapter's in_proj delta into
    `in_proj_weight`, its out_proj half merged (the nested layer) plus PEFT's extra copy."""
    todo = [a for a in adapters if a in layer.sites and a not in layer.merged_adapters]
    weight = layer.base_layer.in_proj_weight
    nested = layer.base_layer.out_proj
    for adapter in todo:
        with torch.no_grad():
            new = weight.detach() + delta(layer, adapter, weight.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} "
                                 "seems to be broken")
            weight.copy_(new)
        layer.merged_adapters.append(adapter)
        if adapter not in nested.merged_adapters:
            nested.merge([adapter], safe_merge)
        _extra_out_proj(nested, adapter, 1)
    return bool(todo)


def unmerge_weights(layer: LayerView) -> bool:
    """PEFT's `MultiheadAttention.unmerge`: every merged adapter out, newest first, then the
    out_proj half's own unmerge."""
    unfolded = bool(layer.merged_adapters)
    weight = layer.base_layer.in_proj_weight
    nested = layer.base_layer.out_proj
    while layer.merged_adapters:
        adapter = layer.merged_adapters[-1]
        _extra_out_proj(nested, adapter, -1)
        with torch.no_grad():
            weight.sub_(delta(layer, adapter, weight.dtype))
        layer.merged_adapters.pop()
    if nested.merged_adapters:
        nested.unmerge()
    return unfolded


def _extra_out_proj(nested: nn.Module, adapter: str, sign: int) -> None:
    """Add (`sign` 1) or take out (-1) the copies of the out_proj delta PEFT adds beyond one."""
    if PEFT_OUT_PROJ_TIMES == 1:
        return
    out = nested.base_layer.weight
    extra = (PEFT_OUT_PROJ_TIMES - 1) * nested.delta_weight(adapter).float()
    with torch.no_grad():
        out.copy_((out.float() + sign * extra).to(out.dtype))
