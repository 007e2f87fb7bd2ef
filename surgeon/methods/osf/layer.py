"""OSF on Linear: PEFT 0.21's `peft.tuners.osf` decomposition, names, init, forward and merge.

Adding an adapter takes the SVD `W = U S V` of the (fp32) base weight and splits it at the
layer's effective rank k: the top-k part stays in `W` untouched; the low part is copied twice,
as the trainable `osf_svd_params[adapter]` (`U_low` `(out, m-k)`, `S_low` `(m-k)`, `V_low`
`(m-k, in)`, `m = min(out, in)`; random with `init_weights=false`) and as frozen, non-persistent
buffers `_osf_U_low_init` / `_osf_S_low_init` / `_osf_V_low_init`. The high factor that the low
one cannot stand for (`_osf_U_high` when out > in, `_osf_V_high` when in > out) is kept too, for
the gradient projection. Only `osf_svd_params` reaches the checkpoint, as in PEFT.

The base weight is NOT reparametrised: PEFT 0.21 keeps `W` and adds the difference of the two
low-rank products, so the forward is

    prev + ((x V_low^T) * S_low) U_low^T - ((x V0^T) * S0) U0^T

four thin matmuls of rank `m - k` (PEFT concatenates both pairs into one rank-2(m-k) product;
the sum is the same), never a weight-sized delta. As PEFT, only the FIRST active adapter runs
(when it is not on this layer, none does). Gradients of `U_low` / `V_low` are projected onto
the complement of the frozen subspace by PEFT's formulas, through an identity function whose
backward projects (PEFT registers tensor hooks; the gradient that reaches `.grad` is the same).

Merging adds `U_low S_low V_low - U0 S0 V0` to the weight (every merged adapter, as PEFT);
unmerging is refused, as PEFT's OSF refuses it (so is disabling merged adapters, which would
need an unmerge). Mixed-adapter batches are refused, as PEFT's OSF layers take no
`adapter_names`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.buffers import BufferDict
from surgeon.runtime.method import AdditiveMerge, remove_entries

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

_INITS = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init")


class OsfError(UserError, ValueError):
    """What PEFT's OSF refuses too: unmerging, mixed-adapter batches, non-float weights."""


class Frozen(BufferDict):
    """One non-persistent buffer per adapter (PEFT's BufferDict): out of the state_dict and the
    checkpoint, moved and cast with the model."""


def resolve_rank(value, min_dim: int) -> int:
    """PEFT's `_resolve_rank`: null is half of `min_dim`, a float in (0, 1] a fraction of it,
    anything else `int(value)`; clamped to [0, min_dim]."""
    if value is None:
        return max(min_dim // 2, 0)
    r = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, r), 0)


def effective_rank(weight_shape: tuple[int, ...], site: Site) -> int:
    """The layer's frozen rank: `effective_rank`, or the first `rank_pattern` key that
    `re.search`es the module path (PEFT's OSFModel._create_and_replace)."""
    min_dim = min(weight_shape)
    rank = resolve_rank(site.option("effective_rank"), min_dim)
    for pattern, value in site.option("rank_pattern") or ():
        if re.search(pattern, site.path):
            return resolve_rank(value, min_dim)
    return rank


