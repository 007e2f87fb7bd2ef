"""RoAd on Linear: PEFT 0.21's `peft.tuners.road` rotations, names, init, merge and mixed batches.

Each adapter trains `road_theta[adapter]` (angles) and `road_alpha[adapter]` (scales): `out/2`
values each for road_1, `out` for road_2, `2 out` for road_4. The output channels are cut into
groups of `group_size`; inside a group channel `i` pairs with `i + group_size/2`, and each pair
`(y0, y1)` becomes `(y0 c - y1 s, y1 c' + y0 s')` with `c = alpha cos(theta)`, `s = alpha
sin(theta)` (per pair for road_1, per element for road_2, separate scales and angles for the
two columns with road_4).

Forward: the branch transforms the base OUTPUT elementwise (`Builder.as_result`), exactly as
PEFT's `_apply_road`: `y * first + rotate_half(y) * second`, two vectors of `out` values built
from the parameters per call (cheap, and never stale while training), never an `out x out`
matrix. Several active adapters rotate in turn, in the active order. A mixed-adapter batch
rotates only each adapter's rows (`index_copy` of the rotated rows into the base output), as
PEFT's `_mixed_batch_forward` does.

Merging uses `R (W x + b) = (R W) x + R b`: the base weight becomes `R @ W` and the bias `R @ b`
(R is PEFT's block-structured `out x out` matrix, built only here); unmerging multiplies by
`inv(R)`, as PEFT does. bitsandbytes bases (PEFT's road/bnb.py) need nothing here: the base is
called as a module and the fold step dequantises, rotates and quantises again, as PEFT's merge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.method import base_parameter

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output channel, per tensor


class RoadError(UserError, ValueError):
    """A layer RoAd cannot adapt with these options (PEFT raises the same ValueError)."""


def _check_divisible(base: nn.Module, site: Site) -> None:
    size = int(site.option("group_size", 64))
    if base.out_features % size != 0:
        raise RoadError(f"`{site.path}`: the out_features of the base layer ({base.out_features}) must "
                        f"be divisible by group_size ({size}) when using RoAd; choose a group_size "
                        "that divides it.")


def columns(variant: str, group_size: int, theta: torch.Tensor,
            alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_prepare_cols`, op for op: the per-channel factors of `y` and `rotate_half(y)`."""
    if variant == "road_1":  # one angle and scale per pair, shared by both halves of a group
        theta = theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta = theta.reshape(-1, 2, group_size)  # road_4: first half for cos, second for sin
    alpha = alpha.reshape(-1, 2, group_size)
    return alpha[:, 0, :].flatten() * theta[:, 0, :].cos().flatten(), \
        alpha[:, 1, :].flatten() * theta[:, 1, :].sin().flatten()


def rotate(y: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor, variant: str,
           group_size: int) -> torch.Tensor:
    """The graph function: PEFT's `_apply_road` on `y` cast to the parameters' dtype."""
    if y.dtype != theta.dtype:
        y = y.to(theta.dtype)
    first, second = columns(variant, group_size, theta, alpha)
    grouped = y.reshape(-1, 2, group_size // 2)
    rotated = torch.stack((-grouped[:, 1, :], grouped[:, 0, :]), dim=1).reshape(y.shape)
    return y * first + rotated * second


def rotate_rows(prev: torch.Tensor, rows: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor,
                variant: str, group_size: int) -> torch.Tensor:
    """Mixed batch: `prev` with only batch `rows` rotated (PEFT writes them back in its dtype)."""
    done = rotate(prev.index_select(0, rows), theta, alpha, variant, group_size)
    return prev.index_copy(0, rows, done.to(prev.dtype))


def matrix(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """PEFT's `_get_delta_weight`: the `out x out` matrix R with `rotate(y) = y @ R.T`."""
    first, second = columns(variant, group_size, theta, alpha)
    out = torch.diag(first)
    size, half = second.shape[0], group_size // 2
    swapped = second.reshape(-1, 2, half)[:, [1, 0], :].flatten()
    rotated = torch.diag(swapped).reshape(-1, 2, half, size)[:, [1, 0], :, :]
    rotated[:, 0, :, :] *= -1
    return out + rotated.reshape(size, size)


class Road:
    """The `road` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "road"
    containers = (("road_theta", nn.ParameterDict), ("road_alpha", nn.ParameterDict))

    def add(self, layer: LayerView, site: Site) -> None:
        base = layer.base_layer
        if site.kind != "Linear":
            raise TypeError(f"Unsupported layer type '{type(base)}' encountered, cannot apply RoAd adapter.")
        _check_divisible(base, site)
        size = int(base.out_features * _SIZE[site.option("variant", "road_1")])
        theta, alpha = torch.empty(size), torch.empty(size)
        if site.option("init_weights", True):
            nn.init.zeros_(theta), nn.init.ones_(alpha)
        else:  # PEFT's order: all angles, then all scales
            nn.init.normal_(theta, mean=0.0, std=0.5), nn.init.normal_(alpha, mean=1.0, std=0.5)
        weight = base.weight
        layer.road_theta[site.adapter] = base_parameter(theta, weight)
        layer.road_alpha[site.adapter] = base_parameter(alpha, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        for table in (layer.road_theta, layer.road_alpha):
            if adapter in table:
                del table[adapter]

    def num_params(self, base: nn.Module, site: Site) -> int:
        _check_divisible(base, site)
        return 2 * int(base.out_features * _SIZE[site.option("variant", "road_1")])

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        """PEFT's RoAd serves mixed-adapter batches: nothing to refuse."""

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        site = b.layer.sites[adapter]
        static = (str(site.option("variant", "road_1")), int(site.option("group_size", 64)))
        theta, alpha = b.attr(f"road_theta.{adapter}"), b.attr(f"road_alpha.{adapter}")
        if rows is None:
            return b.as_result(b.call(rotate, prev, theta, alpha, *static))
        return b.as_result(b.call(rotate_rows, prev, rows, theta, alpha, *static))

    def _matrix(self, layer: LayerView, adapter: str) -> torch.Tensor:
        site = layer.sites[adapter]
        theta, alpha = layer.road_theta[adapter].detach(), layer.road_alpha[adapter].detach()
        dtype = torch.promote_types(theta.dtype, torch.float32)
        return matrix(site.option("variant", "road_1"), int(site.option("group_size", 64)),
                      theta.to(dtype), alpha.to(dtype))

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """What merging adds to the base weight (RoAd multiplies; this is `R W - W`)."""
        weight = layer.base_layer.weight.detach()
        current = weight.float()
        return (self._matrix(layer, adapter).to(current.dtype) @ current - current).to(weight.dtype)

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        return self._matrix(layer, adapter).to(weight.dtype) @ weight

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        return self._inverse(layer, adapter).to(weight.dtype) @ weight

    def _inverse(self, layer: LayerView, adapter: str) -> torch.Tensor:
        # R is not orthogonal in general (scales, road_4): PEFT inverts it in fp32
        return torch.linalg.inv(self._matrix(layer, adapter).to(torch.float32))

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None  # the bias is rotated, not added to: fold_bias / unfold_bias

    def fold_bias(self, layer: LayerView, adapter: str, bias: torch.Tensor) -> torch.Tensor:
        return self._matrix(layer, adapter).to(bias.dtype) @ bias

    def unfold_bias(self, layer: LayerView, adapter: str, bias: torch.Tensor) -> torch.Tensor:
        return self._inverse(layer, adapter).to(bias.dtype) @ bias

    def clear_caches(self, layer: LayerView) -> None:
        pass


METHOD = Road()
