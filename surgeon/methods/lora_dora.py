"""DoRA (weight-decomposed LoRA) for the `lora` method: magnitude, weight norm, forward, merge.

Math as PEFT 0.21 (`peft/tuners/lora/dora.py`, `variants.py`): the output is
`base + (m/||W + s*BA|| - 1) * base_no_bias + m/||W + s*BA|| * s * lora(x)`, the norm taken per
output row and detached from autograd. PEFT recomputes the norm, a full pass over the base
weight, on every forward (~15x a base layer at decode). Here the norm is cached on the
magnitude module and recomputed only when it could have changed: whenever autograd may need a
fresh value (grad enabled and a factor requires grad, i.e. training), under torch.compile, or
when the version counter or storage of `W`, `A` or `B` moved (an optimizer step, `.to()`, a
merge, a load). Writes through `.data` skip version counters: call `AdaptedLayer.relower()`
after them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon.modules_base import CONV_KINDS, emit_base_no_bias, to_out_major

if TYPE_CHECKING:
    from surgeon.modules import AdaptedLayer
    from surgeon.modules_graph import Builder


class DoraMagnitude(nn.Module):
    """`lora_magnitude_vector.<adapter>`: the magnitude `weight`, plus caches kept out of state."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.norm_cache: tuple[tuple, torch.Tensor] | None = None  # (key, norm) for inference
        self.merge_norm: torch.Tensor | None = None  # the norm used by the last merge

    def train(self, mode: bool = True) -> DoraMagnitude:
        self.norm_cache = None
        return super().train(mode)


def weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, kind: str) -> torch.Tensor:
    """`||W + scaling * B @ A||` per output row, in at least fp32, without autograd."""
    with torch.no_grad():
        w = to_out_major(weight, kind)
        dtype = torch.promote_types(w.dtype, torch.float32)
        low_rank = lora_b.flatten(1).to(dtype) @ lora_a.flatten(1).to(dtype)
        return torch.linalg.vector_norm(w.to(dtype) + scaling * low_rank, dim=1)


def dora_norm(mag: DoraMagnitude, weight: torch.Tensor, lora_a: torch.Tensor,
              lora_b: torch.Tensor, scaling: float, kind: str) -> torch.Tensor:
    """The detached weight norm in the magnitude's shape and the base dtype; cached (see above)."""
    shape = mag.weight.shape
    fresh = (torch.is_grad_enabled() and (lora_a.requires_grad or lora_b.requires_grad
                                          or weight.requires_grad))
    if fresh or torch.compiler.is_compiling():
        return weight_norm(weight, lora_a, lora_b, scaling, kind).to(weight.dtype).view(shape)
    key = (weight._version, weight.data_ptr(), lora_a._version, lora_a.data_ptr(),
           lora_b._version, lora_b.data_ptr(), scaling, torch.is_inference_mode_enabled())
    cached = mag.norm_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    norm = weight_norm(weight, lora_a, lora_b, scaling, kind).to(weight.dtype).view(shape)
    mag.norm_cache = (key, norm)
    return norm


def add_magnitude(layer: AdaptedLayer, adapter: str, lora_b: torch.Tensor,
                  lora_a: torch.Tensor) -> None:
    """PEFT's DoRA init: `m = ||W + s*B@A||` (shape `(1, out, 1, ...)` for convolutions).

    `lora_b` and `lora_a` are the out-major factors `(out, r)` and `(r, in*k)`.
    """
    weight = layer.base_layer.weight
    norm = weight_norm(weight, lora_a, lora_b, layer.sites[adapter].scaling, layer.kind)
    if layer.kind in CONV_KINDS:
        norm = norm.view((1, -1) + (1,) * (weight.dim() - 2))
    layer.lora_magnitude_vector[adapter] = DoraMagnitude(norm.to(weight.dtype))


