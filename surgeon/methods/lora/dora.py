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
        if (b.shape[0], a.shape[1]) == w.shape:
            if kernels.wanted(w.device) and dtype == torch.float32:
                return kernels.dora_norm(w, a, b, scaling)  # one pass over W, no W' built
            if w.numel() >= _EXPANDED_FROM and w.device.type != "meta":  # (meta: a capture,
                return _expanded_norm(w.to(dtype), a.to(dtype), b.to(dtype), scaling)  # PEFT's)
            if w.device.type != "meta":  # W + s*B@A as one addmm: one weight-sized tensor, not three
                return torch.linalg.vector_norm(torch.addmm(w.to(dtype), b.to(dtype), a.to(dtype),
                                                            alpha=scaling), dim=1)
        low_rank = lora_b.reshape(-1, r).to(dtype) @ lora_a.reshape(r, -1).to(dtype)
        return torch.linalg.vector_norm(w.to(dtype) + scaling * low_rank.reshape(w.shape), dim=1)


# Weights from this size (1 MiB in fp32) take `_expanded_norm` on CPU: building W' there spills
# the cache (1024 x 1024: 4.8 ms built, 0.7 ms expanded); below it, building is faster (46 us
# against 74 us at 256 x 256).
_EXPANDED_FROM = 1 << 18


def _expanded_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`||W + s*B@A||` per row as `sqrt(|W|^2 + 2s <W A^T, B> + s^2 <B (A A^T), B>)`: two reads
    of W (a norm and a thin GEMM), where building `W'` takes about six passes over a weight-sized
    tensor. Equal to the built norm to float rounding unless `W'` nearly cancels `W` (the error
    is then relative to `|W|`)."""
    square = torch.linalg.vector_norm(w, dim=1).square()
    square += (2 * scaling) * ((w @ a.t()) * b).sum(1)
    square += (scaling * scaling) * ((b @ (a @ a.t())) * b).sum(1)
    return square.clamp_min_(0).sqrt_()


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
    `base`; with dropout it recomputes the base output on the dropped input. On a Linear or
    Conv1D the combination is one fused call (`dora_linear`) instead of four elementwise ops.
    """
    if _fusable(b, adapter, lora):
        return _emit_fused(b, adapter, lora, dropped, prev)
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


def _fusable(b: Builder, adapter: str, lora: fx.Node) -> bool:
    """`lora` is `linear(linear(x, A), B)` (no LoRA bias) and every tensor shares one dtype."""
    layer = b.layer
    if layer.kind not in ("Linear", "Conv1D") or quantized.quant_of(layer.base_layer) is not None:
        return False
    if lora.target is not torch._C._nn.linear or len(lora.args) != 2 or lora.kwargs or lora.users:
        return False
    dtypes = {layer.base_layer.weight.dtype, layer.lora_B[adapter].weight.dtype,
              layer.lora_A[adapter].weight.dtype, layer.lora_magnitude_vector[adapter].weight.dtype}
    return len(dtypes) == 1 and next(iter(dtypes)).is_floating_point


def _emit_fused(b: Builder, adapter: str, lora: fx.Node, dropped: fx.Node | None,
                prev: fx.Node) -> fx.Node:
    """The `dora_linear_of` node, replacing the expand `lora = linear(h, B)` it folds in."""
    h, lora_b = lora.args
    b.graph.erase_node(lora)
    base = b.layer.base_layer
    factors = (b.attr(f"lora_magnitude_vector.{adapter}"), _weight_node(b),
               b.attr(f"lora_A.{adapter}.weight"), b.layer.sites[adapter].scaling, b.layer.kind)
    if dropped is None:
        bias = b.attr("base_layer.bias") if base.bias is not None else None
        return b.as_result(b.call(dora_linear_of, prev, None, bias, h, lora_b, *factors))
    base_out = emit_base_no_bias(b, b.layer.kind, dropped)
    return b.as_result(b.call(dora_linear_of, prev, base_out, None, h, lora_b, *factors))


def dora_linear_of(prev: torch.Tensor, base: torch.Tensor | None, bias: torch.Tensor | None,
                   h: torch.Tensor, lora_b: torch.Tensor, mag: DoraMagnitude,
                   weight: torch.Tensor, lora_a: torch.Tensor, scaling: float,
                   kind: str) -> torch.Tensor:
    """`dora_linear` with its factors from the magnitude: where autograd needs fresh factors
    (training), `m` and the detached norm go into one custom Function (`_DoraLinearM`), which
    forms `m / norm` itself and returns `m`'s gradient, in place of four autograd nodes
    (divide, view, subtract, multiply) per layer; otherwise `dora_factors` (cached)."""
    m = mag.weight
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (m.requires_grad or lora_a.requires_grad or lora_b.requires_grad or weight.requires_grad)):
        norm = weight_norm(weight, lora_a, lora_b, scaling, kind).to(weight.dtype)
        return _DoraLinearM.apply(prev, base, bias, h, lora_b, m, norm, scaling)
    rescale, adapt = dora_factors(mag, weight, lora_a, lora_b, scaling, kind)
    return dora_linear(prev, base, bias, h, lora_b, rescale, adapt)


