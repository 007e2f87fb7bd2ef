"""BOFT on Linear and Conv2d: PEFT 0.21's `peft.tuners.boft` rotation, names, init and merge.

Each adapter trains `boft_R[adapter]`, `(N, D, b, b)`: N butterfly factors of D blocks whose
Cayley transforms `(I - S)(I + S)^-1` (S the skew part) are the blocks of an orthogonal `M`
(`butterfly.py`), and `boft_s[adapter]`, one scale per output feature. PEFT's fused CUDA
block-diagonal kernel is replaced by its pure-torch math.

Linear: PEFT's forward is `(base(x M) - bias) * s + bias`, with M built densely on every call.
Here the rotation acts on the INPUT, blockwise (an input part, `n b` multiply-adds per token and
factor, no `n x n` matrix), and the scale on the output (an output part). With several active
adapters PEFT multiplies `x (M_last ... M_first)`, so the adapter emitted later acts first: its
input part goes in front of the earlier ones (`_first_input_part`).

Conv2d: PEFT convolves with `W M^T s` (W flattened to `(out, in k k)`). Rotating the input
instead would need the unfolded patches (k*k times the input), so here the kernel is rotated
blockwise by a weight part (`Builder.weight_part`) that the base convolution then reads; several
adapters chain `W M_1^T M_2^T ...` in order, as PEFT's combined rotation.

Merging writes `W M^T s` into the weight; unmerging `W M / s` (M is orthogonal), as PEFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.methods.boft.butterfly import ButterflyDropout, SizeError, Static, cayley, rotate, static
from surgeon.runtime.base_kinds import in_out_features
from surgeon.runtime.graph import META, Builder, tag

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import LayerView


class MixedBatchError(UserError, ValueError):
    """PEFT's BOFT layers take no `adapter_names` (one adapter per batch row)."""


def rotate_input(x: torch.Tensor, blocks: torch.Tensor, perms: tuple) -> torch.Tensor:
    """The Linear input part: `x M` (PEFT casts the rotation to the input's dtype)."""
    return rotate(x, blocks.to(x.dtype), perms)