def _scale(b: Builder, adapter: str, lora_a: fx.Node, lora_b: fx.Node) -> fx.Node:
    """`m / ||W + s*BA||` (the node PEFT calls `mag_norm_scale`)."""
    norm = b.call(dora_norm, b.attr(f"lora_magnitude_vector.{adapter}"),
                  b.attr("base_layer.weight"), lora_a, lora_b, b.layer.sites[adapter].scaling,
                  b.layer.kind)
    return b.call(operator.truediv, b.attr(f"lora_magnitude_vector.{adapter}.weight"), norm)


def _without_bias(b: Builder, result: fx.Node) -> fx.Node:
    """PEFT's `base_result - bias` (the bias viewed `(1, -1, 1, ...)` for convolutions)."""
    base = b.layer.base_layer
    if base.bias is None:
        return result
    bias = b.attr("base_layer.bias")
    if b.layer.kind in CONV_KINDS:
        bias = b.method("view", bias, (1, -1) + (1,) * (base.weight.dim() - 2))
    return b.call(operator.sub, result, bias)


def emit(b: Builder, adapter: str, lora: fx.Node, dropped: fx.Node | None,
         prev: fx.Node) -> fx.Node:
    """DoRA branch for Linear, Conv1D and convolutions, given the node `lora = B(A(x))`.

    Without dropout (`dropped` is None) PEFT reuses the running result minus the base bias as
    the base output; with dropout it recomputes the base output on the dropped input.
    """
    scale = _scale(b, adapter, b.attr(f"lora_A.{adapter}.weight"),
                   b.attr(f"lora_B.{adapter}.weight"))
    if b.layer.kind in ("Linear", "Conv1D"):
        scale = b.method("view", scale, 1, -1)
    if dropped is None:
        base = _without_bias(b, prev)
    else:
        base = emit_base_no_bias(b, b.layer.kind, dropped)
    rescaled = b.call(operator.mul, b.call(operator.sub, scale, 1), base)
    adapted = b.call(operator.mul, b.call(operator.mul, scale, lora),
                     b.layer.sites[adapter].scaling)
    return b.result(prev, b.call(operator.add, rescaled, adapted))


def emit_embedding(b: Builder, adapter: str, lora: fx.Node, prev: fx.Node,
                   finish: Callable[[fx.Node], fx.Node]) -> fx.Node:
    """DoRA branch for Embedding: `scale * result + finish(scale * s * lora)`, where
    `lora = embed(x, A.T) @ B.T` and `finish` applies the base's embedding scale."""
    scale = _scale(b, adapter, b.attr(f"lora_embedding_A.{adapter}"),
                   b.attr(f"lora_embedding_B.{adapter}"))
    adapted = b.call(operator.mul, b.call(operator.mul, scale, lora),
                     b.layer.sites[adapter].scaling)
    rescaled = b.call(operator.mul, b.call(operator.sub, scale, 1), prev)
    return b.result(prev, b.call(operator.add, rescaled, finish(adapted)))


def fold(layer: AdaptedLayer, adapter: str, weight: torch.Tensor, unmerged: torch.Tensor,
         delta: torch.Tensor) -> torch.Tensor:
    """`m / ||W0 + dW|| * (W + dW)` with `W0` the weight without any merged adapter (PEFT)."""
    mag = layer.lora_magnitude_vector[adapter]
    norm = torch.linalg.vector_norm(unmerged + delta, dim=1)
    mag.merge_norm = norm
    factor = mag.weight.detach().to(norm.dtype).flatten() / norm
    return factor[:, None] * (weight + delta)


def unfold(layer: AdaptedLayer, adapter: str, weight: torch.Tensor,
           delta: torch.Tensor) -> torch.Tensor:
    """Inverse of `fold`, with the norm that merge used (a pure function of its inputs)."""
    mag = layer.lora_magnitude_vector[adapter]
    if mag.merge_norm is None:
        raise RuntimeError(f"Cannot unmerge DoRA adapter `{adapter}`: the weight norm from merge "
                           "time is not available (was the layer copied or loaded merged?).")
    factor = mag.weight.detach().to(mag.merge_norm.dtype).flatten() / mag.merge_norm
    return weight / factor[:, None] - delta
