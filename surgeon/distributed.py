"""What surgeon does differently when the model is sharded or replicated across processes.

Nothing here trains: FSDP2 (`torch.distributed.fsdp.fully_shard`), DDP and accelerate do that,
and an adapted layer is a plain `nn.Module` they shard and replicate like any other. FSDP2 swaps
a module's registered parameters between sharded DTensors (at rest) and full tensors (inside its
forward); the compiled forward reads `_parameters` live (`surgeon.runtime.graph`), so it sees
whichever is current. What remains is the model-level operations that touch tensors at rest,
where a sharded parameter is a `DTensor` holding one slice:

- saving gathers the adapter tensors it writes (`gather`; every rank takes part, since
  `DTensor.full_tensor` is a collective) and only the main process writes (`on_main_process`);
- loading copies each rank's slice of a checkpoint tensor into its shard (`place`);
- merging folds each rank's rows exactly: through DTensor ops when the adapter is sharded too,
  else on the gathered weight, writing back this rank's slice (`fold_operand`, `place`);
- adding trainable adapters to an already sharded model is refused (`refuse_trainable`): their
  parameters would be plain tensors outside the engine's sharding, trained on every rank
  without their gradients being reduced, so ranks would silently drift apart; a frozen one is
  held whole on every rank (`gather_new`).

`torch.distributed` is imported only when a model holds DTensors or a process group is up, so a
single-process run pays nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from surgeon.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn


class DistributedError(UserError, RuntimeError):
    """An operation that cannot run as asked on a sharded or multi-process model; says why."""


def is_dtensor(tensor: object) -> bool:
    """True for a DTensor (and a Parameter holding one); False without importing anything when
    no code has imported DTensor yet (then none can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_sharded(params: Iterable[torch.Tensor]) -> bool:
    """True when any of `params` is a DTensor (FSDP2 has sharded it, or tensor parallelism)."""
    return any(is_dtensor(p) for p in params)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective), else itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def gather(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{key: full(tensor)}` in the mapping's order, which must be the same on every rank (a
    state_dict's is); only these tensors are gathered, never the whole model."""
    return {key: full(tensor) for key, tensor in tensors.items()}


def place(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a full tensor every rank holds) laid out as `target`: for a DTensor, this
    rank's slice under the same mesh and placements, cut locally without communication."""
    if not is_dtensor(target):
        return value
    if is_dtensor(value):  # computed sharded already (a merge through DTensor ops)
        return value.redistribute(target.device_mesh, target.placements)
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)


def fold_operand(weight: torch.Tensor, adapter_params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The base weight as a merge computes with it. A sharded weight stays a DTensor when the
    adapter's parameters are sharded too (FSDP2 sharded both): DTensor ops then give each rank
    exactly its rows. Beside plain adapter parameters (an adapter loaded frozen after sharding)
    it is gathered whole; `place` writes the rank's slice of the result back."""
    if is_dtensor(weight) and not all(is_dtensor(p) for p in adapter_params):
        return weight.full_tensor()
    return weight


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def on_main_process(write: Callable[[], None], is_main_process: bool | None, *, collective: bool) -> None:
    """Run `write` on the main process only: `is_main_process` (PEFT's argument) when given,
    else rank 0 of the default process group (every process when none is initialised).

    `collective`: every rank is in this call (the model is sharded, so all gathered). Then, in the
    automatic case, the other ranks wait for rank 0's outcome: every rank returns once the
    files exist, and every rank raises when rank 0 failed, so none is left waiting in a later
    collective. Otherwise nobody waits, so the usual DDP `if rank == 0: save(...)` still works.
    """
    rank, world = rank_and_world()
    if is_main_process is not None or world == 1:
        if is_main_process is not False:
            write()
        return
    if not collective:
        if rank == 0:
            write()
        return
    failure: BaseException | None = None
    if rank == 0:
        try:
            write()
        except BaseException as error:  # noqa: BLE001 - reported to every rank, then re-raised
            failure = error
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    _dist().broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise DistributedError(f"rank 0 failed to write the checkpoint, so nothing was saved: {outcome[0]}")


def refuse_trainable(model: nn.Module, what: str) -> None:
    """Raise when `model` is already sharded: trainable adapters must exist before sharding."""
    if is_sharded(model.parameters()):
        raise DistributedError(
            f"{what} on a model whose parameters are already sharded (DTensors, e.g. after "
            "`fully_shard`) would add plain parameters that the sharding engine does not manage, "
            "so their gradients would not be reduced across ranks. Apply the spec (or "
            "`load_adapter(..., is_trainable=True)`) before `fully_shard`; an adapter loaded "
            "with `is_trainable=False` can be added to a sharded model.")


def gather_new(model: nn.Module, before: set[int]) -> None:
    """Make every DTensor parameter of `model` not among `before` (ids of the parameters the
    engine already manages) a plain full tensor, gathered from every rank (a collective).

    Adding an adapter to a sharded model copies sharded tensors (a module to save is a deep
    copy of a sharded module; DoRA's magnitude is computed from a sharded weight). The engine
    never gathers those copies for a forward, where a DTensor beside plain tensors fails, so
    they are held whole on every rank instead: right for a frozen adapter, which is all that
    may be added after sharding (`refuse_trainable`)."""
    if "torch.distributed.tensor" not in sys.modules:
        return  # no DTensor can exist
    from torch import nn

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) not in before and is_dtensor(param):
                whole = param.detach().full_tensor()
                module._parameters[name] = nn.Parameter(whole, requires_grad=param.requires_grad)


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 module's gathered parameters, so that weights written to the shards
    (a merge) are the ones the next forward gathers, not a stale full copy."""
    if "torch.distributed.fsdp" not in sys.modules:
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _dist():
    """`torch.distributed` when a default process group is up, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist
