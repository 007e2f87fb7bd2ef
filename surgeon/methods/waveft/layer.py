"""WaveFT on Linear and transformers Conv1D: PEFT 0.21's `peft.tuners.waveft` math, names, init.

Each adapter trains `waveft_spectrum[adapter]`, `n_frequency` wavelet coefficients at fixed
random positions of the `(out, in)` coefficient matrix (`randperm` seeded by
`random_loc_seed`, kept as the non-persistent buffer `waveft_indices[adapter]`, `(2, n)`, as
PEFT keeps them out of the checkpoint). The delta weight is `scaling * IDWT(S)`: the sparse
matrix `S` zero-padded by the family's reduction (and to even sizes), its four quadrants
inverted as one level of a 2-D wavelet transform, centre-cropped back to `(out, in)`; with
`use_idwt=false` it is `scaling * S` itself.

Forward: `prev + x dW^T`, with `dW` built on every call, as PEFT does. The inverse transform
spreads every coefficient over a filter-sized patch, so `dW` is dense; building it costs one
small transposed convolution per call, independent of the batch, while any factored form
(four separable synthesis products per sub-band) costs more per token than the one matmul.
With `use_idwt=false`, `dW` is the sparse coefficients themselves: the product gathers the
`n` input columns and scatter-adds into the output rows (`n` multiply-adds per token instead
of `in * out`), whenever the call has fewer than `in * out / n` tokens (else the dense matmul).
With several adapters active the first adapter's branch sums their dense `dW` and runs one
matmul (PEFT: one per adapter, the same sum). Merging adds `dW` (transposed for Conv1D).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.methods.waveft.wavelets import waverec2d
from surgeon.runtime.base_kinds import in_out_features, main_weight
from surgeon.runtime.buffers import BufferDict
from surgeon.runtime.method import AdditiveMerge, base_parameter, remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

KINDS = ("Linear", "Conv1D")


class WaveftError(UserError, ValueError):
    """What PEFT's WaveFT refuses too: n_frequency out of range, mixed-adapter batches."""


class Indices(BufferDict):
    """One non-persistent index buffer per adapter (PEFT keeps them in a plain dict)."""


def reduction(family: str) -> int:
    """PEFT's WAVELET_REDUCTIONS[family] (rows = cols): 2 (i - 1) for db_i / sym_i, 6 i - 2 for
    coif_i; the filter length - 2, except coif5 whose table in PEFT has 48 taps, not 30."""
    order = int(family.lstrip("dbsymcoif"))
    return 6 * order - 2 if family.startswith("coif") else 2 * (order - 1)


