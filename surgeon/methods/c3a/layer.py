"""C3A on Linear: PEFT 0.21's `peft.tuners.c3a` math, names, init and merge.

Each adapter trains `c3a_kernel[adapter]`, `(out/b, in/b, b)` in fp32: one length-b vector per
`b x b` block of a block-circulant `(out, in)` matrix `C`; the delta weight is `C / in`.

Forward: `prev + C x / in`, never building `C`. The input is cut into `in/b` blocks of `b`;
each output block is a sum of circular correlations of input blocks with kernel vectors,
`irfft(sum_n rfft(x_n) * conj(rfft(w_mn)))` (the same values as PEFT's `fft(ifft(x) fft(w))`,
with real FFTs: half the work). Per token that is `O(in log b + out/b * in/b * b)` instead of
`in * out`. The backward is autograd's through the FFTs: the true adjoint. PEFT's hand-written
`BlockCircularConvolution.backward` returns a wrong input gradient (it correlates where the
adjoint convolves), so trainable layers before a C3A layer train differently in PEFT; we chose
the math over bug-for-bug parity (outputs, checkpoints and the kernels' own gradients agree).

With several adapters active at once PEFT feeds each adapter the previous one's output
(`x = conv(x, w) / x.size(-1)` inside its loop), so only square layers run; the first active
adapter's branch applies that chain (the others add no nodes), and a non-square layer is
refused. Merging adds `C / in` to the weight (fp32 circulant, as PEFT's `get_circulant_fast`).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
from torch import fx, nn
from torch.fft import irfft, rfft

from surgeon.errors import UserError
from surgeon.runtime.base_kinds import in_out_features
from surgeon.runtime.method import AdditiveMerge

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView


class C3aError(UserError, ValueError):
    """What PEFT's C3A refuses too: block sizes that do not divide the layer, mixed batches,
    several active adapters on a non-square layer."""


def circulant_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x C^T` for the block-circulant `C` of kernel `w` (no `1/in`), by real FFTs.

    Autograd differentiates the FFTs, so the input gradient is the true adjoint `g C`. PEFT's
    hand-written `BlockCircularConvolution.backward` returns another input gradient (off by up to
    ~2.7 on a random kernel, checked in float64), so layers BEFORE a C3A layer train differently
    in PEFT; the C3A kernels' own gradients agree (tests/methods/test_c3a.py).
    """
    m, n, b = w.shape
    blocks = x.reshape(*x.shape[:-1], n, b)
    y = torch.einsum("...nf,mnf->...mf", rfft(blocks), rfft(w).conj())
    return irfft(y, n=b).reshape(*x.shape[:-1], m * b)


def c3a_delta(x: torch.Tensor, kernels: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The graph function: PEFT's loop over the active adapters' kernels (each reads the last
    one's output), summed, in `x`'s dtype."""
    h, total = x.float(), None
    for w in kernels:
        h = circulant_product(h, w.float()) / h.shape[-1]
        total = h if total is None else total + h
    return total.to(x.dtype)


def circulant(w: torch.Tensor) -> torch.Tensor:
    """The `(out, in)` block-circulant matrix of kernel `w` (PEFT's `get_circulant_fast`)."""
    n_in = w.shape[1] * w.shape[2]
    eye = torch.eye(n_in, dtype=w.dtype, device=w.device)
    return circulant_product(eye, w).T


def block_size_of(site: Site) -> int:
    """PEFT's per-layer block size: the first `block_size_pattern` key `k` with
    `re.match(rf".*\\.{k}$", path)`, else `block_size`."""
    for key, value in site.option("block_size_pattern", ()) or ():
        if re.match(rf".*\.{key}$", site.path):
            return int(value)
    return int(site.option("block_size", 256))


def _checked(site: Site, n_in: int, n_out: int) -> int:
    block = block_size_of(site)
    for name, size in (("input", n_in), ("output", n_out)):
        if size % block:
            raise C3aError(f"`{site.path}`: the block size should be a factor of the {name} size. "
                           f"However, the {name} size is {size} and the block size is {block}")
    return block


def _init(kernel: torch.Tensor, init, n_in: int, n_out: int) -> None:
    """PEFT's `reset_c3a_parameters` (zeros for `True`)."""
    if init is True:
        return
    if init == "gaussian":
        nn.init.normal_(kernel)
    elif init in ("xavier_uniform", False):
        a = math.sqrt(3.0) * math.sqrt(2.0 / float(n_in + n_out))
        nn.init.uniform_(kernel, -a, a)
    elif init == "kaiming_uniform":
        a = math.sqrt(1.0 / float(n_in))
        nn.init.uniform_(kernel, -a, a)
    else:
        raise C3aError(f"Unknown init_weights: {init}")


class C3a(AdditiveMerge):
    """The `c3a` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "c3a"
    containers = (("c3a_kernel", nn.ParameterDict),)

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind != "Linear":
            raise TypeError(f"Target module {layer.base_layer} is not supported. Currently, only "
                            "`torch.nn.Linear` is supported.")
        n_in, n_out = in_out_features(layer.base_layer, site.kind)
        block = _checked(site, n_in, n_out)
        weight = layer.base_layer.weight
        kernel = torch.zeros(n_out // block, n_in // block, block, device=weight.device)
        with torch.no_grad():
            _init(kernel, site.option("init_weights", "xavier_uniform"), n_in, n_out)
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        layer.c3a_kernel[site.adapter] = nn.Parameter(kernel.to(dtype=dtype))

    def remove(self, layer: LayerView, adapter: str) -> None:
        if adapter in layer.c3a_kernel:
            del layer.c3a_kernel[adapter]

    def num_params(self, base: nn.Module, site: Site) -> int:
        n_in, n_out = in_out_features(base, site.kind)
        return n_in * n_out // _checked(site, n_in, n_out)

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise C3aError(f"`adapter_names` (one adapter per batch row) is not supported by C3A "
                       f"adapters (`{layer.path}`), as in PEFT; use `set_adapter` per batch.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        lowered = [a for a in b.layer.lowered_adapters() if a in b.layer.c3a_kernel]
        if lowered and lowered[0] != adapter:
            return prev  # the first adapter's branch applies the whole chain (module docstring)
        chain = lowered or [adapter]
        n_in, n_out = in_out_features(b.layer.base_layer, b.layer.kind)
        if len(chain) > 1 and n_in != n_out:
            raise C3aError(f"C3A adapters {chain} active at once on `{b.layer.path}` ({n_in} -> "
                           f"{n_out}): PEFT feeds each the previous one's output, which only a "
                           "square layer allows; activate one adapter at a time")
        kernels = tuple(b.attr(f"c3a_kernel.{a}") for a in chain)
        return b.result(prev, b.call(c3a_delta, b.x, kernels))

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's get_delta_weight in fp32: `C / in`."""
        kernel = layer.c3a_kernel[adapter].detach().float()
        return circulant(kernel) / (kernel.shape[1] * kernel.shape[2])

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        weight = layer.base_layer.weight
        delta = circulant(layer.c3a_kernel[adapter].detach().float()).to(weight.dtype)
        return delta / weight.size(-1)


METHOD = C3a()
