"""Graph scope: adapted layers that read one input share one shrink GEMM (`surgeon.compile`).

Site scope runs each adapted layer alone: q, k and v each compute their own `x @ A.T` on the
same hidden states. `compile(model)` captures the adapted model (`find`), groups the LoRA layers
whose calls read the same graph node, and installs on each member a forward that takes its
slice of one GEMM over the concatenated `A`s (`shared`), the member's own graph with its shrinks
read from inputs (`rewrite`) doing the rest.

Why a group object on the members and not an exported-graph rewrite: an exported program is a
new module with baked-in control flow; it cannot be handed to `generate`, `Trainer` or
`save_pretrained`, and it would have to be re-exported after every set_adapter or merge. The
members stay the same modules instead (state dict, hooks, API unchanged), each state change
is seen through the layer's own graph, and the runtime shares a GEMM only between calls that
receive the same tensor, so a wrong guess from the capture costs speed, never a wrong output.

What fuses: LoRA (rsLoRA, any scaling, lora_bias, and DoRA too: its shrink is the same
`x @ A.T`) on Linear and Conv1D layers, several active adapters per layer included, whose `A`s
share one dtype and device. Left to site scope: mixed-adapter batches (`adapter_names=`, one
gather-matmul per layer already), adapters with dropout while training (each draws its own
mask, so their inputs differ), Embedding, convolutions and other methods. While torch.compile
traces, a group whose members changed state since their last eager call runs site scope (fx
graphs cannot be rebuilt in a trace); `surgeon.compile` again, or one eager forward, replans.
`undo(model)` removes the groups; `groups(model)` lists them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from surgeon.fusion.install import fuse, groups, undo

__all__ = ["compile", "groups", "undo"]


def compile(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """Make the adapted layers of `model` that read one input share one shrink GEMM, in place.

    Args:
        model: a model adapted by `surgeon.apply` / `load_adapter` (any state).
        example_inputs: what `surgeon.plan` takes for roles; None synthesizes them.
    Returns:
        `model`, whose outputs equal the site-scope model's (to float rounding). Calling again
        re-captures and regroups; `surgeon.fusion.undo(model)` restores site scope.
    Example:
        >>> model = surgeon.compile(surgeon.apply(spec, model))
    """
    return fuse(model, example_inputs)
