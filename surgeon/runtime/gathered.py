"""Mixed-adapter batches of LoRA as one gather-matmul (BGMV), instead of a loop over adapters.

PEFT's `_mixed_batch_forward` runs, per adapter in the batch, an index, two small GEMMs and an
indexed add: with 16 adapters that is ~100 kernel launches and Python steps per layer. Here the
adapters in the batch are stacked once, `A` as `(n + 1, r_max, in)` and `scaling * B` as
`(n + 1, out, r_max)` (lower ranks zero-padded, the last slot all zeros for rows without an
adapter; stored transposed), and every row gathers its own pair and runs two batched matmuls:

    out[i] = prev[i] + x[i] @ A[slot[i]].T @ B[slot[i]].T        (one `add_gathered` node)

Zero padding adds exact zeros and folding `scaling` into `B` only reorders one product, so the
result equals PEFT's within fp32 rounding. The graph comes from insert-adapters (`gathered=True`):
placeholders `slots`, `a_stack`, `b_stack` (role "rows") and that one node as the branch's
result, tagged with adapter "*" (all adapters of the batch).

The stacks are cached per (layer state, adapters in the batch) in `GatheredRun`, keyed on each
weight's identity, storage and `_version` (optimizer steps, `copy_` and `load_state_dict` bump it),
and rebuilt per call, differentiably, while autograd records and a weight requires grad.

Only plain LoRA on Linear / Conv1D with no lora_bias and no active dropout gathers (`supports`);
everything else keeps the per-adapter loop, and DoRA stays refused as in PEFT.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import is_
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from surgeon import kernels

if TYPE_CHECKING:
    from collections.abc import Callable

    from surgeon.runtime.graph import Builder
    from surgeon.runtime.method import MethodLayer

ALL = "*"  # the provenance `adapter` of the gathered branch: every adapter of the batch
INPUTS = ("slots", "a_stack", "b_stack")  # the placeholders after `x`
_KINDS = ("Linear", "Conv1D")  # LoRA's factors are nn.Linear on both


def supports(layer: MethodLayer, adapters: Sequence[str]) -> bool:
    """True when a mixed batch of `adapters` on `layer` can run gathered, exactly as PEFT's loop."""
    if layer.method.name != "lora" or layer.kind not in _KINDS or not adapters:
        return False
    dtypes = set()
    for a in adapters:
        if a in layer.lora_magnitude_vector or a not in layer.lora_A:
            return False
        if layer.lora_B[a].bias is not None:
            return False
        # PEFT runs each adapter's dropout on its rows; the gathered path has none to run
        if layer.training and type(layer.lora_dropout[a]) is not nn.Identity:
            return False
        dtypes.add(layer.lora_A[a].weight.dtype)
        dtypes.add(layer.lora_B[a].weight.dtype)
    return len(dtypes) == 1


def add_gathered(prev: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a_t: torch.Tensor,
                 b_t: torch.Tensor) -> torch.Tensor:
    """`prev` plus row i of `x` (`(batch, ..., in)`) times `A[slots[i]].T @ B[slots[i]].T`.

    The stacks come transposed (`A.T`: `(n + 1, in, r)`, `B.T`: `(n + 1, r, out)`), so the hot
    path is four kernels: two row gathers, a `bmm` and a `baddbmm` that adds into `prev`."""
    rows = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
    if rows.dtype != a_t.dtype:  # PEFT casts the input to the adapter's dtype
        rows = rows.to(a_t.dtype)
    h = torch.bmm(rows, a_t.index_select(0, slots))
    b_rows = b_t.index_select(0, slots)
    if prev.dim() == 3 and prev.dtype == h.dtype:
        return torch.baddbmm(prev, h, b_rows)
    # PEFT: `lora_output.to(result.dtype)` before the add
    return prev + torch.bmm(h, b_rows).reshape(prev.shape).to(prev.dtype)


