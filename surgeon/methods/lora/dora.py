"""DoRA (weight-decomposed LoRA) for the `lora` method: magnitude, weight norm, forward, merge.

Math as PEFT 0.21 (`peft/tuners/lora/dora.py`, `variants.py`): the output is
`base + (scale - 1) * base_no_bias + scale * s * lora(x)` with `scale = m / ||W + s*BA||`, the
norm taken per output row and detached from autograd. PEFT recomputes the norm, a full pass
over the base weight, on every forward (~15x a base layer at decode). Here the two per-row
factors `scale - 1` and `scale * s` are cached on the magnitude module and recomputed only when
they could have changed: whenever autograd may need fresh ones (grad enabled and `m`, `A`, `B`
or `W` requires grad, i.e. training), under torch.compile, or when the version counter or
storage of `W`, `A`, `B` or `m` moved (an optimizer step, `.to()`, a merge, a load). Writes
through `.data` skip version counters: call `AdaptedLayer.relower()` after them.

On a bitsandbytes base (PEFT's bnb DoRA) the norm and, with dropout, the base output on the
dropped input use the dequantised weight (`quantized.float_weight`), as PEFT does each forward;
without dropout the quantised base output is reused, as on any base.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon import kernels
from surgeon.runtime import quantized
from surgeon.runtime.base_kinds import CONV_KINDS, emit_base_no_bias, to_out_major

if TYPE_CHECKING:
    from surgeon.runtime.graph import Builder, LayerView


class DoraMagnitude(nn.Module):
    """`lora_magnitude_vector.<adapter>`: the magnitude `weight`, plus caches kept out of state."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        # (key, (scale - 1, scale * s)) for inference forwards, see `dora_factors`
        self.norm_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.merge_norm: torch.Tensor | None = None  # the norm used by the last merge

    def train(self, mode: bool = True) -> DoraMagnitude:
        self.norm_cache = None
        return super().train(mode)


def weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, kind: str) -> torch.Tensor:
    """`||W + scaling * B @ A||` per output row, in at least fp32, without autograd.

    `B @ A` is PEFT's `mm(B.view(-1, r), A.view(r, -1))` reshaped to the weight: the plain
    product for every ungrouped kind, and for a grouped convolution (B holds `r / groups`
    columns per output channel) the same reshaped product PEFT's DoRA takes its norm of.
    """
    with torch.no_grad():
        w = to_out_major(weight, kind)
        dtype = torch.promote_types(w.dtype, torch.float32)
        r = lora_a.shape[0]
        a, b = lora_a.reshape(r, -1), lora_b.reshape(-1, r)
        if kernels.wanted(w.device) and (b.shape[0], a.shape[1]) == w.shape and dtype == torch.float32:
            return kernels.dora_norm(w, a, b, scaling)  # one pass over W, no W' built
        low_rank = lora_b.reshape(-1, r).to(dtype) @ lora_a.reshape(r, -1).to(dtype)
        return torch.linalg.vector_norm(w.to(dtype) + scaling * low_rank.reshape(w.shape), dim=1)


