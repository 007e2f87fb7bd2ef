"""Installing and removing the groups of `surgeon.compile` on a model's layers.

Each member gets a `FusedForward` as its instance `forward` (nn.Module's call looks there
first): the layer stays the same module, with the same parameters, state dict, hooks and
wrapper API, so transformers (generate, Trainer), surgeon's own operations and torch.compile
see nothing else. Removing the attribute restores the site-scope forward. A layer whose
`forward` something else already replaced (accelerate's device hooks) is left alone.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from surgeon.fusion.find import shared_inputs
from surgeon.fusion.shared import FusedForward, SharedShrink


def fuse(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """Group the layers of `model` that read one input (undoing an earlier `fuse` first)."""
    undo(model)
    for paths in shared_inputs(model, example_inputs):
        members = [model.get_submodule(p) for p in paths]
        members = [m for m in members if "forward" not in m.__dict__]
        if len(members) < 2:
            continue
        group = SharedShrink(members)
        for index, member in enumerate(members):
            member.forward = FusedForward(group.run, index)
        group.current()  # planned now, outside any torch.compile trace
    return model


def undo(model: nn.Module) -> nn.Module:
    """Every layer of `model` back to its own (site-scope) forward."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FusedForward):
            del module.forward
    return model


def groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The paths of each installed group's members, in member order."""
    found: dict[int, dict[int, str]] = {}
    for path, module in model.named_modules():
        fused = module.__dict__.get("forward")
        if isinstance(fused, FusedForward):
            found.setdefault(id(fused.group), {})[fused.index] = path
    return [tuple(paths[i] for i in sorted(paths)) for paths in found.values()]
