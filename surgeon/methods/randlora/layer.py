"""RandLoRA on Linear and transformers Conv1D: PEFT 0.21's `peft.tuners.randlora` math, names and init.

Each layer trains `randlora_lambda[adapter]` `(r, n)` and `randlora_gamma[adapter]` `(n, min)`,
with `n = ceil(min / r)` bases and `min`/`max` the smaller/larger of the layer's in and out
features. The random bases are ONE pair of tensors for the whole model, `randlora_A[adapter]`
`(r, 1, min dim)` and `randlora_B[adapter]` `(max dim, n, r)` sized for the largest targeted
layer and sliced per layer; they live in `Projections` containers every RandLoRA layer holds as
the same instance (the runtime's shared containers, `surgeon.runtime.method`). They are drawn
from a CPU generator seeded with `projection_prng_key`: Kaiming-uniform in bfloat16 (PEFT's
`_kaiming_init` on a bf16-capable machine) divided by their std, or ternary with `sparse` /
`very_sparse`; then cast to the base dtype, as PEFT's first layer casts them.

Forward (PEFT's `get_scaled_bases` + two `F.linear`): the scaled basis
`S = (lambda[:, :, None] * A[:, :n, :min] * gamma[None]).flatten(0, 1)` `(r n, min)` and the
flattened `Bf = B[:max, :n].flatten(1)` `(max, n r)` are the two factors, so the update is
`scaling * linear(linear(x, S), Bf)` when in <= out, else `scaling * linear(linear(x, Bf.T), S.T)`.
PEFT's flattening orders the two inner dimensions differently (`k n + b` vs `b r + k`); it is
kept as is, so outputs and checkpoints are PEFT's. The `(out, in)` delta is never formed in the
forward; merging adds `scaling * second @ first`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.methods.vera.layer import Projections
from surgeon.runtime.base_kinds import in_out_features, main_weight
from surgeon.runtime.method import AdditiveMerge, base_parameter, remove_entries
from surgeon.runtime.quantized import QuantizedBaseError, quant_of

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

KINDS = ("Linear", "Conv1D")
SHARED = ("randlora_A", "randlora_B")
MODEL_LEVEL = tuple(f"base_model.{name}" for name in SHARED)  # PEFT's BaseTuner copies
HALF = (torch.float16, torch.bfloat16)


class RandLoraError(UserError, ValueError):
    """What PEFT's RandLoRA refuses too: adapters whose shared bases cannot be one pair."""


def num_bases(n_in: int, n_out: int, r: int) -> int:
    """PEFT's `num_bases`: enough rank-r bases for a full-rank update."""
    return math.ceil(min(n_in, n_out) / r)


def _kaiming_dtype() -> torch.dtype:
    """accelerate's `is_bf16_available()` as PEFT's `_kaiming_init` reads it (no TPU/XPU here)."""
    return torch.bfloat16 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else torch.float16