def rescale(prev: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The Linear output part: PEFT's `(y - bias) * s + bias`."""
    if bias is None:
        return prev * scale.squeeze(-1)
    return (prev - bias) * scale.squeeze(-1) + bias


def rotate_kernel(weight: torch.Tensor, blocks: torch.Tensor, perms: tuple,
                  scale: torch.Tensor) -> torch.Tensor:
    """The Conv2d weight part: PEFT's `W M^T s` in the kernel's layout."""
    flat = rotate(weight.flatten(1), blocks.to(weight.dtype), perms, transpose=True)
    return (flat * scale.reshape(-1, 1)).to(weight.dtype).reshape(weight.shape)


def conv_problem(base: nn.Module) -> str | None:
    """Why PEFT's BOFT Conv2d forward is not `base` with a rotated kernel (None: it is)."""
    if base.groups > 1:
        return f"has groups={base.groups}: BOFT does not support Conv2d layers with groups > 1"
    if base.kernel_size[0] != base.kernel_size[1]:
        return f"has a non-square kernel {tuple(base.kernel_size)}: PEFT's BOFT assumes a square one"
    odd = isinstance(base.padding, str) or len(set(base.padding)) > 1 or len(set(base.stride)) > 1 \
        or tuple(base.dilation) != (1, 1) or base.padding_mode != "zeros"
    if odd:
        return ("has dilation, asymmetric or string padding, asymmetric stride or a padding mode: "
                "PEFT's BOFT convolves with padding[0] and stride[0] only, so its merged and "
                "unmerged outputs would differ")
    return None


def _first_input_part(b: Builder) -> Builder:
    """A Builder whose part runs before every input part already emitted (its `x` is the layer
    input): PEFT's `x (M_last ... M_first)` applies the adapter emitted later first. It emits
    just before the first part's end, after the earlier parts' blocks, so dropouts draw from
    the RNG in adapter order, as PEFT's loop."""
    x = next(n for n in b.graph.nodes if tag(n).get("role") == "input")
    anchor = next(n for n in b.graph.nodes if tag(n).get("role") in ("input_result", "base", "base_out"))
    return Builder(b.graph, b.layer, x, anchor, b.tag, b.role)


def _lead(pre: Builder, node: fx.Node) -> None:
    """Make `node` the input every later reader of the layer input (the base call or the
    earlier first input part) reads instead."""
    node.meta[META]["role"] = "input_result"
    for user in list(pre.x.users):
        if user is not node and tag(user).get("adapter") != pre.tag["adapter"]:
            user.replace_input_with(pre.x, node)


class Boft:
    """The `boft` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "boft"
    containers = (("boft_R", nn.ParameterDict), ("boft_s", nn.ParameterDict),
                  ("boft_dropout", nn.ModuleDict))

    def _static(self, base: nn.Module, site: Site) -> Static:
        n_in = in_out_features(base, site.kind)[0]
        what = "in_features"
        if site.kind == "Conv2d":
            if problem := conv_problem(base):
                raise SizeError(f"`{site.path}` {problem}")
            n_in, what = n_in * base.kernel_size[0] * base.kernel_size[0], "Convolutional kernel dimension"
        return static(n_in, int(site.option("boft_block_size", 4)), int(site.option("boft_block_num", 0)),
                      int(site.option("boft_n_butterfly_factor", 1)), what)

    def add(self, layer: LayerView, site: Site) -> None:
        shape = self._static(layer.base_layer, site)
        n_out = in_out_features(layer.base_layer, site.kind)[1]
        rot = torch.zeros(shape.factors, shape.blocks, shape.block_size, shape.block_size)
        scale = torch.ones(n_out, 1) if site.kind == "Linear" else torch.ones(1, n_out)
        if not site.option("init_weights", True):
            nn.init.normal_(rot, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        weight = layer.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        a = site.adapter
        layer.boft_R[a] = nn.Parameter(rot.to(weight.device, dtype))
        layer.boft_s[a] = nn.Parameter(scale.to(weight.device, dtype))
        layer.boft_dropout[a] = ButterflyDropout(float(site.option("boft_dropout", 0.0)), shape)

    def remove(self, layer: LayerView, adapter: str) -> None:
        for name in ("boft_R", "boft_s", "boft_dropout"):
            container = getattr(layer, name)
            if adapter in container:
                del container[adapter]

    def num_params(self, base: nn.Module, site: Site) -> int:
        shape = self._static(base, site)
        n_out = in_out_features(base, site.kind)[1]
        return shape.factors * shape.blocks * shape.block_size**2 + n_out

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise MixedBatchError(
            f"`adapter_names` (one adapter per batch row) is not supported by BOFT adapters "
            f"(`{layer.path}`), as in PEFT; run one adapter per batch with `set_adapter`.")

    def _blocks(self, pre: Builder, adapter: str) -> fx.Node:
        """The adapter's Cayley blocks, through its dropout in training."""
        blocks = pre.call(cayley, pre.attr(f"boft_R.{adapter}"))
        if pre.layer.training and pre.layer.boft_dropout[adapter].p > 0:
            blocks = pre.module(f"boft_dropout.{adapter}", blocks)
        return blocks

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        perms = b.layer.boft_dropout[adapter].static.perms
        if b.layer.kind == "Conv2d":
            part = b.weight_part()
            scale = part.attr(f"boft_s.{adapter}")
            part.weight_result(part.call(rotate_kernel, part.x, self._blocks(part, adapter), perms, scale))
            return prev
        pre = _first_input_part(b)
        _lead(pre, pre.call(rotate_input, pre.x, self._blocks(pre, adapter), perms))
        bias = b.attr("base_layer.bias") if b.layer.base_layer.bias is not None else None
        return b.as_result(b.call(rescale, prev, b.attr(f"boft_s.{adapter}"), bias))

    def _parts(self, layer: LayerView, adapter: str, dtype: torch.dtype) -> tuple:
        """`(blocks, perms, scale as a column)` in `dtype`, without autograd."""
        with torch.no_grad():
            weight = layer.boft_R[adapter].detach()
            blocks = cayley(weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight)
            scale = layer.boft_s[adapter].detach().reshape(-1, 1)
        return blocks.to(dtype), layer.boft_dropout[adapter].static.perms, scale.to(dtype)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """What merging adds to the base weight (BOFT multiplies; this is `W M^T s - W`)."""
        weight = layer.base_layer.weight.detach()
        current = weight.flatten(1).float()
        return (self.fold(layer, adapter, current, current) - current).reshape(weight.shape).to(weight.dtype)

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        blocks, perms, scale = self._parts(layer, adapter, weight.dtype)
        return rotate(weight, blocks, perms, transpose=True) * scale

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        blocks, perms, scale = self._parts(layer, adapter, weight.dtype)
        return rotate(weight, blocks, perms) * (1 / scale)

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None

    def clear_caches(self, layer: LayerView) -> None:
        pass


METHOD = Boft()
