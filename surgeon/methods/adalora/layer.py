"""AdaLoRA on Linear, transformers Conv1D and Conv2d: PEFT 0.21's `peft.tuners.adalora.layer`.

The update is SVD-shaped, `B @ (A * E)` with `A` `(r, in)` (right singular vectors), `E`
`(r, 1)` (singular values) and `B` `(out, r)` (left singular vectors), scaled by
`scaling / (ranknum + 1e-5)` where `scaling` is `lora_alpha` and `ranknum` the rank the module
started with (`init_r`). The rank allocator (`surgeon.methods.adalora.allocator`) prunes by
zeroing entries of `E`; a checkpoint saved after pruning holds only the kept triplets, and its
`rank_pattern` (`{"<path>.lora_E": [kept, ...]}`) sizes the modules when it is loaded, while
`ranknum` keeps the initial rank (PEFT's `resize_modules_by_rank_pattern`).

`ranknum` is a non-persistent buffer in a `RankNum` module, not an adapter parameter: PEFT never
trains or saves it, so it is outside the method's containers (which the model-level code
freezes, unfreezes and saves).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.lang.values import Table
from surgeon.runtime.base_kinds import in_out_features
from surgeon.runtime.method import AdditiveMerge, remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

EPS = 1e-5  # PEFT adds it to ranknum before dividing


class RankNum(nn.Module):
    """`ranknum[adapter]`: each adapter's initial rank as a 1-element buffer (PEFT's float
    dtype follows the base layer), never saved."""

    def __getitem__(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]

    def __contains__(self, adapter: str) -> bool:
        return adapter in self._buffers

    def set(self, adapter: str, value: torch.Tensor) -> None:
        self.register_buffer(adapter, value, persistent=False)

    def pop(self, adapter: str) -> None:
        self._buffers.pop(adapter, None)


def kept_rank(site: Site) -> int:
    """The module's rank: `init_r`, or the triplets kept by a saved `rank_pattern`."""
    pattern = site.option("rank_pattern")  # `((key, (kept, ...)), ...)` (a Table's items)
    if pattern:
        masks = dict(pattern.items if isinstance(pattern, Table) else pattern)
        for key in (f"{site.path}.lora_E", f"{site.path}.lora_E.{site.adapter}"):
            if key in masks:
                return sum(bool(k) for k in masks[key])
    return site.r


