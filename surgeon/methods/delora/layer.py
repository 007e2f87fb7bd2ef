"""DeLoRA on Linear: PEFT 0.21's `peft.tuners.delora` names, init, forward and merge.

Each adapter trains `delora_A[adapter]` `(r, in)`, `delora_B[adapter]` `(out, r)` and the norm
bound `delora_lambda[adapter]` `(1,)`; `delora_w_norm[adapter]` `(in,)` is a persistent buffer,
the base weight's column norms captured when the adapter is created (PEFT saves it in the
checkpoint, and it never follows later weight changes, so it is not a cache that can go stale).
The delta weight is

    dW = B diag(lambda / r / (|A_i| |B^i|)) A diag(w_norm)      (norms clamped at 1e-4)

Forward: `prev + linear(linear(dropout(x) * w_norm, A) * s, B)` with the per-rank scale
`s = (lambda / r) / (|A_i| |B^i|)`, two thin matmuls and an `r`-vector, as PEFT's decomposed
forward; `dW` is built only to merge. `s` is recomputed per call from the live parameters (`r + 1`
norms, cheap next to the matmuls) so training and `load_state_dict` can never leave it stale.
`module_dropout` is PEFT's: an `nn.Dropout` on the adapter's input. PEFT's DeLoRA takes no
`adapter_names`, so mixed-adapter batches are refused, and bitsandbytes bases at plan time (PEFT
takes the norms of their packed integer weights and fails).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.lang.matching import full_matches
from surgeon.lang.values import Table
from surgeon.runtime.buffers import BufferDict
from surgeon.runtime.method import AdditiveMerge, base_parameter, remove_entries
from surgeon.runtime.quantized import quant_of

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

_MIN_NORM = 1e-4  # PEFT's clamp of the factor norms


class MixedBatchError(UserError, ValueError):
    """PEFT's DeLoRA layers take no `adapter_names` (one adapter per batch row)."""


class QuantizedBaseError(UserError, ValueError):
    """A bitsandbytes base: PEFT's DeLoRA takes the norms of its packed integer weight and fails."""


def _check_float(base: nn.Module, site: Site) -> None:
    """Refuse a quantised base at plan time (`num_params`) rather than fail as PEFT does."""
    if (quant := quant_of(base)) is not None:
        raise QuantizedBaseError(
            f"`{site.path}` is a bitsandbytes {quant} layer: DeLoRA captures the base weight's column "
            "norms, which a quantised weight does not give (PEFT 0.21 fails on it); exclude it.")


class Norms(BufferDict):
    """One persistent buffer per adapter (PEFT's `BufferDict(persistent=True)`), so state_dict
    and checkpoint keys are `delora_w_norm.<adapter>` as PEFT's."""

    persistent = True


def initial_lambda(site: Site) -> float:
    """PEFT's `lambda_pattern.get(get_pattern_key(keys, path), delora_lambda)`: the first key
    `k` with `(.*\\.)?(k)` matching the whole path, else the path itself as a key."""
    pattern = site.option("lambda_pattern")
    table = dict(pattern.items) if isinstance(pattern, Table) else {}
    for key, value in table.items():
        if full_matches(rf"(.*\.)?({key})", [site.path]):
            return float(value)
    return float(table.get(site.path, site.option("delora_lambda", 15)))


def rank_scale(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, r: int) -> torch.Tensor:
    """The per-rank factor `(lambda / r) / (|A_i| |B^i|)`, PEFT's op order."""
    an = torch.clamp(a.norm(dim=1), min=_MIN_NORM)
    bn = torch.clamp(b.norm(dim=0), min=_MIN_NORM)
    return (lam / r) / (an * bn)


def delta(layer: LayerView, adapter: str) -> torch.Tensor:
    """PEFT's `_compute_delta` (`get_delta_weight`), `(out, in)` in the adapter's dtype."""
    a, b = layer.delora_A[adapter], layer.delora_B[adapter]
    scale = rank_scale(a, b, layer.delora_lambda[adapter], layer.sites[adapter].r)
    return (b @ torch.diag_embed(scale) @ a) * layer.delora_w_norm[adapter].unsqueeze(0)


class Delora(AdditiveMerge):
    """The `delora` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "delora"
    containers = (("delora_dropout", nn.ModuleDict), ("delora_A", nn.ParameterDict),
                  ("delora_B", nn.ParameterDict), ("delora_lambda", nn.ParameterDict),
                  ("delora_w_norm", Norms))

    def add(self, layer: LayerView, site: Site) -> None:
        base = layer.base_layer
        if site.kind != "Linear":
            raise TypeError(f"Target module {base} is not supported. Currently, only `torch.nn.Linear` "
                            "is supported.")
        _check_float(base, site)
        if site.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {site.r}")
        p = float(site.option("module_dropout", 0.0) or 0.0)
        layer.delora_dropout[site.adapter] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        a, b = torch.empty(site.r, base.in_features), torch.empty(base.out_features, site.r)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's order: A, then B
        if site.option("init_weights", True):
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        weight = base.weight
        with torch.no_grad():
            w_norm = torch.ones(weight.shape[1], device=weight.device) if weight.device.type == "meta" \
                else torch.norm(weight.data, dim=0).detach()
        dtype = weight.dtype if weight.dtype.is_floating_point else None  # the unsaved tensors too
        layer.delora_A[site.adapter] = base_parameter(a, weight)
        layer.delora_B[site.adapter] = base_parameter(b, weight)
        lam = torch.full((1,), initial_lambda(site))
        layer.delora_lambda[site.adapter] = base_parameter(lam, weight)
        layer.delora_w_norm[site.adapter] = w_norm.to(weight.device, dtype)

    def remove(self, layer: LayerView, adapter: str) -> None:
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        _check_float(base, site)
        return site.r * (base.in_features + base.out_features) + 1

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise MixedBatchError(
            f"`adapter_names` (one adapter per batch row) is not supported by DeLoRA adapters "
            f"(`{layer.path}`): PEFT's DeLoRA takes no `adapter_names`; run one adapter per batch "
            "with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        layer, x = b.layer, b.x
        if layer.training and not isinstance(layer.delora_dropout[adapter], nn.Identity):
            x = b.module(f"delora_dropout.{adapter}", x)
        a, bb = b.attr(f"delora_A.{adapter}"), b.attr(f"delora_B.{adapter}")
        dtype = layer.delora_A[adapter].dtype
        cast = dtype != layer.base_layer.weight.dtype  # fp32 factors on a half base (autocast)
        if cast:  # PEFT's product with its fp32 norms promotes the input to fp32
            x = b.method("to", x, dtype)
        h = b.call(F.linear, b.call(torch.mul, x, b.attr(f"delora_w_norm.{adapter}")), a)
        scale = b.call(rank_scale, a, bb, b.attr(f"delora_lambda.{adapter}"), layer.sites[adapter].r)
        out = b.call(F.linear, b.call(torch.mul, h, scale), bb)
        if cast:  # PEFT accumulates the deltas in the base output's dtype
            out = b.method("type_as", out, prev)
        return b.result(prev, out)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        with torch.no_grad():
            return delta(layer, adapter).to(layer.base_layer.weight.dtype)

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        with torch.no_grad():
            d = delta(layer, adapter)
        return d.to(torch.promote_types(d.dtype, torch.float32))


METHOD = Delora()
