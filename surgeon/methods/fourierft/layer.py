"""FourierFT on Linear and Conv1D: PEFT 0.21's `peft.tuners.fourierft`, names, init and merge.

Each adapter trains `fourierft_spectrum[adapter]`, `(n,)`: coefficients of a sparse `(out, in)`
spectrum at `n` locations drawn once from `random_loc_seed` (PEFT's `indices`: a randperm of
`out * in` cells by a generator seeded with it). The weight delta is
`scaling * Re(ifft2(S))`, out-major for both kinds (PEFT's `get_delta_weight`, which its
forward applies as `linear(x, delta)` even on a Conv1D).

Forward: `prev + linear(x, delta)` with the delta built from the spectrum inside the graph, as
PEFT does. It is materialised per call on purpose: the factored form (`x E_in`, scale, `E_out`)
needs two dense complex bases of `(in + out) x n`, more memory than the delta for the sizes
FourierFT is used at and not bit-compatible with PEFT's FFT. Nothing derived from the spectrum
is cached, so training never reads a stale delta; only the locations (fixed by the seed, never
trained) are kept, as non-persistent buffers in `fourierft_indices` (PEFT does not save them
either). Several active adapters each add their branch; mixed-adapter batches are refused (PEFT's
FourierFT layer has no `adapter_names` forward). Merging adds the delta to the out-major weight
(`AdditiveMerge`), unmerging subtracts it, as PEFT does.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.base_kinds import in_out_features, main_weight
from surgeon.runtime.method import AdditiveMerge, base_parameter

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

KINDS = ("Linear", "Conv1D")  # what PEFT's FourierFTModel._create_new_module takes
INDICES = "fourierft_indices"


class FourierFtError(UserError, ValueError):
    """What PEFT's FourierFT layers refuse (sizes, kinds, mixed batches)."""


class Locations(nn.Module):
    """Each adapter's frequency locations `(2, n)` as a non-persistent buffer: moved with the
    layer, never saved (PEFT recomputes them from `random_loc_seed`), never trained."""

    def put(self, adapter: str, indices: torch.Tensor) -> None:
        self.register_buffer(adapter, indices, persistent=False)

    def __getitem__(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]

    def drop(self, adapter: str) -> None:
        self._buffers.pop(adapter, None)


def n_frequency(site: Site) -> int:
    """PEFT's per-layer size: the first `n_frequency_pattern` key `k` with `.*\\.k$` matching
    the path, else the path itself, else `n_frequency` (`FourierFTModel._create_and_replace`)."""
    pattern = dict(site.option("n_frequency_pattern", ()) or ())
    key = next((k for k in pattern if re.match(rf".*\.{k}$", site.path)), site.path)
    return int(pattern.get(key, site.option("n_frequency", 1000)))


def locations(n_out: int, n_in: int, n: int, seed: int) -> torch.Tensor:
    """PEFT's `indices`: `n` cells of the `(out, in)` spectrum as (rows, columns)."""
    flat = torch.randperm(n_out * n_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // n_in, flat % n_in], dim=0)


def spectrum_delta(spectrum: torch.Tensor, indices: torch.Tensor, n_out: int, n_in: int,
                   scaling: float) -> torch.Tensor:
    """The graph function and merge delta: PEFT's `get_delta_weight`, `(out, in)` in the
    spectrum's dtype (the FFT in fp32: it does not take half precision)."""
    dense = torch.zeros(n_out, n_in, device=spectrum.device)
    dense = dense.index_put((indices[0], indices[1]), spectrum.float())
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


class FourierFt(AdditiveMerge):
    """The `fourierft` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "fourierft"
    containers = (("fourierft_spectrum", nn.ParameterDict),)

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind not in KINDS:
            raise FourierFtError(f"Unsupported layer type {site.kind} for FourierFT")
        n_in, n_out = in_out_features(layer.base_layer, site.kind)
        n = n_frequency(site)
        if n > n_in * n_out:
            raise FourierFtError(
                f"`n_frequency` should be less than or equal to the product of the input and output "
                f"dimensions but the value passed is {n} and the product is {n_in * n_out} (`{site.path}`)")
        if INDICES not in layer._modules:
            layer.add_module(INDICES, Locations())
        weight = main_weight(layer.base_layer, site.kind)
        indices = locations(n_out, n_in, n, int(site.option("random_loc_seed", 777)))
        layer.fourierft_indices.put(site.adapter, indices.to(weight.device))
        spectrum = torch.randn(n)  # drawn even when zeroed next, as PEFT (the global RNG moves)
        if site.option("init_weights", False):
            spectrum.zero_()
        layer.fourierft_spectrum[site.adapter] = base_parameter(spectrum, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        if adapter in layer.fourierft_spectrum:
            del layer.fourierft_spectrum[adapter]
        if INDICES in layer._modules:
            layer.fourierft_indices.drop(adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        return n_frequency(site)

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise FourierFtError(
            f"`adapter_names` (one adapter per batch row) is not supported by FourierFT adapters "
            f"(`{layer.path}`), as in PEFT; run one adapter per batch with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        layer = b.layer
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        scaling = float(layer.sites[adapter].option("scaling", 150.0))
        delta = b.call(spectrum_delta, b.attr(f"fourierft_spectrum.{adapter}"),
                       b.attr(f"{INDICES}.{adapter}"), n_out, n_in, scaling)
        x = b.x
        if layer.fourierft_spectrum[adapter].dtype != main_weight(layer.base_layer, layer.kind).dtype:
            x = b.method("to", x, layer.fourierft_spectrum[adapter].dtype)  # PEFT: x.to(delta dtype)
        return b.result(prev, b.call(F.linear, x, delta))

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's delta, `(out, in)`, in at least fp32 (the out-major view of both kinds)."""
        spectrum = layer.fourierft_spectrum[adapter].detach()
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        scaling = float(layer.sites[adapter].option("scaling", 150.0))
        delta = spectrum_delta(spectrum, layer.fourierft_indices[adapter], n_out, n_in, scaling)
        return delta.to(torch.promote_types(delta.dtype, torch.float32))

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """The delta in the base weight's layout (`(in, out)` on a Conv1D) and the spectrum's dtype."""
        delta = self._out_major(layer, adapter)
        delta = delta.T if layer.kind == "Conv1D" else delta
        return delta.to(layer.fourierft_spectrum[adapter].dtype)


METHOD = FourierFt()
