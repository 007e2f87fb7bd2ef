"""SHiRA on Linear: PEFT 0.21's `peft.tuners.shira` entries, indices, init, forward and merge.

Each adapter trains `shira_weight[adapter]`, a vector of `K = r (in + out)` values at fixed
positions of the `(out, in)` weight, `shira_indices[adapter]` `(2, K)` int32 (rows, columns),
from PEFT's `random_mask`: a `torch.Generator()` seeded with `random_seed` (unseeded: torch's
fixed default seed, so equal shapes get equal masks) draws `randperm(out * in)[:K]`; the indices
are its positions in row-major order (PEFT's `torch.where(mask == 1)`). PEFT keeps the indices in
a plain dict, out of `state_dict()`, but writes them to the checkpoint as
`<layer>.shira_indices`: here they are non-persistent buffers that the runtime's
`checkpoint_buffers` hook adds to what is saved and loaded.

Forward: PEFT scatters the values into a copy of the weight on every call, `linear(x, W + D)`:
an `out x in` clone and scatter per call. Here `prev + D x`, with `D` a CSR matrix over the
existing values and indices (nothing weight-sized is built; the row pointers, `out + 1`
integers, come from the sorted rows each call). A CSR product costs `K` multiply-adds per token;
the alternatives measured on CPU (1024 x 1024, r=32) were slower: a gather + `index_add`
(`T K` element copies: 15-60x slower than CSR for T >= 16 tokens) and a dense `D` built from
`index_put` then `linear` (an `out x in` tensor and matmul per call). CPU sparse kernels take no
half precision, so half inputs multiply in fp32 and the delta is cast back. Merging adds the
dense `D` (PEFT's `get_delta_weight`, densified); unmerging subtracts it.

Cost against PEFT (bench/methods.py smoke, tiny Llama, CPU): forward equal, a training step
~1.8x: the values' gradient is a sampled product (`(g^T x)` at the K positions), slow on CPU,
and the base call cannot read `W + D` itself (a branch adds to the base output), so PEFT's
one-matmul training step is out of reach without a branch kind that replaces the base weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime import quantized
from surgeon.runtime.base_kinds import in_out_features
from surgeon.runtime.buffers import BufferDict
from surgeon.runtime.method import AdditiveMerge, base_parameter, remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView


class ShiraError(UserError, ValueError):
    """A SHiRA adapter PEFT cannot build (too many entries), or mixed-adapter batches."""


class Indices(BufferDict):
    """One non-persistent buffer per adapter (PEFT's plain `shira_indices` dict): out of
    `state_dict()` as in PEFT, moved with the layer, saved through `checkpoint_buffers`."""


def random_indices(n_out: int, n_in: int, r: int, seed: int | None) -> torch.Tensor:
    """PEFT's `random_mask` then `torch.where(mask == 1)`: `(2, K)` int32, row-major order."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    chosen = torch.randperm(n_out * n_in, generator=generator)[:r * (n_in + n_out)].sort().values
    return torch.stack((chosen // n_in, chosen % n_in)).to(torch.int32)


def sparse_delta(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n_out: int) -> torch.Tensor:
    """The graph function: `x D^T` for the `(out, in)` CSR matrix `D` of `values` at `indices`
    (sorted by row, as PEFT's `torch.where` leaves them), in `x`'s dtype."""
    n_in = x.shape[-1]
    compute = values.dtype
    if values.device.type == "cpu" and compute in (torch.float16, torch.bfloat16):
        compute = torch.float32  # CPU sparse kernels have no half precision
    rows = indices[0]
    bounds = torch.arange(n_out + 1, device=rows.device, dtype=rows.dtype)
    crow = torch.searchsorted(rows, bounds, out_int32=rows.dtype == torch.int32)
    matrix = torch.sparse_csr_tensor(crow, indices[1], values.to(compute), (n_out, n_in),
                                     check_invariants=False)  # sorted: from `torch.where`
    flat = x.reshape(-1, n_in).to(compute)
    out = (matrix @ flat.t()).t()
    return out.reshape(*x.shape[:-1], n_out).to(x.dtype)


class Shira(AdditiveMerge):
    """The `shira` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "shira"
    containers = (("shira_weight", nn.ParameterDict), ("shira_indices", Indices))
    checkpoint_buffers = ("shira_indices",)

    def module_problem(self, base: nn.Module, site: Site) -> str | None:
        if quantized.quant_of(base) is not None:
            return ("is a bitsandbytes-quantised layer: surgeon's SHiRA adapts float Linear layers "
                    "only (PEFT's also quantised ones; not implemented here)")
        n_in, n_out = in_out_features(base, site.kind)
        if site.r * (n_in + n_out) > n_in * n_out:
            return (f"is {n_out}x{n_in}: r={site.r} gives more SHiRA entries ({site.r * (n_in + n_out)}) "
                    f"than the layer has weights ({n_in * n_out}), which PEFT does not allow")
        return None

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind != "Linear":
            raise TypeError(f"Target module {layer.base_layer} is not supported. Currently, only the "
                            "following modules are supported: `torch.nn.Linear`.")
        if problem := self.module_problem(layer.base_layer, site):
            raise ShiraError(f"`{site.path}` {problem}.")
        n_in, n_out = in_out_features(layer.base_layer, site.kind)
        weight = layer.base_layer.weight
        indices = random_indices(n_out, n_in, site.r, site.option("random_seed"))
        count = site.r * (n_in + n_out)
        values = torch.zeros(count) if site.option("init_weights", True) else torch.randn(count)
        layer.shira_weight[site.adapter] = base_parameter(values, weight)
        layer.shira_indices[site.adapter] = indices.to(weight.device)

    def remove(self, layer: LayerView, adapter: str) -> None:
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        return site.r * sum(in_out_features(base, site.kind))

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise ShiraError(
            f"`adapter_names` (one adapter per batch row) is not supported by SHiRA adapters "
            f"(`{layer.path}`): PEFT's SHiRA ignores it and runs the active adapters on every row; "
            "run one adapter per batch with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        n_out = in_out_features(b.layer.base_layer, b.layer.kind)[1]
        delta = b.call(sparse_delta, b.x, b.attr(f"shira_weight.{adapter}"),
                       b.attr(f"shira_indices.{adapter}"), n_out)
        return b.result(prev, delta)

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's `get_delta_weight` densified: `(out, in)`, in at least fp32."""
        values = layer.shira_weight[adapter].detach()
        values = values.to(torch.promote_types(values.dtype, torch.float32))
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        rows, cols = layer.shira_indices[adapter].to(values.device).long()
        return values.new_zeros(n_out, n_in).index_put((rows, cols), values, accumulate=True)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        return self._out_major(layer, adapter).to(layer.base_layer.weight.dtype)


METHOD = Shira()
