"""IA3 on Linear, transformers Conv1D, Conv2d and Conv3d: PEFT 0.21's `peft.tuners.ia3`.

One learned vector `ia3_l[adapter]` per layer scales the base layer's output channels, or, on a
feed-forward layer (`Site.option("is_feedforward")`, from the spec's `feedforward` rule), its
input features. Shapes are PEFT's so checkpoints load as they are: `(out, 1)` / `(1, in)` on
Linear and Conv1D, `(1, C, 1, 1[, 1])` on convolutions.

Neither scaling is `result = prev + delta`, so the branch uses the runtime's two other shapes:
an output part `prev * s` (`Builder.as_result`) or an input part before the base call
(`Builder.before_base` + `input_result`). Merging multiplies the base weight (and, for output
scaling, the bias) by the vector; unmerging divides by `s + 1e-8`, as PEFT does.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.base_kinds import CONV_KINDS, from_out_major, in_out_features, to_out_major
from surgeon.runtime.method import base_parameter

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

KINDS = ("Linear", "Conv1D", "Conv2d", "Conv3d")  # what PEFT's IA3Model._create_new_module takes
_TOLERANCE = 1e-8  # PEFT's guard against division by zero when unmerging


class MixedBatchError(UserError, ValueError):
    """IA3 rows cannot use different adapters in one batch (PEFT ignores `adapter_names`)."""


def is_feedforward(layer: LayerView) -> bool:
    """The layer's mode, as PEFT's `IA3Layer.is_feedforward`: fixed by the first adapter added
    (PEFT's `update_layer` reuses it for later ones), here the first site still present."""
    return bool(next(iter(layer.sites.values())).option("is_feedforward", False))


def _shape(base: nn.Module, kind: str, feedforward: bool) -> tuple[int, ...]:
    n_in, n_out = in_out_features(base, kind)
    if kind in CONV_KINDS:
        return (1, n_in if feedforward else n_out) + (1,) * (base.weight.dim() - 2)
    return (1, n_in) if feedforward else (n_out, 1)


def _vector(layer: LayerView, adapter: str) -> torch.Tensor:
    """The adapter's scale per out-major row (output scaling) or column (input scaling), fp32+."""
    v = layer.ia3_l[adapter].detach()
    return v.to(torch.promote_types(v.dtype, torch.float32)).flatten()


def _scale_matrix(layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """A tensor broadcasting against the out-major `weight` as PEFT's merge multiplies it."""
    v, base = _vector(layer, adapter).to(weight.dtype), layer.base_layer
    if not is_feedforward(layer):
        return v[:, None]
    if layer.kind not in CONV_KINDS:
        return v[None, :]
    # input scaling of a convolution: column (c, k) of group g scales by v[g * c_per_group + c]
    groups, kernel = base.groups, weight.shape[1] // (base.in_channels // base.groups)
    per_group = v.reshape(groups, 1, -1, 1).expand(-1, base.out_channels // groups, -1, kernel)
    return per_group.reshape(base.out_channels, -1)


class Ia3:
    """The `ia3` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "ia3"
    containers = (("ia3_l", nn.ParameterDict),)
    merges_grouped_conv = True  # PEFT's _ConvNd merge expands the vector over groups

    def add(self, layer: LayerView, site: Site) -> None:
        base = layer.base_layer
        if site.kind not in KINDS:
            raise TypeError(f"Target module {base} is not supported by IA3. Currently, only "
                            "`torch.nn.Linear`, `torch.nn.Conv2d`, `torch.nn.Conv3d` and `Conv1D` "
                            "are supported.")
        feedforward = is_feedforward(layer)
        if bool(site.option("is_feedforward", False)) != feedforward:
            warnings.warn(f"`{site.path}`: adapter `{site.adapter}` is feed-forward="
                          f"{not feedforward} but the layer's first adapter set {feedforward}; "
                          "PEFT keeps the first, and so does surgeon.", stacklevel=3)
        vector = torch.randn(_shape(base, site.kind, feedforward))  # drawn even when reset, as PEFT
        if site.option("init_ia3_weights", True):
            vector.fill_(1.0)
        weight = base.weight
        layer.ia3_l[site.adapter] = base_parameter(vector, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        if adapter in layer.ia3_l:
            del layer.ia3_l[adapter]

    def num_params(self, base: nn.Module, site: Site) -> int:
        n_in, n_out = in_out_features(base, site.kind)
        return n_in if site.option("is_feedforward", False) else n_out

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise MixedBatchError(
            f"IA3 adapter `{adapter}` cannot serve a mixed-adapter batch (`adapter_names`): IA3 "
            "scales whole layers. PEFT ignores `adapter_names` for IA3 and applies the active "
            "adapters to every row; call `set_adapter` and run each adapter's rows separately.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        assert rows is None, "check_mixed refuses IA3 in mixed batches"
        if is_feedforward(b.layer):
            _emit_input_scaling(b.before_base(), adapter)
            return prev
        return _emit_output_scaling(b, adapter, prev)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """What merging adds to the base weight (IA3 has no additive delta of its own)."""
        weight = layer.base_layer.weight
        current = to_out_major(weight.detach(), layer.kind).float()
        delta = current * _scale_matrix(layer, adapter, current) - current
        return from_out_major(delta, layer.kind, weight.shape).to(weight.dtype)

    def fold(self, layer: LayerView, adapter: str, weight: torch.Tensor,
             unmerged: torch.Tensor) -> torch.Tensor:
        return weight * _scale_matrix(layer, adapter, weight)

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=4)
        return weight / (_scale_matrix(layer, adapter, weight) + _TOLERANCE)

    def bias_delta(self, layer: LayerView, adapter: str) -> torch.Tensor | None:
        return None  # the bias is scaled, not added to: fold_bias / unfold_bias

    def fold_bias(self, layer: LayerView, adapter: str, bias: torch.Tensor) -> torch.Tensor | None:
        return None if is_feedforward(layer) else bias * _vector(layer, adapter).to(bias.dtype)

    def unfold_bias(self, layer: LayerView, adapter: str, bias: torch.Tensor) -> torch.Tensor | None:
        if is_feedforward(layer):
            return None
        return bias / (_vector(layer, adapter).to(bias.dtype) + _TOLERANCE)

    def clear_caches(self, layer: LayerView) -> None:
        pass


def _casts(b: Builder, adapter: str) -> torch.dtype | None:
    """The vector's dtype when it differs from the base weight's (PEFT casts around it)."""
    dtype = b.layer.ia3_l[adapter].dtype
    return None if dtype == b.layer.base_layer.weight.dtype else dtype


def _scale(b: Builder, adapter: str) -> fx.Node:
    """The vector as PEFT multiplies by it: flattened on Linear/Conv1D, as stored on convs."""
    vector = b.attr(f"ia3_l.{adapter}")
    return vector if b.layer.kind in CONV_KINDS else b.call(torch.flatten, vector)


def _emit_input_scaling(pre: Builder, adapter: str) -> None:
    """PEFT: `base((x.to(dtype) * s).to(x.dtype))` (convs: `.to(base weight dtype)`)."""
    dtype, x = _casts(pre, adapter), pre.x
    h = x if dtype is None else pre.method("to", x, dtype)
    h = pre.call(torch.mul, h, _scale(pre, adapter))
    if dtype is not None:
        h = pre.method("type_as", h, x if pre.layer.kind not in CONV_KINDS
                       else pre.attr("base_layer.weight"))
    pre.input_result(h)


def _emit_output_scaling(b: Builder, adapter: str, prev: fx.Node) -> fx.Node:
    """PEFT: Linear `(y * s).to(y.dtype)`; convs `y.to(dtype) * s` (the epilogue casts back)."""
    dtype, conv = _casts(b, adapter), b.layer.kind in CONV_KINDS
    y = prev if dtype is None or not conv else b.method("to", prev, dtype)
    y = b.call(torch.mul, y, _scale(b, adapter))
    if dtype is not None and not conv:
        y = b.method("type_as", y, prev)
    return b.as_result(y)


METHOD = Ia3()