def dense_bases(r: int, lo: int, hi: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_init_randlora_A_randlora_B`: Kaiming-uniform bases, std-normalised."""
    def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=_kaiming_dtype())
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)

    with torch.no_grad():
        basis_a = kaiming((r, 1, lo))
        basis_b = torch.cat([kaiming((hi, 1, r)) for _ in range(num_bases(lo, lo, r))], dim=1)
        return basis_a / basis_a.std(), basis_b / basis_b.std()


def sparse_bases(r: int, lo: int, hi: int, generator: torch.Generator,
                 sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_init_randlora_A_randlora_B_sparse`: -1 / 0 / 1 with 1/(2 sparsity) each side."""
    basis_a = torch.rand((r, 1, lo), generator=generator)
    basis_b = torch.rand((hi, num_bases(lo, lo, r), r), generator=generator)
    out = []
    for uniform in (basis_a, basis_b):
        ternary = torch.zeros(uniform.shape)
        ternary[uniform < 1 / (2 * sparsity)] = -1
        ternary[uniform > 1 - 1 / (2 * sparsity)] = 1
        out.append(ternary)
    return out[0] / out[0].std(), out[1] / out[1].std()


def _largest(sites: Sequence[Site], bases: Sequence[nn.Module]) -> tuple[int, int]:
    """PEFT's `_find_dim`: the largest (out, in) over the adapted layers."""
    dims = [in_out_features(base, site.kind) for site, base in zip(sites, bases)]
    return max(d[1] for d in dims), max(d[0] for d in dims)


def draw_bases(site: Site, n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's shared pair, as PEFT's `_pre_injection_hook` draws it."""
    lo, hi = min(n_out, n_in), max(n_out, n_in)
    generator = torch.Generator(device="cpu").manual_seed(int(site.option("projection_prng_key", 0)))
    if site.option("very_sparse", False):
        return sparse_bases(site.r, lo, hi, generator, math.sqrt(lo))
    if site.option("sparse", False):
        return sparse_bases(site.r, lo, hi, generator, 3)
    return dense_bases(site.r, lo, hi, generator)


class Bases(Projections):
    """The shared bases of every adapter, and the seed they were drawn from (PEFT requires one
    `projection_prng_key` for all adapters)."""

    seed: int | None = None

    def copy(self, persistent: bool) -> Bases:
        new = Bases(persistent)
        new.seed = self.seed
        for adapter, tensor in self._buffers.items():
            new[adapter] = tensor
        return new


def _check_reuse(adapter: str, site: Site, shared: Bases) -> None:
    """PEFT's `_check_new_adapter_config`, and the rank its forward needs of reused bases."""
    seed = int(site.option("projection_prng_key", 0))
    if seed != shared.seed:
        raise RandLoraError("RandLora PRNG initialisation key must be the same for all adapters; "
                            f"`{adapter}` has projection_prng_key={seed} but the model's RandLoRA "
                            f"adapters have {shared.seed}.")
    basis_a = shared[next(iter(shared))]
    if basis_a.shape[0] != site.r:  # PEFT accepts a smaller r, then fails in forward
        raise RandLoraError(f"RandLoRA adapter `{adapter}` has r={site.r} but the model's shared bases "
                            f"have r={basis_a.shape[0]}: every RandLoRA adapter of a model uses the "
                            "first one's bases, so r must be equal.")


def _as_peft_keeps(basis: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The first layer casts the bases to its weight's dtype; on a half base PEFT's default
    `autocast_adapter_dtype` then upcasts them to fp32 (its BufferDicts too)."""
    dtype = weight.dtype if weight.dtype.is_floating_point else basis.dtype
    basis = basis.to(weight.device, dtype)
    return basis.float() if dtype in HALF else basis


def _check_fits(basis_a: torch.Tensor, basis_b: torch.Tensor, n_in: int, n_out: int) -> None:
    """PEFT's size checks when a later adapter reuses the first one's bases."""
    for name, have, need in (("randlora_B", basis_b.shape[0], max(n_in, n_out)),
                             ("randlora_A", basis_a.shape[-1], min(n_in, n_out))):
        if have < need:
            raise RandLoraError(f"{name} has a size of {have} but {need} or greater is required; this "
                                "probably happened because an additional RandLora adapter was added "
                                "after the first one with incompatible shapes.")


class RandLora(AdditiveMerge):
    """The `randlora` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "randlora"
    containers = (("randlora_dropout", nn.ModuleDict), ("randlora_lambda", nn.ParameterDict),
                  ("randlora_gamma", nn.ParameterDict), ("randlora_A", Bases),
                  ("randlora_B", Bases))
    shared_containers = SHARED

    def init_shared(self, old: Mapping[str, nn.Module], adapter: str, sites: Sequence[Site],
                    bases: Sequence[nn.Module]) -> dict[str, nn.Module]:
        """New shared containers with `adapter`'s bases added (see the module docstring)."""
        site = sites[0]
        persistent = bool(site.option("save_projection", True))
        if old and old["randlora_A"].persistent != persistent:
            raise RandLoraError("RandLora projection weights must be saved for all adapters or none "
                                "(`save_projection` differs from the model's existing RandLoRA adapters).")
        shared = {n: old[n].copy(persistent) if n in old else Bases(persistent) for n in SHARED}
        if len(shared["randlora_A"]):  # PEFT draws the pair once per model; later adapters reuse it
            first = next(iter(shared["randlora_A"]))
            basis_a, basis_b = shared["randlora_A"][first], shared["randlora_B"][first]
            _check_reuse(adapter, site, shared["randlora_A"])
        else:
            shared["randlora_A"].seed = int(site.option("projection_prng_key", 0))
            basis_a, basis_b = draw_bases(site, *_largest(sites, bases))
            basis_a, basis_b = (_as_peft_keeps(t, main_weight(bases[0], site.kind)) for t in (basis_a, basis_b))
        shared["randlora_A"][adapter] = basis_a
        shared["randlora_B"][adapter] = basis_b
        return shared

    def module_problem(self, base: nn.Module, site: Site) -> str | None:
        if quant_of(base) is not None:
            return ("is a bitsandbytes-quantised layer: surgeon's RandLoRA adapts float Linear and "
                    "Conv1D layers only (PEFT's bnb RandLoRA layers are not implemented)")
        return None

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind not in KINDS:
            raise TypeError(f"Target module {layer.base_layer} is not supported. Currently, only the "
                            "following modules are supported: `torch.nn.Linear`, "
                            "`transformers.pytorch_utils.Conv1D`.")
        if problem := self.module_problem(layer.base_layer, site):
            raise QuantizedBaseError(f"`{site.path}` {problem}.")
        if site.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {site.r}")
        n_in, n_out = in_out_features(layer.base_layer, site.kind)
        _check_fits(layer.randlora_A[site.adapter], layer.randlora_B[site.adapter], n_in, n_out)
        p = float(site.option("randlora_dropout", 0.0) or 0.0)
        layer.randlora_dropout[site.adapter] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        n = num_bases(n_in, n_out, site.r)
        lam = torch.randn(site.r, n)  # drawn even when reset, as PEFT (same RNG stream)
        gamma = torch.ones(n, min(n_in, n_out)) / max(n_in, n_out)
        if site.option("init_weights", True):
            lam.zero_()
            gamma.fill_(1 / max(gamma.shape))
        weight = main_weight(layer.base_layer, site.kind)
        layer.randlora_lambda[site.adapter] = base_parameter(lam, weight)
        layer.randlora_gamma[site.adapter] = base_parameter(gamma, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        # the shared entries go too, as PEFT's delete_adapter (other_param_names)
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        n_in, n_out = in_out_features(base, site.kind)
        n = num_bases(n_in, n_out, site.r)
        return site.r * n + n * min(n_in, n_out)

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise RandLoraError(f"`adapter_names` (one adapter per batch row) is not supported by RandLoRA "
                            f"adapters (`{layer.path}`), as in PEFT; use `set_adapter` per batch.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        layer = b.layer
        dropout = layer.randlora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and layer.training else 0.0
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        node = b.call(randlora_result, prev, b.x, b.attr(f"randlora_A.{adapter}"),
                      b.attr(f"randlora_B.{adapter}"), b.attr(f"randlora_lambda.{adapter}"),
                      b.attr(f"randlora_gamma.{adapter}"), n_in, n_out, layer.sites[adapter].scaling, p)
        return b.as_result(node)

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's get_delta_weight before its transpose: `(out, in)`, in at least fp32."""
        n_in, n_out = in_out_features(layer.base_layer, layer.kind)
        lam = layer.randlora_lambda[adapter].detach()
        dtype = torch.promote_types(lam.dtype, torch.float32)
        first, second = scaled_bases(layer.randlora_A[adapter].to(lam.device), layer.randlora_B[adapter].to(lam.device),
                                     lam, layer.randlora_gamma[adapter].detach(), n_in, n_out, dtype)
        return (second @ first) * layer.sites[adapter].scaling

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        delta = self._out_major(layer, adapter)
        delta = delta.T if layer.kind == "Conv1D" else delta
        return delta.to(layer.randlora_lambda[adapter].dtype)


def scaled_bases(basis_a: torch.Tensor, basis_b: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor,
                 n_in: int, n_out: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `get_scaled_bases`: the factors `(first, second)` of `linear(linear(x, first), second)`."""
    lo, hi, n = min(n_in, n_out), max(n_in, n_out), lam.shape[1]
    scaled = (lam.to(dtype)[:, :, None] * basis_a[:, :n, :lo].to(dtype) * gamma.to(dtype)[None]).flatten(0, 1)
    flat_b = basis_b[:hi, :n, :].to(dtype).flatten(1)
    return (scaled, flat_b) if lo == n_in else (flat_b.T, scaled.T)


def randlora_result(prev: torch.Tensor, x: torch.Tensor, basis_a: torch.Tensor, basis_b: torch.Tensor,
                    lam: torch.Tensor, gamma: torch.Tensor, n_in: int, n_out: int, scaling: float,
                    p: float) -> torch.Tensor:
    """The graph function: `prev + scaling * linear(linear(dropout(x), first), second)` in PEFT's
    compute dtype (half bases on CPU computed in fp32, as PEFT), cast back to `prev`'s dtype."""
    dtype = torch.promote_types(lam.dtype, basis_b.dtype)
    if x.device.type == "cpu" and dtype in HALF:
        dtype = torch.float32
    first, second = scaled_bases(basis_a, basis_b, lam, gamma, n_in, n_out, dtype)
    h = x.to(dtype)
    if p > 0.0:
        h = F.dropout(h, p)
    return (prev + F.linear(F.linear(h, first), second) * scaling).to(prev.dtype)


class Codec:
    """PEFT's RandLoRA checkpoint (`MethodConfig.checkpoint_codec`): the shared bases under every
    layer (the state_dict's keys) and once more as `base_model.randlora_A` / `_B`."""

    def encode(self, tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, key in zip(SHARED, MODEL_LEVEL):
            copies = [v for k, v in tensors.items() if k.endswith(f".{name}")]
            if copies:
                out[key] = copies[0]
        return out

    def decode(self, tensors: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
               adapter: str) -> dict[str, torch.Tensor]:
        # the per-layer copies load into the one shared tensor; the model-level copy is the same
        return {k: v for k, v in tensors.items() if k not in MODEL_LEVEL}


METHOD = RandLora()
CODEC = Codec()
