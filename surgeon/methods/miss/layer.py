"""MiSS on Linear: PEFT 0.21's `peft.tuners.miss` blocks, names, init, forward and merge.

Each adapter trains `miss_block[adapter]`. Plain MiSS (init true/false) holds an `(r, out)`
block `B`; its delta adds `B^T` to every `r`-column chunk of the weight, `W'[:, c] = W[:, c] +
B[c mod r]^T` (the last, partial chunk takes B's first rows). "mini" holds `(r, mini_r)`, tiled
`out / mini_r` times along the outputs. "bat" holds `out/r` blocks `B_o` of `r x r`, and each
`r x r` tile of the weight becomes `W_oi (I + B_o) + B_o`.

Forward (plain and mini): since every input chunk meets the same `B`, `x W'^T = x W^T + (sum_i
x_i) B`: the input, zero-padded to a multiple of r as PEFT pads it, is cut into `r`-wide chunks
that are summed, then one `(r, out)` matmul (mini: `(r, mini_r)`, then tiled) -- `in + r out`
multiply-adds per token and no weight-sized tensor. PEFT pads `x` in place across its adapter
loop, so a later adapter's dropout draws over the widest padding so far; each branch pads to
that same width (static, from the adapters before it), so dropout masks match PEFT's.

Forward ("bat"): the delta `W (I + B) + B - W` depends on the weight itself, so no input-side
form avoids an `out x in` tensor; as PEFT, it is built per call (the first active adapter's
branch builds the whole chain, each adapter transforming the weight the previous one left) and
applied as `prev + x delta^T`. Merge adds the delta (bat: writes `W (I+B) + B`); unmerge
subtracts it (bat: `(W - B) (I + B)^-1`, PEFT's inverse).

PEFT keeps one variant per layer (the first adapter's `init_weights`): a later adapter of another
variant on the same layer runs with the wrong formula or fails, so it is refused here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime import quantized
from surgeon.runtime.base_kinds import in_out_features
from surgeon.runtime.method import base_parameter, remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView


class MissError(UserError, ValueError):
    """A MiSS adapter PEFT cannot build (sizes), or one surgeon refuses (mixed batches)."""


def variant(site: Site) -> str:
    """"bat", "mini" or "plain" (init true or false: the same forward and merge)."""
    init = site.option("init_weights", True)
    return init if init in ("bat", "mini") else "plain"


def size_problem(site: Site, n_in: int, n_out: int) -> str | None:
    """PEFT's `update_layer` size checks, as a reason (None: the sizes fit)."""
    r, mini_r = site.r, int(site.option("mini_r", 1))
    if r > n_in:
        return f"has in_features {n_in}: `r` ({r}) must be less than or equal to in_features"
    if variant(site) == "bat" and (n_in % r or n_out % r):
        return (f"is {n_out}x{n_in}: with init=bat the weight matrix must be fully divisible into "
                f"[r, r] blocks (r={r})")
    if variant(site) == "mini" and n_out % mini_r:
        return (f"has out_features {n_out}: with init=mini, mini_r is divided along the out_features "
                f"dimension and must divide it (mini_r={mini_r})")
    return None


def block_shape(site: Site, n_out: int) -> tuple[int, ...]:
    kind = variant(site)
    if kind == "bat":
        return (n_out // site.r, site.r, site.r)
    return (site.r, int(site.option("mini_r", 1))) if kind == "mini" else (site.r, n_out)


def padded_widths(n_in: int, ranks: list[int]) -> list[int]:
    """The input width each adapter sees in PEFT's loop (it pads `x` in place, cumulatively)."""
    widths, width = [], n_in
    for r in ranks:
        width += (r - width % r) % r
        widths.append(width)
    return widths


def pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """The graph function: `x` zero-padded on the right to `width` features (PEFT's `F.pad`)."""
    return F.pad(x, (0, width - x.shape[-1])) if width != x.shape[-1] else x


def chunk_sum_delta(x: torch.Tensor, block: torch.Tensor, tiles: int) -> torch.Tensor:
    """The graph function (plain, mini): `(sum of the r-chunks of x) @ block`, tiled for mini."""
    r = block.shape[0]
    out = x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2) @ block
    return out.repeat(*(1,) * (out.dim() - 1), tiles) if tiles > 1 else out


