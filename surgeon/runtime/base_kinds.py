"""Base layer kinds: how each `Site.kind` is called functionally and how its weight is laid out.

Methods reason about a base weight as an *out-major matrix* `(out_features, in_features*k)`:
nn.Linear's own layout. `to_out_major` / `from_out_major` convert each kind's storage to and from
it (transformers' Conv1D stores `(in, out)`, an Embedding `(num_embeddings, dim)` and is adapted
along `dim`, a convolution flattens its kernel). With that one view, delta weights, DoRA norms and
merges are written once for every kind.

`emit_base` emits the base call of an adapted layer: the functional op on the base parameters
when the base is exactly the torch class with no hooks (one Python call instead of a module
`__call__`), else a `call_module` so hooks, quantised subclasses and accelerate's offloading keep
working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from surgeon.layer_kinds import ANY_MODULE_KINDS, CONV_KINDS, WHOLE_MODULE_KINDS, kind_class

if TYPE_CHECKING:
    from surgeon.runtime.graph import Builder

_CONV_FN = {"Conv1d": torch.conv1d, "Conv2d": torch.conv2d, "Conv3d": torch.conv3d}


def in_out_features(base: nn.Module, kind: str) -> tuple[int, int]:
    """`(in, out)` as PEFT's `_get_in_out_features` counts them for `kind`."""
    if kind == "Linear":
        return base.in_features, base.out_features
    if kind == "Conv1D":
        n_in, n_out = base.weight.shape
        return n_in, n_out
    if kind in CONV_KINDS:
        return base.in_channels, base.out_channels
    if kind == "Embedding":
        return base.num_embeddings, base.embedding_dim
    if kind == "MultiheadAttention":  # its in_proj: q, k and v stacked
        return base.embed_dim, 3 * base.embed_dim
    raise ValueError(f"Unknown base kind `{kind}`.")


def main_weight(base: nn.Module, kind: str) -> torch.Tensor:
    """The weight adapters follow for device and dtype: `weight`, a MultiheadAttention's
    `in_proj_weight` (it has no `weight`)."""
    if kind in ANY_MODULE_KINDS:  # a module adapted whole (a norm, a container): its first
        return next(base.parameters())  # parameter (whole-module methods refuse parameter-free ones)
    return base.in_proj_weight if kind == "MultiheadAttention" else base.weight


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """`main_weight` of an adapted layer; for a bare parameter's layer (LoRA's
    `target_parameters`), that parameter."""
    if layer.kind == "Parameter":
        name = next(iter(layer.sites.values())).option("parameter_name")
        return getattr(layer.base_layer, name)
    return main_weight(layer.base_layer, layer.kind)


def to_out_major(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The base weight as an `(out, in*k)` matrix (a view where the layout allows)."""
    if kind in ("Conv1D", "Embedding"):
        return weight.t()
    if kind in CONV_KINDS:
        return weight.flatten(1)
    return weight


def from_out_major(matrix: torch.Tensor, kind: str, shape: torch.Size) -> torch.Tensor:
    """Inverse of `to_out_major`: back to the storage layout `shape` of the base weight."""
    if kind in ("Conv1D", "Embedding"):
        return matrix.t()
    return matrix.reshape(shape)


def conv_fn(kind: str):
    """`torch.convNd` for a convolution kind."""
    return _CONV_FN[kind]


def can_inline(base: nn.Module, kind: str) -> bool:
    """Whether calling the functional op is exactly what `base(x)` would do."""
    if kind in WHOLE_MODULE_KINDS or type(base) is not kind_class(kind):
        return False
    hooks = (base._forward_hooks, base._forward_pre_hooks, base._backward_hooks,
             base._backward_pre_hooks)
    # accelerate and others patch an instance-level `forward`: respect it.
    if any(hooks) or "forward" in base.__dict__:
        return False
    if kind in CONV_KINDS and base.padding_mode != "zeros":
        return False
    if kind == "Embedding" and base.max_norm is not None:
        return False  # max_norm renormalises the table in place inside the module's forward
    return True


def embedding_args(base: nn.Module) -> tuple[int, bool, bool]:
    """`(padding_idx, scale_grad_by_freq, sparse)` as `F.embedding` normalises them."""
    pad = base.padding_idx
    pad = -1 if pad is None else (pad if pad >= 0 else base.num_embeddings + pad)
    return pad, base.scale_grad_by_freq, base.sparse


def emit_base(b: Builder, kind: str) -> torch.fx.Node:
    """Emit `base_layer(x)` into the graph and return the result node."""
    base = b.layer.base_layer
    if not can_inline(base, kind):
        return b.module("base_layer", b.x)
    weight = b.attr("base_layer.weight")
    if kind == "Embedding":
        return b.call(torch.embedding, weight, b.x, *embedding_args(base))
    bias = b.attr("base_layer.bias") if base.bias is not None else None
    if kind == "Linear":
        return b.call(torch._C._nn.linear, b.x, weight, bias)
    if kind == "Conv1D":
        return b.call(torch._C._nn.linear, b.x, b.call(torch.t, weight), bias)
    return b.call(conv_fn(kind), b.x, weight, bias, base.stride, base.padding, base.dilation,
                  base.groups)


def emit_base_no_bias(b: Builder, kind: str, x: torch.fx.Node) -> torch.fx.Node:
    """Emit the base weight applied to `x` without the bias (DoRA's dropout path)."""
    base = b.layer.base_layer
    weight = b.attr("base_layer.weight")
    if kind == "Linear":
        return b.call(torch._C._nn.linear, x, weight)
    if kind == "Conv1D":
        return b.call(torch._C._nn.linear, x, b.call(torch.t, weight))
    return b.call(conv_fn(kind), x, weight, None, base.stride, base.padding, base.dilation,
                  base.groups)
