"""HRA on Linear: PEFT 0.21's `peft.tuners.hra` reflections, names, init and merge.

Each adapter trains `hra_u[adapter]`, `(in, r)`: r vectors whose Householder reflections
`H_i = I - 2 u_i u_i^T` (unit `u_i`) multiply the base weight from the input side,
`W' = W H_1 ... H_r`; with `apply_GS` the vectors are orthonormalised first and the product is
`I - 2 U U^T`.

PEFT's forward builds `W'` (an `out x in x in` product) on every call. Here the reflections act
on the INPUT instead: `x W'^T = (x H_r ... H_1) W^T`, so each token costs `2 r in`
multiply-adds before the unchanged base call, and no weight-sized tensor is built. With several
active adapters PEFT multiplies `W H_a H_b`, so `b`'s reflections reach the input first; the
first active adapter's branch applies the whole chain in that order (the others add no nodes).
Merging writes `W H` into the weight; unmerging multiplies by the reflections in reverse order,
as PEFT does.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.base_kinds import in_out_features
from surgeon.runtime.method import base_parameter

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView


class MixedBatchError(UserError, ValueError):
    """PEFT's HRA layers take no `adapter_names` (one adapter per batch row)."""


def orthonormal(u: torch.Tensor) -> torch.Tensor:
    """PEFT's Gram-Schmidt over the columns of `u` (apply_GS)."""
    columns = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
    for i in range(1, u.shape[1]):
        ui = u[:, i].view(-1, 1)
        for w in columns:
            ui = ui - (w.t() @ ui) * w
        columns.append((ui / ui.norm()).view(-1, 1))
    return torch.cat(columns, dim=1)


def matrix(u: torch.Tensor, apply_gs: bool, reverse: bool = False) -> torch.Tensor:
    """PEFT's `get_delta_weight`: `H_1 ... H_r` (`reverse`: `H_r ... H_1`), `(in, in)`."""
    eye = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
    if apply_gs:
        q = orthonormal(u)
        return eye - 2 * q @ q.t()
    u = u / u.norm(dim=0)
    weight = eye
    for i in (range(u.shape[1] - 1, -1, -1) if reverse else range(u.shape[1])):
        ui = u[:, i].view(-1, 1)
        weight = weight - 2 * weight @ ui @ ui.t()
    return weight


def reflect(x: torch.Tensor, chain: tuple[tuple[torch.Tensor, bool], ...]) -> torch.Tensor:
    """The graph function: `x W'^T` before the base call, for `W' = W H_a H_b ...` (adapters
    `chain` in PEFT's order, each `(hra_u, apply_GS)`); the result in `x`'s dtype."""
    dtype = x.dtype
    h = x
    for u, apply_gs in reversed(chain):
        h = h if h.dtype == u.dtype else h.to(u.dtype)
        if apply_gs:
            q = orthonormal(u)
            h = h - 2 * (h @ q) @ q.t()
            continue
        u = u / u.norm(dim=0)
        for i in range(u.shape[1] - 1, -1, -1):  # x H^T = x H_r ... H_1
            ui = u[:, i]
            h = h - 2 * (h @ ui)[..., None] * ui
    return h.to(dtype)


class Hra:
    """The `hra` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "hra"
    containers = (("hra_u", nn.ParameterDict),)

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind != "Linear":
            raise TypeError(f"HRA is not implemented by surgeon for base layers of type {site.kind}")
        if site.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {site.r}")
        n_in, r = in_out_features(layer.base_layer, site.kind)[0], site.r
        if site.option("init_weights", True) and r % 2 == 0:
            half = torch.zeros(n_in, r // 2)  # equal pairs: the reflections cancel
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)
        else:
            if site.option("init_weights", True):
                warnings.warn("The symmetric initialization can NOT be performed when r is odd!",
                              stacklevel=3)
            u = torch.empty(n_in, r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        weight = layer.base_layer.weight
        layer.hra_u[site.adapter] = base_parameter(u, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        if adapter in layer.hra_u:
            del layer.hra_u[adapter]

    def num_params(self, base: nn.Module, site: Site) -> int:
        return in_out_features(base, site.kind)[0] * site.r

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise MixedBatchError(
            f"`adapter_names` (one adapter per batch row) is not supported by HRA adapters "
            f"(`{layer.path}`), as in PEFT; run one adapter per batch with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        lowered = [a for a in b.layer.lowered_adapters() if a in b.layer.hra_u]
        if lowered and lowered[0] != adapter:
            return prev  # the first adapter's branch applies the whole chain (module docstring)
        chain = lowered or [adapter]
        pre = b.before_base()
        pairs = tuple((pre.attr(f"hra_u.{a}"), bool(b.layer.sites[a].option("apply_GS", False)))
                      for a in chain)
        pre.input_result(pre.call(reflect, pre.x, pairs))
        return prev

    def _matrix(self, layer: LayerView, adapter: str, reverse: bool = False) -> torch.Tensor:
        u = layer.hra_u[adapter].detach()
        u = u.to(torch.promote_types(u.dtype, torch.float32))
        return matrix(u, bool(layer.sites[adapter].option("apply_GS", False)), reverse)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """What merging adds to the base weight (HRA multiplies; this is `W H - W`)."""
        weight = layer.base_layer.weight.detach()
        current = weight.float()
        return (current @ self._matrix(layer, adapter).to(current.dtype) - current).to(weight.dtype)

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        return weight @ self._matrix(layer, adapter).to(weight.dtype)

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        return weight @ self._matrix(layer, adapter, reverse=True).to(weight.dtype)

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None

    def clear_caches(self, layer: LayerView) -> None:
        pass


METHOD = Hra()