class AdaLora(AdditiveMerge):
    """The `adalora` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "adalora"
    containers = (("lora_dropout", nn.ModuleDict), ("lora_A", nn.ParameterDict),
                  ("lora_B", nn.ParameterDict), ("lora_E", nn.ParameterDict))

    def _sizes(self, base: nn.Module, site: Site) -> tuple[int, int]:
        """`(in, out)` of the factors: a convolution's `in` counts its kernel (PEFT's SVDConv2d)."""
        n_in, n_out = in_out_features(base, site.kind)
        if site.kind == "Conv2d":
            if base.groups != 1:
                raise UserError(f"`{site.path}`: AdaLoRA cannot adapt a grouped Conv2d "
                                f"(groups={base.groups}); PEFT's SVDConv2d assumes groups=1.")
            n_in *= math.prod(base.kernel_size)
        return n_in, n_out

    def add(self, layer: LayerView, site: Site) -> None:
        trained = [s.adapter for s in layer.sites.values()
                   if s.adapter != site.adapter and not s.option("inference_mode", False)]
        if trained and not site.option("inference_mode", False):
            raise UserError(
                f"AdaLoRA trains one adapter at a time (as PEFT): `{site.path}` already has the "
                f"trainable adapter `{trained[0]}`; add `{site.adapter}` with inference_mode=true.")
        a, rank = site.adapter, kept_rank(site)
        n_in, n_out = self._sizes(layer.base_layer, site)
        p = float(site.option("lora_dropout", 0.0) or 0.0)
        layer.lora_dropout[a] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        # PEFT's draws, in its order: A, E, B, then ranknum's (discarded) randn(1)
        layer.lora_A[a] = nn.Parameter(torch.randn(rank, n_in))
        layer.lora_E[a] = nn.Parameter(torch.randn(rank, 1))
        layer.lora_B[a] = nn.Parameter(torch.randn(n_out, rank))
        torch.randn(1)
        if "ranknum" not in layer._modules:
            layer.add_module("ranknum", RankNum())
        # after a resize PEFT copies the initial rank back, unless nothing was kept
        layer.ranknum.set(a, torch.tensor([float(site.r if rank > 0 else 0)]))
        if site.option("init_lora_weights", True):
            nn.init.zeros_(layer.lora_E[a])
            nn.init.normal_(layer.lora_A[a], mean=0.0, std=0.02)
            nn.init.normal_(layer.lora_B[a], mean=0.0, std=0.02)
        weight = layer.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for name in ("lora_A", "lora_E", "lora_B"):
            table = layer._modules[name]
            table[a] = nn.Parameter(table[a].detach().to(weight.device, dtype))
        layer.ranknum.set(a, layer.ranknum[a].to(weight.device, dtype))

    def remove(self, layer: LayerView, adapter: str) -> None:
        remove_entries(layer, self.containers, adapter)
        if "ranknum" in layer._modules:
            layer.ranknum.pop(adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        n_in, n_out = self._sizes(base, site)
        return kept_rank(site) * (n_in + n_out + 1)

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise UserError(f"`adapter_names` (one adapter per batch row) is not supported by adalora "
                        f"adapters (`{layer.path}`), as in PEFT; use `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        a, e, bb = (b.attr(f"{n}.{adapter}") for n in ("lora_A", "lora_E", "lora_B"))
        x = b.x
        if b.layer.lora_A[adapter].dtype != b.layer.base_layer.weight.dtype:
            x = b.method("to", x, b.layer.lora_A[adapter].dtype)
        if b.layer.training and type(b.layer.lora_dropout[adapter]) is not nn.Identity:
            x = b.module(f"lora_dropout.{adapter}", x)
        ranknum = b.call(torch.add, b.attr(f"ranknum.{adapter}"), EPS)
        ae = b.call(torch.mul, a, e)
        if b.layer.kind == "Conv2d":
            base = b.layer.base_layer
            kernel = b.call(torch.mul, b.call(torch.matmul, bb, ae), b.layer.sites[adapter].scaling)
            kernel = b.method("reshape", b.call(torch.div, kernel, ranknum), tuple(base.weight.shape))
            delta = b.call(torch.conv2d, x, kernel, None, base.stride, base.padding, base.dilation,
                           base.groups)
            return b.result(prev, delta)
        h = b.call(torch._C._nn.linear, b.call(torch._C._nn.linear, x, ae), bb)
        h = b.call(torch.mul, h, b.layer.sites[adapter].scaling)
        return b.result(prev, b.call(torch.div, h, ranknum))

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """`B @ (A * E) * scaling / (ranknum + 1e-5)` as an `(out, in*k)` matrix."""
        a, e, b = (layer._modules[n][adapter].detach() for n in ("lora_A", "lora_E", "lora_B"))
        return b @ (a * e) * layer.sites[adapter].scaling / (layer.ranknum[adapter] + EPS)

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        delta = self._out_major(layer, adapter)
        if layer.kind == "Conv1D":
            return delta.t()
        return delta.reshape(layer.base_layer.weight.shape)


class PrunedTriplets:
    """AdaLoRA's checkpoint (`MethodConfig.checkpoint_codec`): PEFT's
    `resize_state_dict_by_rank_pattern`. With a `rank_pattern` set during training (the layers
    still full-size, pruned triplets zeroed), the checkpoint keeps only each module's kept rows
    of `lora_A`/`lora_E` and columns of `lora_B`; loading needs nothing (`rank_pattern` sizes
    the modules)."""

    def encode(self, tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for key, kept in (config.get("rank_pattern") or {}).items():
            prefix = "base_model.model." + key.rsplit(".", 1)[0]
            for name, axis in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                tensor = out.get(f"{prefix}.{name}")
                if tensor is not None and tensor.shape[axis] != sum(kept):
                    mask = torch.tensor(kept, dtype=torch.bool, device=tensor.device)
                    out[f"{prefix}.{name}"] = tensor[mask] if axis == 0 else tensor[:, mask]
        return out

    def decode(self, tensors: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
               adapter: str) -> dict[str, torch.Tensor]:
        return tensors


CODEC = PrunedTriplets()
METHOD = AdaLora()