def dora_linear(prev: torch.Tensor, base: torch.Tensor | None, bias: torch.Tensor | None,
                h: torch.Tensor, lora_b: torch.Tensor, rescale: torch.Tensor,
                adapt: torch.Tensor) -> torch.Tensor:
    """PEFT's `prev + (scale - 1) * base + scale * s * B(h)` in one pass over the output.

    `base` None means PEFT's `prev - bias` (no dropout); `rescale` is `scale - 1` and `adapt`
    `scale * s`, shaped `(1, out)`. The expand is an `addmm` with `adapt` folded into `B`'s rows
    (a `(out, r)` product, not a pass over the output); in training a custom backward gives the
    same gradients with two passes over the output instead of about eight.
    """
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
            t is not None and t.requires_grad for t in (prev, base, h, lora_b, rescale, adapt)):
        return _DoraLinear.apply(prev, base, bias, h, lora_b, rescale, adapt)
    return _dora_linear(prev, base, bias, h, lora_b, rescale, adapt)


def _dora_linear(prev, base, bias, h, lora_b, rescale, adapt, scaled_b=None):
    rescale, adapt = rescale.reshape(-1), adapt.reshape(-1)
    if base is not None:
        out = torch.addcmul(prev, rescale, base)
    elif bias is None:
        out = torch.addcmul(prev, prev, rescale)
    else:  # prev + rescale * (prev - bias), in one pass
        out = torch.addcmul(-rescale * bias, prev, rescale + 1)
    flat = out.view(-1, out.shape[-1])
    scaled_b = lora_b * adapt[:, None] if scaled_b is None else scaled_b
    flat.addmm_(h.reshape(-1, h.shape[-1]), scaled_b.t())
    return out


class _DoraLinear(torch.autograd.Function):
    """`dora_linear` with a backward that reads the output gradient twice (see there)."""

    @staticmethod
    def forward(ctx, prev, base, bias, h, lora_b, rescale, adapt):
        ctx.save_for_backward(prev if base is None else base, bias, h, lora_b, rescale, adapt)
        ctx.plain = base is None
        return _dora_linear(prev, base, bias, h, lora_b, rescale, adapt)

    @staticmethod
    def backward(ctx, grad):
        source, bias, h, lora_b, rescale, adapt = ctx.saved_tensors
        grads = _dora_backward(ctx.plain, ctx.needs_input_grad, grad, source, bias, h, lora_b,
                               rescale.reshape(-1), adapt.reshape(-1))
        grad_rescale, grad_adapt = grads[5:]
        return (*grads[:5], None if grad_rescale is None else grad_rescale.view(rescale.shape),
                None if grad_adapt is None else grad_adapt.view(adapt.shape))


def _dora_backward(plain: bool, needs: tuple, grad, source, bias, h, lora_b, rescale, adapt,
                   scale=None, scaled_b=None):
    """`dora_linear`'s gradients: `(prev, base, bias (None), h, B, rescale, adapt)`, the last
    two flat; `needs` says which are wanted, in that order. `scale` (`rescale + 1`) and
    `scaled_b` (`B * adapt`) are recomputed unless given."""
    g = grad.reshape(-1, grad.shape[-1])
    grad_prev = grad_base = grad_rescale = grad_adapt = grad_h = grad_b = None
    if plain:  # out = prev + rescale * (prev - bias)
        grad_prev = grad * (rescale + 1 if scale is None else scale) if needs[0] else None
    else:
        grad_prev = grad
        grad_base = grad * rescale if needs[1] else None
    if needs[5]:
        grad_rescale = (g * source.reshape(g.shape)).sum(0)
        if plain and bias is not None:
            grad_rescale -= g.sum(0) * bias
    if needs[3]:
        grad_h = (g @ (lora_b * adapt[:, None] if scaled_b is None else scaled_b)).view(h.shape)
    if needs[4] or needs[6]:
        grad_scaled = g.t() @ h.reshape(-1, h.shape[-1])  # (out, r)
        grad_b = grad_scaled * adapt[:, None] if needs[4] else None
        if needs[6]:
            grad_adapt = (grad_scaled * lora_b).sum(1)
    return grad_prev, grad_base, None, grad_h, grad_b, grad_rescale, grad_adapt


class _DoraLinearM(torch.autograd.Function):
    """`dora_linear` taking the magnitude `m` and the detached norm: `scale = m / norm`,
    `rescale = scale - 1`, `adapt = scale * scaling` formed here, `m`'s gradient returned as
    `(d rescale + scaling * d adapt) / norm` (PEFT's autograd through the same expressions)."""

    @staticmethod
    def forward(ctx, prev, base, bias, h, lora_b, m, norm, scaling):
        scale = m.reshape(-1) / norm
        rescale, adapt = scale - 1, scale * scaling
        scaled_b = lora_b * adapt[:, None]
        ctx.save_for_backward(prev if base is None else base, bias, h, lora_b, rescale, adapt, norm,
                              scale, scaled_b)
        ctx.plain, ctx.scaling, ctx.m_shape = base is None, scaling, m.shape
        return _dora_linear(prev, base, bias, h, lora_b, rescale, adapt, scaled_b)

    @staticmethod
    def backward(ctx, grad):
        source, bias, h, lora_b, rescale, adapt, norm, scale, scaled_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _dora_backward(ctx.plain, (*needs[:6], needs[5]), grad, source, bias, h, lora_b,
                               rescale, adapt, scale, scaled_b)
        grad_m = None
        if ctx.needs_input_grad[5]:
            grad_rescale, grad_adapt = grads[5:]
            grad_m = grad_rescale.add_(grad_adapt, alpha=ctx.scaling).div_(norm).view(ctx.m_shape)
        return (*grads[:5], grad_m, None, None)


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
