"""OFT on Linear and Conv2d: PEFT 0.21's `peft.tuners.oft` rotation, names, init and merge.

Each adapter trains `oft_R[adapter].weight`, `(blocks, b (b - 1) / 2)`: the upper triangles of
skew-symmetric `b x b` blocks `Q`, turned into rotations by the Cayley map (its Neumann series
`I + 2Q + 2Q^2 + ... + Q^(n-1)` by default, else `(I - Q)(I + Q)^-1`). With `block_share` one
block serves every block.

Unmerged, the rotation is applied to the layer's INPUT, never to the weight: PEFT's forward is
`base(x R)` with `R` block-diagonal, so each token costs `in * b` multiply-adds on top of the
base call, where rotating the weight would cost `in * b * out` per call and a weight-sized
buffer. The branch is an input part (`Builder.before_base`), so several active adapters chain
their rotations in order, as PEFT's loop does. Merging writes `W R^T` into the weight;
unmerging multiplies by the inverse rotation, as PEFT does.

On a Conv2d (`in_channels * k * k` rotated features) PEFT's forward unfolds the input into its
k x k patches (stride 1, no padding), rotates each patch, and folds them back (`F.fold` sums
overlapping patches) before the base convolution: `rotate_patches` is that, exactly, including
PEFT's reshape order. For k > 1 this is not the merged weight's function (the identity rotation
already scales pixels by the number of patches covering them): surgeon keeps PEFT's outputs in
both states rather than its own.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.base_kinds import in_out_features

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView


class MixedBatchError(UserError, ValueError):
    """PEFT's OFT layers take no `adapter_names` (one adapter per batch row)."""


class Static(NamedTuple):
    """A rotation's constants (graph arguments): what PEFT's OFTRotationModule stores."""

    blocks: int  # blocks the input splits into (r, or in / b with block_share)
    block_size: int
    coft: bool
    eps: float
    neumann: bool
    terms: int
    kernel: int = 0  # a Conv2d's (square) kernel side; 0 on Linear


class Rotation(nn.Module):
    """The adapter's parameter holder, named as PEFT's OFTRotationModule (`oft_R.<a>.weight`)."""

    def __init__(self, rows: int, n_elements: int, static: Static) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, n_elements))
        self.static = static


