"""VB-LoRA on Linear and transformers Conv1D: PEFT 0.21's `peft.tuners.vblora` math, names and init.

Each layer trains logits `vblora_logits_A[adapter]` `(r, in / L, N)` and `vblora_logits_B[adapter]`
`(out / L, r, N)`; every length-L sub-vector of the low-rank factors is the softmax-weighted sum
of the top-k bank vectors its logits pick. The bank `vblora_vector_bank[adapter]` `(N, L)` is ONE
trained Parameter for the whole model: a `nn.ParameterDict` every VB-LoRA layer holds as the same
instance (the runtime's shared containers, `surgeon.runtime.method`), stored once in the
checkpoint as `base_model.vblora_vector_bank`. PEFT draws the bank anew for every targeted layer
(the last draw stays) between the layers' logits; `add` redraws it in place in the same order, so
torch's RNG stream, and every value, is PEFT's.

Forward: `A = topk_mix(logits_A).reshape(r, in)`, `B = topk_mix(logits_B)` as `(out, r)`, then
`prev + linear(linear(dropout(x), A), B)`: the two thin factors are rebuilt from the bank each
call (they are what training updates), the `(out, in)` delta is never formed; merging adds `B @ A`.

`save_only_topk_weights` checkpoints (`Codec`) keep per logits tensor its top-k indices (the
smallest integer dtype) and k-1 softmax weights; loading rebuilds logits that are -inf outside
the top k, exactly as PEFT, so such an adapter serves inference and merging; a training-mode
forward refuses it, as PEFT's does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import UserError
from surgeon.runtime.base_kinds import in_out_features, main_weight
from surgeon.runtime.method import AdditiveMerge, base_parameter, remove_entries
from surgeon.runtime.quantized import quant_of

if TYPE_CHECKING:
    from surgeon.planning.site import Site
    from surgeon.runtime.graph import Builder, LayerView

KINDS = ("Linear", "Conv1D")
BANK = "vblora_vector_bank"


class VbloraError(UserError, ValueError):
    """What PEFT's VB-LoRA refuses too: sizes the bank cannot tile, mixed-adapter batches,
    training an adapter loaded from top-k weights."""


class VBLoRA(AdditiveMerge):
    """The `vblora` method's runtime (`surgeon.runtime.method.MethodRuntime`)."""

    name = "vblora"
    containers = (("vblora_dropout", nn.ModuleDict), ("vblora_logits_A", nn.ParameterDict),
                  ("vblora_logits_B", nn.ParameterDict), (BANK, nn.ParameterDict))
    shared_containers = (BANK,)

    def init_shared(self, old: Mapping[str, nn.Module], adapter: str, sites: Sequence[Site],
                    bases: Sequence[nn.Module]) -> dict[str, nn.Module]:
        """A new bank container holding the model's banks and `adapter`'s (drawn by `add`)."""
        bank = nn.ParameterDict(dict(old[BANK].items()) if BANK in old else {})
        weight = main_weight(bases[0], sites[0].kind)
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        shape = (int(sites[0].option("num_vectors")), int(sites[0].option("vector_length")))
        bank[adapter] = nn.Parameter(torch.zeros(shape, device=weight.device, dtype=dtype))
        return {BANK: bank}

    def shared_params(self, sites: Sequence[Site]) -> int:
        return int(sites[0].option("num_vectors")) * int(sites[0].option("vector_length"))

    def module_problem(self, base: nn.Module, site: Site) -> str | None:
        if quant_of(base) is not None:
            return ("is a bitsandbytes-quantised layer: VB-LoRA adapts float Linear and Conv1D layers "
                    "only (PEFT 0.21 has no quantised VB-LoRA layer and cannot merge into one)")
        topk, vectors = int(site.option("topk")), int(site.option("num_vectors"))
        if topk > vectors:  # PEFT accepts the config and fails in the first forward
            return f"cannot take `topk` {topk} from a bank of `num_vectors` {vectors}: topk must not exceed it"
        length = int(site.option("vector_length"))
        for name, size in zip(("in_features", "out_features"), in_out_features(base, site.kind)):
            if size % length:
                return f"has `{name}` {size}, which must be divisible by `vector_length` {length}"
        return None

    def add(self, layer: LayerView, site: Site) -> None:
        if site.kind not in KINDS:
            raise TypeError(f"Target module {layer.base_layer} is not supported. Currently, only the "
                            "following modules are supported: `torch.nn.Linear`, "
                            "`transformers.pytorch_utils.Conv1D`.")
        if problem := self.module_problem(layer.base_layer, site):
            raise VbloraError(f"`{site.path}` {problem}.")
        topk, vectors = int(site.option("topk")), int(site.option("num_vectors"))
        if site.r <= 0 or topk <= 0:
            raise ValueError(f"`r` {site.r} and `topk` {topk} should be positive integer values")
        n_in, n_out = in_out_features(layer.base_layer, site.kind)
        length = int(site.option("vector_length"))
        p = float(site.option("vblora_dropout", 0.0) or 0.0)
        layer.vblora_dropout[site.adapter] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        bound, std = float(site.option("init_vector_bank_bound")), float(site.option("init_logits_std"))
        with torch.no_grad():  # PEFT's per-layer bank draw, then this layer's logits
            layer.vblora_vector_bank[site.adapter].copy_(torch.zeros(vectors, length).uniform_(-bound, bound))
        logits_a = torch.zeros(site.r, n_in // length, vectors).normal_(0, std)
        logits_b = torch.zeros(n_out // length, site.r, vectors).normal_(0, std)
        weight = main_weight(layer.base_layer, site.kind)
        layer.vblora_logits_A[site.adapter] = base_parameter(logits_a, weight)
        layer.vblora_logits_B[site.adapter] = base_parameter(logits_b, weight)

    def remove(self, layer: LayerView, adapter: str) -> None:
        # the shared bank goes too, as PEFT's delete_adapter (adapter_layer_names)
        remove_entries(layer, self.containers, adapter)

    def num_params(self, base: nn.Module, site: Site) -> int:
        n_in, n_out = in_out_features(base, site.kind)
        length, vectors = int(site.option("vector_length")), int(site.option("num_vectors"))
        return site.r * vectors * (n_in // length + n_out // length)

    def check_mixed(self, layer: LayerView, adapter: str) -> None:
        raise VbloraError(f"`adapter_names` (one adapter per batch row) is not supported by VB-LoRA "
                          f"adapters (`{layer.path}`), as in PEFT; use `set_adapter` per batch.")

    def emit(self, b: Builder, adapter: str, prev: fx.Node, rows: fx.Node | None) -> fx.Node:
        if rows is not None:
            self.check_mixed(b.layer, adapter)
        layer = b.layer
        dropout = layer.vblora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and layer.training else 0.0
        node = b.call(vblora_result, prev, b.x, b.attr(f"vblora_logits_A.{adapter}"),
                      b.attr(f"vblora_logits_B.{adapter}"), b.attr(f"{BANK}.{adapter}"),
                      int(layer.sites[adapter].option("topk")), p, layer.training)
        return b.as_result(node)

    def _out_major(self, layer: LayerView, adapter: str) -> torch.Tensor:
        """PEFT's get_delta_weight before its transpose: `B @ A` `(out, in)`, in at least fp32."""
        logits_a = layer.vblora_logits_A[adapter].detach()
        dtype = torch.promote_types(logits_a.dtype, torch.float32)
        a, b = factors(logits_a.to(dtype), layer.vblora_logits_B[adapter].detach().to(dtype),
                       layer.vblora_vector_bank[adapter].detach().to(logits_a.device, dtype),
                       int(layer.sites[adapter].option("topk")))
        return b @ a

    def delta_weight(self, layer: LayerView, adapter: str) -> torch.Tensor:
        delta = self._out_major(layer, adapter)
        delta = delta.T if layer.kind == "Conv1D" else delta
        return delta.to(layer.vblora_logits_A[adapter].dtype)


def topk_mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """PEFT's `_get_low_rank_matrix`: each sub-vector mixes its top-k bank vectors by softmax."""
    top, indices = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def factors(logits_a: torch.Tensor, logits_b: torch.Tensor, bank: torch.Tensor,
            topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_get_lora_matrices`: A `(r, in)` and B `(out, r)`."""
    a = topk_mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = topk_mix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b


def vblora_result(prev: torch.Tensor, x: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor,
                  bank: torch.Tensor, topk: int, p: float, training: bool) -> torch.Tensor:
    """The graph function: `prev + linear(linear(dropout(x), A), B)`, cast back to `prev`'s dtype."""
    if training and logits_a[0, 0].isinf().any():
        raise VbloraError("Found infinity values in VB-LoRA logits. Ensure training was not resumed "
                          "from a `save_only_topk_weights` model (it serves inference and merging only).")
    a, b = factors(logits_a, logits_b, bank.to(logits_a.device), topk)
    h = x.to(bank.dtype)
    if p > 0.0:
        h = F.dropout(h, p)
    return (prev + F.linear(F.linear(h, a), b)).to(prev.dtype)


def _indices_dtype(vectors: int) -> torch.dtype:
    """PEFT's choice: the smallest integer type that holds a bank index."""
    for bound, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32)):
        if vectors < bound:
            return dtype
    return torch.int64


class Codec:
    """PEFT's `save_only_topk_weights` checkpoint form (`MethodConfig.checkpoint_codec`)."""

    def encode(self, tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        if not config.get("save_only_topk_weights"):
            return tensors
        out = {k: v for k, v in tensors.items() if "vblora_logits" not in k}
        dtype = _indices_dtype(int(config["num_vectors"]))
        for key, logits in tensors.items():
            if "vblora_logits" in key:
                top, indices = logits.topk(int(config["topk"]))
                out[key + "_topk_indices"] = indices.to(dtype)
                out[key + "_topk_weights"] = torch.softmax(top, dim=-1)[:, :, :-1].contiguous()
        return out

    def decode(self, tensors: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
               adapter: str) -> dict[str, torch.Tensor]:
        """Logits from top-k indices and weights, as PEFT's `_remap_adapter_state_dict_for_load`."""
        if not any(k.endswith("_topk_indices") for k in tensors):
            return tensors
        bank = next((v for k, v in model_state.items() if k.endswith(f".{BANK}.{adapter}")), None)
        if bank is None:
            return tensors
        out = dict(tensors)
        for key in [k for k in tensors if k.endswith("_topk_indices")]:
            weights = out.pop(key.replace("_topk_indices", "_topk_weights"))
            weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
            logits = torch.log(weights)
            full = torch.full((*logits.shape[:-1], bank.shape[0]), float("-inf"), device=logits.device)
            out[key.removesuffix("_topk_indices")] = full.scatter(-1, out.pop(key).to(torch.long), logits)
        return out


METHOD = VBLoRA()
CODEC = Codec()
