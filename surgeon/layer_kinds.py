"""What a module of the host model is, for every stage: an adaptable layer kind, a stack of layers,
a transformers model.

Planning (which modules a selector may adapt), capture (which graph nodes are projections), the
runtime (how each kind's weight is laid out) and the language (which class names a selector may
use) all ask these questions; this module is the one place that answers them.

- A *layer kind* is one of `KINDS`, named after the class it stands for. "Conv1D" is transformers'
  fan-in/fan-out Conv1D (GPT-2); "Conv1d" is torch's convolution. `kind_of` checks them in PEFT
  0.21's dispatch order (`peft.tuners.lora.model.dispatch_default`). "MultiheadAttention" is
  adapted as a whole (LoRA only, as PEFT: its in_proj and out_proj through the module). "Norm" and
  "Module" are modules a method adapts whole by calling them (LN tuning's per-adapter copies):
  only a method with `MethodConfig.whole_modules` gets them, from `whole_kind_of`.
- A *stack* is the outermost `nn.ModuleList`/`nn.Sequential` on a path that holds >= 2 non-leaf
  children owning parameters; those children are its *blocks* (a transformer's layers). Layer
  indices (`surgeon.planning.layers`) and capture's one-block-per-structure tracing
  (`surgeon.capture.graph`) both read stacks from `outer_stacks`.
- A *transformers model* is an instance of transformers' `PreTrainedModel`.

Import cost is the design constraint: `import surgeon` and `surgeon check` must not import torch,
and nothing here may import transformers (seconds). torch is imported inside the functions (a
caller that holds a module has loaded it already), and transformers classes are looked up in
`sys.modules` only: if transformers was never imported, no module can be one of its classes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# Every base layer kind a method can adapt (the order messages list them in).
KINDS: tuple[str, ...] = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding",
                          "MultiheadAttention", "Parameter",  # Parameter: LoRA target_parameters
                          "Norm", "Module")  # whole modules: see ANY_MODULE_KINDS
LINEAR_KINDS: tuple[str, ...] = ("Linear", "Conv1D")  # a matrix product: PEFT's `all-linear`
CONV_KINDS: tuple[str, ...] = ("Conv1d", "Conv2d", "Conv3d")
# Kinds whose module reads its own weights (no `.weight` to call through): the adapted layer calls
# the module with its deltas substituted, and a method folds them with its own hook.
WHOLE_MODULE_KINDS: tuple[str, ...] = ("MultiheadAttention", "Parameter", "Norm", "Module")
# Kinds a method adapting modules as a whole (`MethodConfig.whole_modules`, LN tuning's copies)
# gets from `whole_kind_of`: "Norm" for a normalisation layer, "Module" for anything else (even a
# Linear or a container). `kind_of` never answers them, so other methods never see them.
ANY_MODULE_KINDS: tuple[str, ...] = ("Norm", "Module")
# What each kind computes, in the words of capture's dataflow rules: a lookup never projects q/k/v.
FAMILY: Mapping[str, str] = {
    **dict.fromkeys(LINEAR_KINDS, "linear"), **dict.fromkeys(CONV_KINDS, "conv"), "Embedding": "embedding",
    "MultiheadAttention": "attention",
}


_CLASSES: tuple[tuple[type, str], ...] = ()


def _torch_classes() -> tuple[tuple[type, str], ...]:
    """torch's classes of each kind in PEFT's dispatch order (Conv1D, transformers', comes last).
    Filled on first use by hand, not with functools.cache: dynamo traces lowering inside
    compiled forwards and warns about cached functions."""
    global _CLASSES
    if not _CLASSES:
        from torch import nn

        _CLASSES = ((nn.Embedding, "Embedding"), (nn.Conv2d, "Conv2d"), (nn.Conv3d, "Conv3d"),
                    (nn.Conv1d, "Conv1d"), (nn.MultiheadAttention, "MultiheadAttention"),
                    (nn.Linear, "Linear"))
    return _CLASSES


def kind_of(module: nn.Module) -> str | None:
    """The layer kind (`Site.kind`) of `module`, or None when no method can adapt it.

    Subclasses count (a quantised Linear is a "Linear"), as in PEFT.

    Example:
        >>> kind_of(torch.nn.Linear(2, 3))
        'Linear'
    """
    for cls, kind in _torch_classes():
        if isinstance(module, cls):
            return kind
    conv1d = transformers_attr("transformers.pytorch_utils", "Conv1D")
    if conv1d is not None and isinstance(module, conv1d):
        return "Conv1D"
    return None


def is_norm(module: nn.Module) -> bool:
    """Whether `module` normalises: torch's norm layers, or a model's own class named like one
    (transformers' LlamaRMSNorm, T5LayerNorm, ... subclass nn.Module only)."""
    from torch import nn

    norms = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.LocalResponseNorm,
             nn.modules.batchnorm._NormBase)  # _NormBase: BatchNorm*d and InstanceNorm*d
    return isinstance(module, norms) or type(module).__name__.endswith("Norm")


def whole_kind_of(module: nn.Module) -> str:
    """The kind of `module` adapted as a whole (see ANY_MODULE_KINDS): "Norm" or "Module"."""
    return "Norm" if is_norm(module) else "Module"


def kind_class(kind: str) -> type | None:
    """The class `kind` stands for; None for "Conv1D" while transformers is not loaded."""
    if kind == "Conv1D":
        return transformers_attr("transformers.pytorch_utils", "Conv1D")
    return {k: c for c, k in _torch_classes()}[kind]


# --------------------------------------------------------------------------- transformers


def transformers_attr(module: str, name: str) -> Any:
    """`module.name` if that transformers module is already imported (a model that uses it was
    built), else None: a plain nn.Module then never pays the seconds transformers takes to import.
    """
    loaded = sys.modules.get(module)
    return None if loaded is None else getattr(loaded, name)


def is_transformers_model(model: Any) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (without importing transformers)."""
    pretrained = transformers_attr("transformers.modeling_utils", "PreTrainedModel")
    return pretrained is not None and isinstance(model, pretrained)


def input_embedding(model: Any) -> nn.Module | None:
    """A transformers model's input (token) embedding; None for other models and for composite
    models that have none (CLIP under transformers 5 raises NotImplementedError)."""
    if not is_transformers_model(model):
        return None
    try:
        return model.get_input_embeddings()
    except NotImplementedError:
        return None


def output_embedding(model: Any) -> nn.Module | None:
    """A transformers model's output embedding (the LM head); None as for `input_embedding`."""
    if not is_transformers_model(model):
        return None
    try:
        return model.get_output_embeddings()
    except NotImplementedError:
        return None


# --------------------------------------------------------------------------- stacks


def stack_blocks(container: nn.Module) -> dict[str, int]:
    """The blocks of `container` by child name -> position, or {} when it is no stack.

    A stack is a ModuleList/Sequential with >= 2 blocks; a block is a child that has children of
    its own and owns parameters (so a Sequential of Linear/GELU leaves is no stack, and neither is
    a trailing ReLU a block).
    """
    from torch import nn

    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return {}
    blocks = {}
    for position, (name, child) in enumerate(container._modules.items()):
        if child is None or next(child.children(), None) is None:
            continue
        if next(child.parameters(), None) is not None:
            blocks[name] = position
    return blocks if len(blocks) >= 2 else {}


def outer_stacks(named: Iterable[tuple[str, nn.Module]]) -> dict[str, dict[str, int]]:
    """Stack path -> its blocks (name -> position), for every stack not inside another stack.

    `named` is `model.named_modules()`, in its pre-order (a parent before its children); the root
    itself may be a stack (path ""). A stack inside a block belongs to that block's layer, which is
    why only the outermost ones count.
    """
    stacks: dict[str, dict[str, int]] = {}
    for path, module in named:
        if any(s == "" or path.startswith(s + ".") for s in stacks):
            continue
        blocks = stack_blocks(module)
        if blocks:
            stacks[path] = blocks
    return stacks
