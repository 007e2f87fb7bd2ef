"""VeRA on Linear and transformers Conv1D: PEFT 0.21's `peft.tuners.vera` math, names and init.

Each layer trains two vectors, `vera_lambda_d[adapter]` (r) and `vera_lambda_b[adapter]` (out),
around random projections that are ONE pair of tensors for the whole model: `vera_A[adapter]`
`(r, max in)` and `vera_B[adapter]` `(max out, r)`, Kaiming-uniform from a CPU generator seeded
with `projection_prng_key`, sized for the largest targeted layer; each layer slices what it
needs. The pair lives in `Projections` containers that every VeRA layer of the model holds as the
same instance (the runtime's shared containers: `surgeon.runtime.method`), so state_dict lists
it under every layer, as PEFT's does, and the checkpoint stores it once as `base_model.vera_A`
/ `base_model.vera_B` (`MethodConfig.shared_keys`), or not at all with `save_projection=false`
(non-persistent buffers, as PEFT's BufferDict).

Forward: `prev + lambda_b * linear(lambda_d * linear(dropout(x), A[:, :in]), B[:out])`, two thin
matmuls; merging adds `(lambda_b B) @ (lambda_d A)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.base_kinds import in_out_features, main_weight
from surgeon.runtime.buffers import BufferDict
from surgeon.runtime.method import AdditiveMerge, base_parameter, remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

KINDS = ("Linear", "Conv1D")


class VeraError(UserError, ValueError):
    """What PEFT's VeRA refuses too: an adapter whose projections cannot join the model's
    existing ones, or mixed-adapter batches."""


class Projections(BufferDict):
    """One buffer per adapter (PEFT's BufferDict): persistent only when the projections are
    saved, so `state_dict()` holds them exactly when PEFT's does."""

    persistent = True

    def copy(self, persistent: bool) -> Projections:
        """A new container holding the same tensors (not copies)."""
        new = Projections(persistent)
        for adapter, tensor in self._buffers.items():
            new[adapter] = tensor
        return new


def kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: uniform in +-sqrt(3) * sqrt(2 / fan_in), from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _largest(sites: Sequence[Site], bases: Sequence[nn.Module]) -> tuple[int, int]:
    """PEFT's `_find_dim`: the largest (out, in) over the adapted layers."""
    dims = [in_out_features(base, site.kind) for site, base in zip(sites, bases)]
    return max(d[1] for d in dims), max(d[0] for d in dims)


def _check_fits(vera_a: torch.Tensor, vera_b: torch.Tensor, n_in: int, n_out: int, r: int) -> None:
    """PEFT's checks when a later adapter reuses the first one's projections."""
    for name, have, need in (("vera_A", vera_a.shape[1], n_in), ("vera_B", vera_b.shape[0], n_out),
                             ("vera_A", vera_a.shape[0], r), ("vera_B", vera_b.shape[1], r)):
        if have < need:
            raise VeraError(f"{name} has a size of {have} but {need} or greater is required; this "
                            "probably happened because an additional VeRA adapter was added after "
                            "the first one with incompatible shapes.")


class Vera(AdditiveMerge):
    """The `vera` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "vera"
    containers = (("vera_dropout", nn.ModuleDict), ("vera_lambda_b", nn.ParameterDict),
                  ("vera_lambda_d", nn.ParameterDict), ("vera_A", Projections),
                  ("vera_B", Projections))
    shared_containers = ("vera_A", "vera_B")

    def init_shared(self, old: Mapping[str, nn.Module], adapter: str, sites: Sequence[Site],
                    bases: Sequence[nn.Module]) -> dict[str, nn.Module]:
        """New shared containers with `adapter`'s projections added (see the module docstring)."""
        site = sites[0]
        persistent = bool(site.option("save_projection", True))
        if old and old["vera_A"].persistent != persistent:
            raise VeraError("VeRA projection weights must be saved for all adapters or none "
                            "(`save_projection` differs from the model's existing VeRA adapters).")
        shared = {n: old[n].copy(persistent) if n in old else Projections(persistent)
                  for n in self.shared_containers}
        if len(shared["vera_A"]):
            # PEFT draws the pair once per model; later adapters reuse the first one's tensors
            first = next(iter(shared["vera_A"]))
            vera_a, vera_b = shared["vera_A"][first], shared["vera_B"][first]
            if vera_a.shape[0] != site.r:  # PEFT accepts a smaller r, then fails in forward
                raise VeraError(f"VeRA adapter `{adapter}` has r={site.r} but the model's shared "
                                f"projections have r={vera_a.shape[0]}: every VeRA adapter of a "
                                "model uses the first one's projections, so r must be equal.")
        else:
            n_out, n_in = _largest(sites, bases)
            seed = int(site.option("projection_prng_key", 0))
            generator = torch.Generator(device="cpu").manual_seed(seed)
            device = main_weight(bases[0], site.kind).device
            vera_a = kaiming((site.r, n_in), generator).to(device)
            vera_b = kaiming((n_out, site.r), generator).to(device)
        shared["vera_A"][adapter] = vera_a
        shared["vera_B"][adapter] = vera_b
        return shared

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind not in KINDS:
            raise TypeError(f"Target module {layer.base_layer} is not supported. Currently, only "
                            "`torch.nn.Linear` and `transformers.pytorch_utils.Conv1D` are supported.")
        if site.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {site.r}")
        n_in, n_out = in_out_features(layer.base_layer, site.kind)
        _check_fits(layer.vera_A[site.adapter], layer.vera_B[site.adapter], n_in, n_out, site.r)
        p = float(site.option("vera_dropout", 0.0) or 0.0)
        layer.vera_dropout[site.adapter] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        lambda_b = torch.ones(n_out)
        lambda_d = torch.randn(site.r)  # drawn even when reset, as PEFT (same RNG stream)
        if site.option("init_weights", True):
            lambda_d.fill_(float(site.option("d_initial", 0.1)))
            lambda_b.zero_()
        weight = main_weight(layer.base_layer, site.kind)
        layer.vera_lambda_b[site.adapter] = base_parameter(lambda_b, weight)
        layer.vera_lambda_d[site.adapter] = base_parameter(lambda_d, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        # the shared entries go too, as PEFT's delete_adapter (other_param_names)
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        return in_out_features(base, site.kind)[1] + site.r

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise VeraError(f"`adapter_names` (one adapter per batch row) is not supported by VeRA "
                         f"adapters (`{layer.path}`), as in PEFT; use `set_adapter` per batch.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        layer = b.layer
        x = b.x
        dtype = layer.vera_lambda_d[adapter].dtype
        if dtype != main_weight(layer.base_layer, layer.kind).dtype:
            x = b.method("to", x, dtype)
        if type(layer.vera_dropout[adapter]) is not nn.Identity and layer.training:
            x = b.module(f"vera_dropout.{adapter}", x)
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        delta = b.call(vera_delta, x, b.attr(f"vera_A.{adapter}"), b.attr(f"vera_B.{adapter}"),
                       b.attr(f"vera_lambda_d.{adapter}"), b.attr(f"vera_lambda_b.{adapter}"),
                       n_in, n_out)
        return b.result(prev, delta)

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's get_delta_weight before its transpose: `(out, in)`, in at least fp32."""
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        lambda_d, lambda_b = layer.vera_lambda_d[adapter].detach(), layer.vera_lambda_b[adapter].detach()
        dtype = torch.promote_types(lambda_d.dtype, torch.float32)
        vera_a = layer.vera_A[adapter][:, :n_in].to(lambda_d.device, dtype)
        vera_b = layer.vera_B[adapter][:n_out, :].to(lambda_d.device, dtype)
        return (lambda_b.to(dtype)[:, None] * vera_b) @ (lambda_d.to(dtype)[:, None] * vera_a)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        delta = self._out_major(layer, adapter)
        delta = delta.T if layer.kind == "Conv1D" else delta
        return delta.to(layer.vera_B[adapter].dtype)



def vera_delta(x: torch.Tensor, vera_a: torch.Tensor, vera_b: torch.Tensor, lambda_d: torch.Tensor,
               lambda_b: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """The graph function: PEFT's `lambda_b * linear(lambda_d * linear(x, A), B)`, sliced."""
    return lambda_b * F.linear(lambda_d * F.linear(x, vera_a[:, :n_in]), vera_b[:n_out, :])


METHOD = Vera()
