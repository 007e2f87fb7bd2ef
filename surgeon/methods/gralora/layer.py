"""GraLoRA on Linear and transformers Conv1D: PEFT 0.21's `peft.tuners.gralora` math, names, init.

Each adapter trains `gralora_A[adapter]` `(k, in/k, r)` and `gralora_B[adapter]` `(k, r, out/k)`
(PEFT's stacked layout; `k = gralora_k`), and with `hybrid_r > 0` a plain LoRA pair
`gralora_A_general[adapter]` / `gralora_B_general[adapter]` (bias-free Linears). Split the input
into k blocks `x_n` and each `A_n`'s rank into k chunks of `s = r/k`; output block `j` is

    y_j = sum_n (x_n @ A_n[:, j-th chunk]) @ B_j[n-th chunk, :]

so block `(j, n)` of the weight delta is a rank-`s` product, k^2 of them from `r (in + out)`
parameters. The forward computes exactly that with two batched matmuls and one permute between
them, never the dense `(out, in)` delta: `h = bmm(x as (k, T, in/k), A)` gives every input
block's rank vector, `h.view(k, T, k, s).permute(2, 1, 0, 3)` regroups the chunks by output
block, `bmm(h, B)` gives the output blocks: `r (in + out)` multiply-adds per token, a
rank-r LoRA's, and no weight-sized tensor. The hybrid part is two thin Linears. PEFT draws the
(training) dropout twice, once per part, in this order; so does this.

The result is `prev + scaling * blocks + scaling * hybrid`, `scaling = alpha / (r + hybrid_r)`,
each part cast to the result dtype before it is scaled and added, as PEFT does (one graph
function whose first argument is `prev`); with several active adapters each adds its own.
Merging adds PEFT's delta weight (the k x k blocks assembled, plus `B_g A_g`, scaled);
mixed-adapter batches are refused, as PEFT's GraLoRA layers take no `adapter_names`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.base_kinds import in_out_features, main_weight
from surgeon.runtime.method import AdditiveMerge, base_parameter, remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

KINDS = ("Linear", "Conv1D")


class GraloraError(UserError, ValueError):
    """What PEFT's GraLoRA refuses too: mixed-adapter batches."""