class _Projected(torch.autograd.Function):
    """Identity forward; backward projects the gradient as PEFT's OSF hooks do."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, basis: torch.Tensor, complement: bool, side: str) -> torch.Tensor:
        ctx.save_for_backward(basis)
        ctx.complement, ctx.side = complement, side
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (basis,) = ctx.saved_tensors
        if ctx.side == "U":  # basis (out, .): high (remove its span) or the low init (keep it)
            proj = basis @ (basis.transpose(0, 1) @ grad)
        else:  # basis (., in)
            proj = (grad @ basis.transpose(0, 1)) @ basis
        return (grad - proj if ctx.complement else proj), None, None, None


def _projected(p: torch.Tensor, high: torch.Tensor | None, low_init: torch.Tensor, side: str):
    if not (torch.is_grad_enabled() and p.requires_grad):
        return p
    return _Projected.apply(p, low_init if high is None else high, high is not None, side)


def osf_delta(x: torch.Tensor, params: tuple, inits: tuple, highs: tuple) -> torch.Tensor:
    """The graph function: what the adapter adds for input `x` (module docstring), in x's dtype."""
    s, u, v = params  # osf_svd_params' order: S_low, U_low, V_low
    u0, s0, v0 = (t.to(u.dtype) for t in inits)
    u, v = _projected(u, highs[0], u0, "U"), _projected(v, highs[1], v0, "V")
    h = x if x.dtype == u.dtype else x.to(u.dtype)
    out = F.linear(F.linear(h, v) * s, u) - F.linear(F.linear(h, v0) * s0, u0)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class Osf(AdditiveMerge):
    """The `osf` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "osf"
    containers = (("osf_svd_params", nn.ModuleDict),) + tuple((n, Frozen) for n in _INITS) + (
        ("_osf_U_high", Frozen), ("_osf_V_high", Frozen))

    def module_problem(self, base: nn.Module, site: Site) -> str | None:
        """PEFT's `update_layer` refuses an effective rank that resolves to 0."""
        rank = effective_rank(tuple(base.weight.shape), site)
        if rank <= 0:
            return f"gets effective_rank {rank} (from {site.option('effective_rank')!r} and " \
                   "rank_pattern); OSF needs a positive one"
        return None

    def add(self, layer: LayerView, site: Site) -> None:
        weight = layer.base_layer.weight
        if site.kind != "Linear" or weight.ndim != 2:
            raise TypeError(f"OSF adapts only torch.nn.Linear layers, not {site.kind} (`{site.path}`)")
        if not weight.dtype.is_floating_point:
            raise OsfError(f"OSF decomposes the base weight by SVD; `{site.path}` holds a "
                           f"{weight.dtype} (quantised) weight, which has no such decomposition")
        rank = effective_rank(tuple(weight.shape), site)
        if rank <= 0:
            raise ValueError("`effective_rank` should be a positive integer value but the value "
                             f"passed is {rank}")
        svd = decompose(weight.detach(), rank)
        adapter = site.adapter
        for name, key in zip(_INITS, ("U_low", "S_low", "V_low")):
            layer._modules[name][adapter] = svd[key].clone()
        n_out, n_in = weight.shape
        if n_out > n_in:  # U is not square: its high part is not the low init's complement
            layer._osf_U_high[adapter] = svd["U_high"]
        if n_in > n_out:
            layer._osf_V_high[adapter] = svd["V_high"]
        low = [svd[k] for k in ("U_low", "S_low", "V_low")]
        if site.option("init_weights", True) is False:
            low = [torch.randn_like(t) for t in low]  # PEFT's order: U, S, V
        # a plain dict, as PEFT: the ParameterDict sorts it (S_low, U_low, V_low)
        layer.osf_svd_params[adapter] = nn.ParameterDict(dict(zip(("U_low", "S_low", "V_low"), low)))

    def remove(self, layer: LayerView, adapter: str) -> None:
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        n_out, n_in = base.weight.shape
        low = min(n_out, n_in) - effective_rank((n_out, n_in), site)
        return low * (n_out + n_in + 1)

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise OsfError(
            f"`adapter_names` (one adapter per batch row) is not supported by OSF adapters "
            f"(`{layer.path}`), as in PEFT; run one adapter per batch with `set_adapter`.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        layer = b.layer
        active = layer.active_adapters
        if not active or active[0] != adapter:
            return prev  # PEFT's OSF runs its first active adapter only (module docstring)
        params = tuple(b.attr(f"osf_svd_params.{adapter}.{k}") for k in ("S_low", "U_low", "V_low"))
        inits = tuple(b.attr(f"{name}.{adapter}") for name in _INITS)
        highs = tuple(b.attr(f"{name}.{adapter}") if adapter in layer._modules[name] else None
                      for name in ("_osf_U_high", "_osf_V_high"))
        return b.result(prev, b.call(osf_delta, b.x, params, inits, highs))

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's `get_delta_weight`, `U S V - U0 S0 V0`, in at least fp32."""
        svd = layer.osf_svd_params[adapter]
        dtype = torch.promote_types(svd["U_low"].dtype, torch.float32)
        u, s, v = (svd[k].detach().to(dtype) for k in ("U_low", "S_low", "V_low"))
        u0, s0, v0 = (layer._modules[n][adapter].to(dtype) for n in _INITS)
        return (u * s) @ v - (u0 * s0) @ v0

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        return self._out_major(layer, adapter).to(layer.osf_svd_params[adapter]["U_low"].dtype)

    def unfold(self, layer: LayerView, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        raise OsfError(f"OSF adapters cannot be unmerged (`{layer.path}`): PEFT's OSF does not "
                       "support unmerging, a merge changes the base weights for good; reload the "
                       "base model instead (disabling merged adapters would need an unmerge too)")


def decompose(weight: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """PEFT's `decompose_weight_matrix`: the fp32 SVD split at `top_k`, in the weight's dtype."""
    u, s, vt = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    k = min(top_k, s.shape[0])
    parts = {"U_high": u[:, :k], "S_high": s[:k], "V_high": vt[:k, :],
             "U_low": u[:, k:], "S_low": s[k:], "V_low": vt[k:, :]}
    return {n: t.contiguous().to(weight.device, weight.dtype) for n, t in parts.items()}


METHOD = Osf()