def delta_matrix(spectrum: torch.Tensor, indices: torch.Tensor, static: tuple) -> torch.Tensor:
    """PEFT's `get_delta_weight`: the `(out, in)` delta of one adapter, in the spectrum's dtype."""
    n_out, n_in, family, use_idwt, scaling = static
    if not use_idwt:
        dense = spectrum.new_zeros(n_out, n_in)
        dense[indices[0], indices[1]] = spectrum
        return dense * scaling
    extra = reduction(family)
    rows, cols = n_out + extra, n_in + extra
    rows, cols = rows + rows % 2, cols + cols % 2
    dense = spectrum.new_zeros(rows, cols)
    dense[indices[0] + (rows - n_out) // 2, indices[1] + (cols - n_in) // 2] = spectrum
    delta = waverec2d(dense, family) * scaling
    if delta.shape != (n_out, n_in):
        top, left = (delta.shape[0] - n_out) // 2, (delta.shape[1] - n_in) // 2
        delta = delta[top:top + n_out, left:left + n_in]
    return delta


def sparse_product(x: torch.Tensor, spectrum: torch.Tensor, indices: torch.Tensor,
                   static: tuple) -> torch.Tensor:
    """`x dW^T` for `use_idwt=false`, where `dW` has only the `n` trained entries: one gather
    of the input columns and one scatter-add into the output rows, `n` products per token."""
    n_out, scaling = static[0], static[4]
    products = x[..., indices[1]] * (spectrum * scaling)
    return x.new_zeros(*x.shape[:-1], n_out).index_add(-1, indices[0], products)


def waveft_delta(x: torch.Tensor, params: tuple, statics: tuple) -> torch.Tensor:
    """The graph function: `x (sum_a dW_a)^T` for the active adapters' `(spectrum, indices)`;
    a `use_idwt=false` adapter skips its dense `dW` when gathering costs less than the matmul."""
    x = x if x.dtype == params[0][0].dtype else x.to(params[0][0].dtype)
    tokens = x.numel() // max(x.shape[-1], 1)
    weight, out = None, None
    for (spectrum, indices), static in zip(params, statics):
        if not static[3] and tokens * spectrum.numel() < static[0] * static[1]:
            y = sparse_product(x, spectrum, indices, static)
            out = y if out is None else out + y
            continue
        delta = delta_matrix(spectrum, indices, static)
        weight = delta if weight is None else weight + delta
    if weight is not None:
        y = F.linear(x, weight)
        out = y if out is None else out + y
    return out


def n_frequency_of(site: Site) -> int:
    """PEFT's per-layer count: `get_pattern_key` over `n_frequency_pattern`, else n_frequency."""
    for key, value in site.option("n_frequency_pattern", ()) or ():
        if re.match(rf"(.*\.)?({key})$", site.path):
            return int(value)
    return int(site.option("n_frequency", 2592))


def _checked(site: Site, n_in: int, n_out: int) -> int:
    n = n_frequency_of(site)
    if n > n_in * n_out:
        raise WaveftError(f"`{site.path}`: `n_frequency` should be less than or equal to the product "
                          f"of the input and output dimensions but the value passed is {n} and the "
                          f"product is {n_in * n_out}")
    return n


def _static(layer: LayerView, adapter: str) -> tuple:
    site = layer.sites[adapter]
    n_in, n_out = in_out_features(layer.base_layer, layer.kind)
    return (n_out, n_in, str(site.option("wavelet_family", "db1")),
            bool(site.option("use_idwt", True)), float(site.option("scaling", 25.0)))


class Waveft(AdditiveMerge):
    """The `waveft` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "waveft"
    containers = (("waveft_spectrum", nn.ParameterDict), ("waveft_indices", Indices))

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind not in KINDS:
            raise TypeError(f"Target module {layer.base_layer} is not supported. Currently, only "
                            "the following modules are supported: `torch.nn.Linear`.")
        n_in, n_out = in_out_features(layer.base_layer, site.kind)
        n = _checked(site, n_in, n_out)
        generator = torch.Generator().manual_seed(int(site.option("random_loc_seed", 777)))
        flat = torch.randperm(n_out * n_in, generator=generator)[:n]
        weight = main_weight(layer.base_layer, site.kind)
        layer.waveft_indices[site.adapter] = torch.stack([flat // n_in, flat % n_in]).to(weight.device)
        spectrum = torch.zeros(n) if site.option("init_weights", True) else torch.randn(n) * 0.01
        layer.waveft_spectrum[site.adapter] = base_parameter(spectrum, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        n_in, n_out = in_out_features(base, site.kind)
        return _checked(site, n_in, n_out)

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise WaveftError(f"`adapter_names` (one adapter per batch row) is not supported by WaveFT "
                          f"adapters (`{layer.path}`), as in PEFT; use `set_adapter` per batch.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        lowered = [a for a in b.layer.lowered_adapters() if a in b.layer.waveft_spectrum]
        if lowered and lowered[0] != adapter:
            return prev  # the first adapter's branch sums every active delta (module docstring)
        chain = lowered or [adapter]
        params = tuple((b.attr(f"waveft_spectrum.{a}"), b.attr(f"waveft_indices.{a}")) for a in chain)
        statics = tuple(_static(b.layer, a) for a in chain)
        return b.result(prev, b.call(waveft_delta, b.x, params, statics))

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        spectrum = layer.waveft_spectrum[adapter].detach()
        spectrum = spectrum.to(torch.promote_types(spectrum.dtype, torch.float32))
        return delta_matrix(spectrum, layer.waveft_indices[adapter], _static(layer, adapter))

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        spectrum = layer.waveft_spectrum[adapter].detach()
        delta = delta_matrix(spectrum, layer.waveft_indices[adapter], _static(layer, adapter))
        return delta.T if layer.kind == "Conv1D" else delta


METHOD = Waveft()