def adjust(in_features: int, value: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of `in_features` nearest `value`."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def sizes(n_in: int, r: int, block: int) -> tuple[int, int]:
    """`(r, oft_block_size)` on a layer with `n_in` inputs, as PEFT's `update_layer`."""
    if r == 0:
        if n_in % block != 0 or block > n_in:
            old, block = block, adjust(n_in, block)
            warnings.warn(f"Invalid `oft_block_size` ({old})! Adjusted `oft_block_size` to ({block}).",
                          stacklevel=4)
        return n_in // block, block
    if n_in % r != 0 or r > n_in:
        old, r = r, adjust(n_in, r)
        warnings.warn(f"Invalid `r` ({old})! Adjusted `r` to ({r}).", stacklevel=4)
    return r, n_in // r


def _skew(vec: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(block, block, 1, device=vec.device)
    matrix = torch.zeros(vec.shape[0], block, block, device=vec.device, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def cayley(weight: torch.Tensor, static: Static) -> torch.Tensor:
    """PEFT's `_cayley_batch`: `(rows, b, b)` rotations from the skew parameters."""
    b, q = static.block_size, _skew(weight, static.block_size)
    if not static.neumann:
        eye = torch.eye(b, device=q.device).unsqueeze(0).expand(q.shape[0], b, b)
        return torch.linalg.solve(eye + q, eye - q, left=False).to(weight.dtype)
    r = torch.eye(b, device=q.device, dtype=q.dtype).repeat(q.shape[0], 1, 1)
    if static.terms > 1:
        r.add_(q, alpha=2.0)
        if static.terms > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, static.terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            r.add_(torch.bmm(power, q))
    return r


@torch.no_grad()
def project(weight: torch.Tensor, static: Static) -> torch.Tensor:
    """COFT (PEFT's `_project_batch`): each block's skew matrix pulled within `eps` of zero."""
    skew = _skew(weight, static.block_size)
    eps = static.eps * 1 / torch.sqrt(torch.tensor(skew.shape[0]))
    norm = torch.norm(skew, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= eps, skew, eps * (skew / norm))
    rows, cols = torch.triu_indices(static.block_size, static.block_size, 1, device=weight.device)
    return out[:, rows, cols]


def rotations(weight: torch.Tensor, static: Static) -> torch.Tensor:
    """`(blocks, b, b)`: every block's rotation (COFT projecting the parameter in place first)."""
    if static.coft:
        with torch.no_grad():
            weight.copy_(project(weight, static))
    rot = cayley(weight, static)
    return rot.repeat(static.blocks, 1, 1) if rot.shape[0] != static.blocks else rot


def rotate_input(x: torch.Tensor, weight: torch.Tensor, static: Static) -> torch.Tensor:
    """The graph function: PEFT's `OFTRotationModule.forward` on a Linear input, `x R`."""
    dtype = x.dtype
    h = x if dtype == weight.dtype else x.to(weight.dtype)
    rot = rotations(weight, static)
    blocks = h.reshape(*h.shape[:-1], static.blocks, static.block_size)
    return torch.einsum("...rk,rkc->...rc", blocks, rot).reshape(h.shape).to(dtype)


def rotate_patches(x: torch.Tensor, weight: torch.Tensor, static: Static) -> torch.Tensor:
    """The graph function on a Conv2d input: PEFT's unfold, rotate, fold (module docstring)."""
    dtype = x.dtype
    x = x if dtype == weight.dtype else x.to(weight.dtype)
    k, (b, c, height, width) = static.kernel, x.shape
    patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).contiguous()
    out_h, out_w = height - k + 1, width - k + 1
    rotated = rotate_input(patches.view(b * out_h * out_w, -1), weight, static)
    back = rotated.view(b, out_h, out_w, c, k, k).permute(0, 3, 1, 2, 4, 5).contiguous()
    return F.fold(back.view(b, c * k * k, out_h * out_w), output_size=(height, width),
                  kernel_size=(k, k), stride=(1, 1)).to(dtype)


def conv_problem(base: nn.Module) -> str | None:
    """Why PEFT's OFT cannot adapt this Conv2d (None: it can)."""
    if base.dilation[0] > 1:
        return "has dilation > 1: Conv2d with dilation > 1 is not supported by OFT (as PEFT)"
    if base.kernel_size[0] != base.kernel_size[1]:
        return (f"has a non-square kernel {tuple(base.kernel_size)}: PEFT's OFT sizes the rotation "
                "by kernel_size[0] squared and fails on it")
    return None


class Oft:
    """The `oft` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "oft"
    containers = (("oft_R", nn.ModuleDict),)

    def _static(self, base: nn.Module, site: Site) -> tuple[int, Static]:
        n_in, kernel = in_out_features(base, site.kind)[0], 0
        if site.kind == "Conv2d":
            if problem := conv_problem(base):
                raise UserError(f"`{site.path}` {problem}")
            kernel = base.kernel_size[0]
            n_in *= kernel * kernel
        r, block = sizes(n_in, int(site.option("r", 0)), int(site.option("oft_block_size", 32)))
        share = bool(site.option("block_share", False))
        static = Static(n_in // block if share else r, block, bool(site.option("coft", False)),
                        float(site.option("eps", 6e-5)), bool(site.option("use_cayley_neumann", True)),
                        int(site.option("num_cayley_neumann_terms", 5)), kernel)
        return (1 if share else r), static

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind not in ("Linear", "Conv2d"):
            raise TypeError(f"Target module {layer.base_layer} is not supported by surgeon's OFT "
                            "(Linear and Conv2d layers only).")
        rows, static = self._static(layer.base_layer, site)
        block = static.block_size
        module = Rotation(rows, block * (block - 1) // 2, static)
        if site.option("init_weights", True):
            nn.init.zeros_(module.weight)
        else:
            nn.init.normal_(module.weight, mean=0.0, std=0.1)
        weight = layer.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        layer.oft_R[site.adapter] = module.to(weight.device, dtype)

    def remove(self, layer: LayerView, adapter: str) -> None:
        if adapter in layer.oft_R:
            del layer.oft_R[adapter]

    def num_params(self, base: nn.Module, site: Site) -> int:
        rows, static = self._static(base, site)
        return rows * static.block_size * (static.block_size - 1) // 2

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise MixedBatchError(
            f"`adapter_names` (one adapter per batch row) is not supported by OFT adapters "
            f"(`{layer.path}`), as in PEFT; run one adapter per batch with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        pre = b.before_base()
        static = b.layer.oft_R[adapter].static
        fn = rotate_patches if static.kernel else rotate_input
        pre.input_result(pre.call(fn, pre.x, pre.attr(f"oft_R.{adapter}.weight"), static))
        return prev

    def _matrix(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's `get_delta_weight`: the block-diagonal `(in, in)` rotation, in at least fp32."""
        module = layer.oft_R[adapter]
        weight = module.weight
        if weight.dtype in (torch.float16, torch.bfloat16):
            with torch.no_grad():
                return torch.block_diag(*rotations(weight.detach().float(), module.static))
        with torch.no_grad():
            return torch.block_diag(*rotations(weight, module.static))

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """What merging adds to the base weight (OFT multiplies; this is `W R^T - W`)."""
        weight = layer.base_layer.weight.detach()
        current = weight.flatten(1).float()
        delta = current @ self._matrix(layer, adapter).to(current.dtype).T - current
        return delta.reshape(weight.shape).to(weight.dtype)

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        return (self._matrix(layer, adapter).to(weight.dtype) @ weight.T).T

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        inverse = torch.linalg.inv(self._matrix(layer, adapter).float())
        return (inverse.to(weight.dtype) @ weight.T).T

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None

    def clear_caches(self, layer: LayerView) -> None:
        pass


METHOD = Oft()