def emit(b: Builder, prev: fx.Node, inputs: Sequence[fx.Node]) -> fx.Node:
    """The gathered branch after result `prev`: one `add_gathered(prev, x, slots, A.T, B.T)`
    node, the branch's result (its `args[0]` is `prev`); on a GPU the BGMV kernel
    (`surgeon.kernels.gathered_add`)."""
    device = next(iter(b.layer.lora_A.values())).weight.device
    fn = kernels.gathered_add if kernels.wanted(device) else add_gathered
    return b.as_result(b.call(fn, prev, b.x, *inputs))


def slots_of(names: Sequence[str], adapters: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """Each row's slot in the stacks: its adapter's position in `adapters`, else the zero slot.
    Shared by the layers of one model call (same rows, same adapters): built once, not per layer."""
    return _slots(tuple(names), adapters, device)


@functools.lru_cache(maxsize=32)
def _slots(names: tuple[str, ...], adapters: tuple[str, ...], device: torch.device) -> torch.Tensor:
    index = {a: i for i, a in enumerate(adapters)}
    zero = len(adapters)
    return torch.tensor([index.get(n, zero) for n in names], dtype=torch.long, device=device)


def _weights(layer: MethodLayer, adapters: Sequence[str]) -> list[torch.Tensor]:
    """A0, B0, A1, B1, ... read live (dict lookups: `nn.Module.__getattr__` costs ~1 us each)."""
    tables = layer._modules["lora_A"]._modules, layer._modules["lora_B"]._modules
    return [table[a]._parameters["weight"] for a in adapters for table in tables]


def stack(layer: MethodLayer, adapters: Sequence[str],
          weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A.T, (scaling * B).T)` stacked, zero-padded, with a trailing zero slot (differentiable)."""
    first = weights[0]
    r_max = max(w.shape[0] for w in weights[0::2])
    n_in, n_out = first.shape[1], weights[1].shape[0]
    zero_a = first.new_zeros(1, r_max, n_in)
    zero_b = first.new_zeros(1, n_out, r_max)
    parts_a, parts_b = [], []
    for i, adapter in enumerate(adapters):
        wa, wb = weights[2 * i], weights[2 * i + 1] * layer.sites[adapter].scaling
        pad = r_max - wa.shape[0]
        parts_a.append(nn.functional.pad(wa, (0, 0, 0, pad)) if pad else wa)
        parts_b.append(nn.functional.pad(wb, (0, pad)) if pad else wb)
    a = torch.cat([torch.stack(parts_a), zero_a]).transpose(1, 2).contiguous()
    return a, torch.cat([torch.stack(parts_b), zero_b]).transpose(1, 2).contiguous()


def _fingerprint(weights: Sequence[torch.Tensor]) -> list[int]:
    """What changes when a weight is written: in place (`_version`) or through `.data` (storage)."""
    return [w._version for w in weights] + [w.data_ptr() for w in weights]


@dataclass
class GatheredRun:
    """The mixed-batch forward of one layer state and adapter set: slots per call, stacks cached
    (see the module docstring). Called as `run(layer, x, names)`."""

    fn: Callable[..., torch.Tensor]  # compile_forward of the gathered graph
    adapters: tuple[str, ...]
    _weights: list[torch.Tensor] = field(default_factory=list, repr=False)
    _key: list[int] = field(default_factory=list)
    _stacks: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def stacks(self, layer: MethodLayer) -> tuple[torch.Tensor, torch.Tensor]:
        weights = _weights(layer, self.adapters)
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return stack(layer, self.adapters, weights)  # autograd must see the stacking
        key = _fingerprint(weights)
        if self._stacks is None or key != self._key or not all(map(is_, weights, self._weights)):
            with torch.no_grad():
                self._stacks = stack(layer, self.adapters, weights)
            self._weights, self._key = weights, key
        return self._stacks

    def __call__(self, layer: MethodLayer, x: torch.Tensor, names: Sequence[str]) -> Any:
        a, b = self.stacks(layer)
        return self.fn(layer, x, slots_of(names, self.adapters, x.device), a, b)