def block_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The k x k block product for input `x` `(..., in)`: `(..., out)` (module docstring)."""
    k, sub_in, r = a.shape
    lead = x.shape[:-1]
    h = torch.bmm(x.reshape(-1, k, sub_in).transpose(0, 1), a)  # (k_in, T, r)
    h = h.view(k, -1, k, r // k).permute(2, 1, 0, 3).reshape(k, -1, r)  # (k_out, T, k_in * s)
    out = torch.bmm(h, b)  # (k_out, T, out/k)
    return out.transpose(0, 1).reshape(*lead, k * b.shape[2])


def gralora_result(prev: torch.Tensor, x: torch.Tensor, hybrid_x: torch.Tensor | None,
                   a: torch.Tensor, b: torch.Tensor, general: tuple | None, scaling: float) -> torch.Tensor:
    """The graph function: `prev` plus the scaled block product, then the scaled hybrid LoRA
    part (`general` = its two weights), each cast to `prev`'s dtype first, as PEFT adds them
    (so half-precision results round as PEFT's do)."""
    out = prev + scaling * block_delta(x, a, b).to(prev.dtype)
    if general is not None:
        out = out + scaling * F.linear(F.linear(hybrid_x, general[0]), general[1]).to(prev.dtype)
    return out


def _kaiming(rows: int, cols: int) -> torch.Tensor:
    """PEFT's He-uniform initialiser on a new `(rows, cols)` tensor."""
    return nn.init.kaiming_uniform_(torch.empty(rows, cols), a=math.sqrt(5))


def _stacked(k: int, r: int, n_in: int, n_out: int, init: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's k blocks, drawn A_i then B_i (B zero when `init`), stacked as `(k, in/k, r)` and
    `(k, r, out/k)`."""
    a_blocks, b_blocks = [], []
    for _ in range(k):
        a_blocks.append(_kaiming(r, n_in // k))
        b_blocks.append(torch.zeros(n_out // k, r) if init else _kaiming(n_out // k, r))
    return (torch.stack(a_blocks).transpose(1, 2).contiguous(),
            torch.stack(b_blocks).transpose(1, 2).contiguous())


def _general(n_in: int, n_out: int, hybrid: int, init: bool) -> tuple[nn.Module, nn.Module]:
    """The hybrid LoRA pair as PEFT builds it: two Linears (their own init draws first), then
    He-uniform A and zero (or He-uniform) B; Identities when `hybrid` is 0."""
    if hybrid <= 0:
        return nn.Identity(), nn.Identity()
    general_a = nn.Linear(n_in, hybrid, bias=False)
    general_b = nn.Linear(hybrid, n_out, bias=False)
    nn.init.kaiming_uniform_(general_a.weight, a=math.sqrt(5))
    if init:
        nn.init.zeros_(general_b.weight)
    else:
        nn.init.kaiming_uniform_(general_b.weight, a=math.sqrt(5))
    return general_a, general_b


class Gralora(AdditiveMerge):
    """The `gralora` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "gralora"
    containers = (("gralora_dropout", nn.ModuleDict), ("gralora_A", nn.ParameterDict),
                  ("gralora_B", nn.ParameterDict), ("gralora_A_general", nn.ModuleDict),
                  ("gralora_B_general", nn.ModuleDict))

    def module_problem(self, base: nn.Module, site: Site) -> str | None:
        """PEFT's `update_layer` checks: k must divide the layer's in and out features."""
        k = int(site.option("gralora_k", 2))
        for name, n in zip(("in_features", "out_features"), in_out_features(base, site.kind)):
            if n % k:
                return f"has {name}={n}, not divisible by gralora_k={k} (PEFT's GraLoRA needs both)"
        return None

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind not in KINDS:
            raise TypeError(f"Target module {layer.base_layer} is not supported. Currently, only "
                            "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D` are supported.")
        hybrid, k, r = int(site.option("hybrid_r", 0)), int(site.option("gralora_k", 2)), site.r
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if hybrid < 0:
            raise ValueError("`hybrid_r` should be a non-negative integer value but the value passed "
                             f"is {hybrid}")
        if problem := self.module_problem(layer.base_layer, site):
            raise ValueError(f"`{site.path}` {problem}")
        n_in, n_out = in_out_features(layer.base_layer, site.kind)
        init = bool(site.option("init_weights", True))
        p = float(site.option("gralora_dropout", 0.0) or 0.0)
        layer.gralora_dropout[site.adapter] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        stacked_a, stacked_b = _stacked(k, r, n_in, n_out, init)
        general = _general(n_in, n_out, hybrid, init)
        weight = main_weight(layer.base_layer, site.kind)
        dtype = weight.dtype if weight.dtype.is_floating_point else None  # the unsaved tensors too
        layer.gralora_A[site.adapter] = base_parameter(stacked_a, weight)
        layer.gralora_B[site.adapter] = base_parameter(stacked_b, weight)
        layer.gralora_A_general[site.adapter] = general[0].to(weight.device, dtype)
        layer.gralora_B_general[site.adapter] = general[1].to(weight.device, dtype)

    def remove(self, layer: LayerView, adapter: str) -> None:
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        n_in, n_out = in_out_features(base, site.kind)
        return (site.r + int(site.option("hybrid_r", 0))) * (n_in + n_out)

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise GraloraError(
            f"`adapter_names` (one adapter per batch row) is not supported by GraLoRA adapters "
            f"(`{layer.path}`), as in PEFT; run one adapter per batch with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        layer = b.layer
        x = b.x
        if layer.gralora_A[adapter].dtype != main_weight(layer.base_layer, layer.kind).dtype:
            x = b.method("to", x, layer.gralora_A[adapter].dtype)
        dropout = layer.training and type(layer.gralora_dropout[adapter]) is not nn.Identity
        hybrid = isinstance(layer.gralora_A_general[adapter], nn.Linear)
        block_x = b.module(f"gralora_dropout.{adapter}", x) if dropout else x
        hybrid_x = (b.module(f"gralora_dropout.{adapter}", x) if dropout else x) if hybrid else None
        general = (b.attr(f"gralora_A_general.{adapter}.weight"),
                   b.attr(f"gralora_B_general.{adapter}.weight")) if hybrid else None
        node = b.call(gralora_result, prev, block_x, hybrid_x, b.attr(f"gralora_A.{adapter}"),
                      b.attr(f"gralora_B.{adapter}"), general, layer.sites[adapter].scaling)
        return b.as_result(node)  # a function of `prev` (its args[0]), as `prev + delta`

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's `get_delta_weight` before its transpose: `(out, in)`, in at least fp32."""
        a, b = layer.gralora_A[adapter].detach(), layer.gralora_B[adapter].detach()
        dtype = torch.promote_types(a.dtype, torch.float32)
        k, sub_in, r = a.shape
        a4 = a.to(dtype).view(k, sub_in, k, r // k)  # (n, i, j, s)
        b4 = b.to(dtype).view(k, k, r // k, b.shape[2])  # (j, n, s, o)
        delta = torch.einsum("nijs,jnso->joni", a4, b4).reshape(k * b.shape[2], k * sub_in)
        general_a = layer.gralora_A_general[adapter]
        if isinstance(general_a, nn.Linear):
            general_b = layer.gralora_B_general[adapter]
            delta = delta + general_b.weight.detach().to(dtype) @ general_a.weight.detach().to(dtype)
        return delta * layer.sites[adapter].scaling

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        delta = self._out_major(layer, adapter)
        delta = delta.T if layer.kind == "Conv1D" else delta
        return delta.to(layer.gralora_A[adapter].dtype)


METHOD = Gralora()