def bat_step(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """PEFT's bat `get_delta_weight`: each `r x r` tile `W_oi` -> `W_oi B_o + B_o`."""
    weight = weight.to(block.dtype)
    n_out, n_in = weight.shape
    r = block.shape[-1]
    tiles = weight.reshape(n_out // r, r, n_in // r, r).permute(2, 0, 1, 3)
    return (tiles @ block + block).permute(1, 2, 0, 3).reshape(n_out, n_in)


def bat_delta(x: torch.Tensor, weight: torch.Tensor, blocks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The graph function (bat): `x (W' - W)^T` for PEFT's chained `W' = W + d_1(W) + d_2(...)`."""
    total, current = None, weight
    for block in blocks:
        step = bat_step(current, block)
        total = step if total is None else total + step
        current = current + step
    return F.linear(x.to(total.dtype), total)


def bat_unstep(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """PEFT's bat unmerge: each tile `W'_oi` -> `(W'_oi - B_o) (I + B_o)^-1`."""
    n_out, n_in = weight.shape
    r = block.shape[-1]
    eye = torch.eye(r, device=block.device, dtype=torch.float32)
    inverse = torch.inverse(eye + block.float()).to(block.dtype)
    tiles = weight.to(block.dtype).reshape(n_out // r, r, n_in // r, r).permute(2, 0, 1, 3)
    return ((tiles - block) @ inverse).permute(1, 2, 0, 3).reshape(n_out, n_in)


class Miss:
    """The `miss` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "miss"
    containers = (("miss_dropout", nn.ModuleDict), ("miss_block", nn.ParameterDict))

    def module_problem(self, base: nn.Module, site: Site) -> str | None:
        if quantized.quant_of(base) is not None:
            return ("is a bitsandbytes-quantised layer: surgeon's MiSS adapts float Linear layers only "
                    "(PEFT's also quantised ones; not implemented here)")
        return size_problem(site, *in_out_features(base, site.kind))

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind != "Linear":
            raise TypeError(f"Target module {layer.base_layer} is not supported. Currently, only "
                            "`torch.nn.Linear` (optionally quantized) is supported.")
        if problem := self.module_problem(layer.base_layer, site):
            raise MissError(f"`{site.path}` {problem}.")
        others = [a for a in layer.sites if a != site.adapter]
        if others and variant(layer.sites[others[0]]) != variant(site):
            raise MissError(f"`{site.path}` holds a MiSS adapter of variant {variant(layer.sites[others[0]])}; "
                            f"PEFT runs every adapter of a layer with the first one's init_weights, so "
                            f"`{site.adapter}` (variant {variant(site)}) cannot join it")
        n_out = in_out_features(layer.base_layer, site.kind)[1]
        p = float(site.option("miss_dropout", 0.0) or 0.0)
        layer.miss_dropout[site.adapter] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        block = torch.zeros(block_shape(site, n_out))
        if site.option("init_weights", True) is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        weight = layer.base_layer.weight
        layer.miss_block[site.adapter] = base_parameter(block, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        return math.prod(block_shape(site, in_out_features(base, site.kind)[1]))

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise MissError(
            f"`adapter_names` (one adapter per batch row) is not supported by MiSS adapters "
            f"(`{layer.path}`): PEFT's MiSS ignores it and runs the active adapters on every row; "
            "run one adapter per batch with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        layer = b.layer
        lowered = [a for a in layer.lowered_adapters() if a in layer.miss_block] or [adapter]
        if variant(layer.sites[adapter]) == "bat":
            if lowered[0] != adapter:
                return prev  # the first adapter's branch builds the whole chain (docstring)
            blocks = tuple(b.attr(f"miss_block.{a}") for a in lowered)
            return b.result(prev, b.call(bat_delta, b.x, b.attr("base_layer.weight"), blocks))
        site = layer.sites[adapter]
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        ranks = [layer.sites[a].r for a in lowered[:lowered.index(adapter) + 1]]
        x = b.call(pad_to, b.x, padded_widths(n_in, ranks)[-1])
        dtype = layer.miss_block[adapter].dtype
        if dtype != layer.base_layer.weight.dtype:
            x = b.method("to", x, dtype)
        if type(layer.miss_dropout[adapter]) is not nn.Identity and layer.training:
            x = b.module(f"miss_dropout.{adapter}", x)
        tiles = n_out // int(site.option("mini_r", 1)) if variant(site) == "mini" else 1
        return b.result(prev, b.call(chunk_sum_delta, x, b.attr(f"miss_block.{adapter}"), tiles))

    def _additive(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """The plain / mini delta, out-major `(out, in)`, in at least fp32."""
        block = layer.miss_block[adapter].detach()
        block = block.to(torch.promote_types(block.dtype, torch.float32))
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        if variant(layer.sites[adapter]) == "mini":
            block = block.repeat(1, n_out // block.shape[1])
        r = block.shape[0]
        return block.t().repeat(1, -(-n_in // r))[:, :n_in]

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        weight = layer.base_layer.weight.detach()
        if variant(layer.sites[adapter]) == "bat":
            block = layer.miss_block[adapter].detach()
            return bat_step(weight.float(), block.float()).to(weight.dtype)
        return self._additive(layer, adapter).to(weight.dtype)

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        if variant(layer.sites[adapter]) == "bat":
            block = layer.miss_block[adapter].detach().to(weight.dtype)
            return weight + bat_step(weight, block)
        return weight + self._additive(layer, adapter).to(weight.dtype)

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        if variant(layer.sites[adapter]) == "bat":
            return bat_unstep(weight, layer.miss_block[adapter].detach().to(weight.dtype))
        return weight - self._additive(layer, adapter).to(weight.dtype)

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None

    def clear_caches(self, layer: LayerView) -> None:
        pass


METHOD = Miss()