def _factors(mag: DoraMagnitude, weight: torch.Tensor, lora_a: torch.Tensor,
             lora_b: torch.Tensor, scaling: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    norm = weight_norm(weight, lora_a, lora_b, scaling, kind).to(weight.dtype)
    scale = mag.weight / norm.view(mag.weight.shape)  # PEFT's mag_norm_scale
    if kind in ("Linear", "Conv1D"):
        scale = scale.view(1, -1)
    return scale - 1, scale * scaling


def dora_factors(mag: DoraMagnitude, weight: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float,
                 kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(m/||W + s*BA|| - 1, s * m/||W + s*BA||)` shaped to broadcast over the output.

    The norm is detached (PEFT, after the DoRA paper); gradients reach `m` through the
    factors. Computed afresh when autograd may need them, else cached (see module docstring).
    """
    m = mag.weight
    # a bitsandbytes base comes as its layer: keyed on the stored (packed) weight
    source = weight.weight if isinstance(weight, nn.Module) else weight
    fresh = torch.is_grad_enabled() and (m.requires_grad or lora_a.requires_grad
                                         or lora_b.requires_grad or source.requires_grad)
    if fresh or torch.compiler.is_compiling():
        return _factors(mag, _dense(weight), lora_a, lora_b, scaling, kind)
    key = (id(source), source._version, source.data_ptr(), lora_a._version, lora_a.data_ptr(),
           lora_b._version, lora_b.data_ptr(), m._version, m.data_ptr(), scaling,
           torch.is_inference_mode_enabled())
    cached = mag.norm_cache
    if cached is None or cached[0] != key:
        cached = mag.norm_cache = (key, _factors(mag, _dense(weight), lora_a, lora_b, scaling,
                                                 kind))
    return cached[1]


def _dense(weight: torch.Tensor | nn.Module) -> torch.Tensor:
    """The float weight: itself, or a bitsandbytes layer's weight dequantised (PEFT's
    `dequantize_module_weight`, which its DoRA runs on every forward)."""
    return quantized.float_weight(weight) if isinstance(weight, nn.Module) else weight


def _dense_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA dropout path on a bitsandbytes base: `F.linear(x, dequantised W)`, not the
    quantised kernel."""
    return torch._C._nn.linear(x, quantized.float_weight(base).to(x.dtype))


def _weight_node(b: Builder) -> fx.Node:
    """The base weight, or for a bitsandbytes base the layer itself (dequantised when used)."""
    quantised = quantized.quant_of(b.layer.base_layer) is not None
    return b.attr("base_layer" if quantised else "base_layer.weight")


def add_magnitude(layer: LayerView, adapter: str, lora_b: torch.Tensor,
                  lora_a: torch.Tensor) -> None:
    """PEFT's DoRA init: `m = ||W + s*B@A||` (shape `(1, out, 1, ...)` for convolutions).

    `lora_b` and `lora_a` are the out-major factors `(out, r)` and `(r, in*k)`.
    """
    base = layer.base_layer
    weight = base.weight if quantized.quant_of(base) is None else quantized.float_weight(base)
    norm = weight_norm(weight, lora_a, lora_b, layer.sites[adapter].scaling, layer.kind)
    if layer.kind in CONV_KINDS:
        norm = norm.view((1, -1) + (1,) * (weight.dim() - 2))
    layer.lora_magnitude_vector[adapter] = DoraMagnitude(norm.to(weight.dtype))


def _factor_nodes(b: Builder, adapter: str, lora_a: fx.Node,
                  lora_b: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Nodes for `scale - 1` and `scale * s`, where `scale = m / ||W + s*BA||`."""
    factors = b.call(dora_factors, b.attr(f"lora_magnitude_vector.{adapter}"),
                     _weight_node(b), lora_a, lora_b,
                     b.layer.sites[adapter].scaling, b.layer.kind)
    return b.call(operator.getitem, factors, 0), b.call(operator.getitem, factors, 1)


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
    """DoRA branch for Linear, Conv1D and convolutions, given the node `lora = B(A(x))`:
    `prev + (scale - 1) * base + scale * s * lora`.

    Without dropout (`dropped` is None) PEFT reuses the running result minus the base bias as
    `base`; with dropout it recomputes the base output on the dropped input.
    """
    rescale, adapt = _factor_nodes(b, adapter, b.attr(f"lora_A.{adapter}.weight"),
                                   b.attr(f"lora_B.{adapter}.weight"))
    if dropped is None:
        base = _without_bias(b, prev)
    elif quantized.quant_of(b.layer.base_layer) is not None:
        base = b.call(_dense_linear, b.attr("base_layer"), dropped)
    else:
        base = emit_base_no_bias(b, b.layer.kind, dropped)
    delta = b.call(torch.addcmul, b.call(operator.mul, rescale, base), adapt, lora)
    return b.result(prev, delta)


def emit_embedding(b: Builder, adapter: str, lora: fx.Node, prev: fx.Node,
                   finish: Callable[[fx.Node], fx.Node]) -> fx.Node:
    """DoRA branch for Embedding: `prev + (scale - 1) * prev + finish(scale * s * lora)`, where
    `lora = embed(x, A.T) @ B.T` and `finish` applies the base's embedding scale."""
    rescale, adapt = _factor_nodes(b, adapter, b.attr(f"lora_embedding_A.{adapter}"),
                                   b.attr(f"lora_embedding_B.{adapter}"))
    adapted = finish(b.call(operator.mul, adapt, lora))
    return b.result(prev, b.call(torch.addcmul, adapted, rescale, prev))


def fold(layer: LayerView, adapter: str, weight: torch.Tensor, unmerged: torch.Tensor,
         delta: torch.Tensor) -> torch.Tensor:
    """`m / ||W0 + dW|| * (W + dW)` with `W0` the weight without any merged adapter (PEFT)."""
    mag = layer.lora_magnitude_vector[adapter]
    summed = weight + delta
    # with nothing merged yet `unmerged` is `weight`: its sum is the one computed above
    norm = torch.linalg.vector_norm(summed if unmerged is weight else unmerged + delta, dim=1)
    mag.merge_norm = norm
    factor = mag.weight.detach().to(norm.dtype).flatten() / norm
    return summed.mul_(factor[:, None]) if summed.dtype == factor.dtype else factor[:, None] * summed


def unfold(layer: LayerView, adapter: str, weight: torch.Tensor,
           delta: torch.Tensor) -> torch.Tensor:
    """Inverse of `fold`, with the norm that merge used (a pure function of its inputs)."""
    mag = layer.lora_magnitude_vector[adapter]
    if mag.merge_norm is None:
        raise RuntimeError(f"Cannot unmerge DoRA adapter `{adapter}`: the weight norm from merge "
                           "time is not available (was the layer copied or loaded merged?).")
    factor = mag.weight.detach().to(mag.merge_norm.dtype).flatten() / mag.merge_norm
    restored = weight / factor[:, None]
    return restored.sub_(delta) if restored.dtype == delta.dtype else restored - delta
