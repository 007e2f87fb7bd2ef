"""Capture: a model's dataflow as a torch.fx graph, without touching its weights.

`torch.export.export(strict=False)` is the front end (transformers 5 models do not
`symbolic_trace`); `torch.fx.symbolic_trace` is the fallback for plain modules. Capture always
works on a copy of the model on the meta device, so it allocates no weight memory and never
changes the user's model. The one exception: where export on meta fails (shapes read from input
values: an image grid's `.tolist()`, a length's `.item()`; the meta device has no values, and
some forwards trip over meta or fake tensors in other ways), a model of up to `REAL_COPY_BYTES`
is exported again from a real copy with real inputs by `torch.export.draft_export`, which settles
those branches by the values, then by plain non-strict export where draft export itself fails,
and last by running the forward once and recording every op it ran (surgeon.capture.running),
where export's symbolic shapes cannot settle a branch even with values to go by.

Repeated blocks (the `layers` of a transformer) are captured once per distinct structure: every
other block of the same structure is short-circuited during the trace (its forward returns its
input hidden states), so a 32-layer model costs about as much as a one-layer one. The graph keeps
the representative blocks in their real context (encoder output, embeddings, head), and
`Capture.stand_ins` says which block stands for which.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from surgeon.capture.inputs import ExampleInputs, from_user
from surgeon.capture.running import trace_by_running
from surgeon.capture.synthesize import input_candidates, missing_inputs
from surgeon.errors import UserError
from surgeon.layer_kinds import outer_stacks

# Attribute under which the export wrapper holds the model; graph module paths start with it.
WRAPPED = "m"
_SUGGESTION = ("Select layers by name (\"q_proj\", /regex/) or by type (Linear) instead of by "
               "role; those selectors need no graph.")
# Why roles read from a symbolic trace are never trusted: it sees no shapes or dtypes, so integer
# indices look like data, and it follows Python control flow only for the default branch.
TRACED_CAVEAT = ("captured by symbolic tracing, a fallback that sees no shapes or dtypes (dataflow "
                 "edges are guessed)")
# A model this small may be copied with its weights when export needs real values (below).
REAL_COPY_BYTES = 2 << 30
INPUT_HINT = ("pass example inputs (`--input 1x3x224x224:float32`, or `example_inputs=` in Python), "
              "or select these layers by name or type")


class CaptureError(UserError, RuntimeError):
    """The model's dataflow could not be captured; the message says why and what to do instead."""


@dataclass(frozen=True)
class Capture:
    """A captured graph and how its module paths relate to the model's."""

    graph: torch.fx.GraphModule
    prefix: str  # prefix of module paths in node meta / get_attr targets ("m." under the wrapper)
    frontend: str  # "export(-blocks)", "draft-"/"real-export(-blocks)", "run(-blocks)", "symbolic_trace"
    stand_ins: Mapping[str, str]  # short-circuited block path -> path of the block captured for it
    model: nn.Module  # the meta copy that was traced (paths in the graph resolve against it)
    inputs: tuple[str, ...] = ()  # the model's name for each graph placeholder, in order
    caveat: str = ""  # why roles from this graph cannot be trusted ("" when they can)


class _Wrapper(nn.Module):
    """Positional tensors in, a flat tuple of floating-point output tensors out."""

    def __init__(self, model: nn.Module, inputs: ExampleInputs) -> None:
        super().__init__()
        self.m = model
        self.inputs = inputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.inputs.split(tensors)
        out = self.m(*args, **kwargs)
        leaves = pytree.tree_leaves(out)
        return tuple(t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())


def capture_graph(model: nn.Module, example_inputs: Any = None) -> torch.fx.GraphModule:
    """The whole model as one fx graph (every block traced), on the meta device.

    Args:
        model: any `nn.Module`; transformers models need no inputs.
        example_inputs: a tensor, a tuple of positional tensors, a dict of keyword tensors or an
            `ExampleInputs`; None synthesizes them from a transformers config.
    Returns:
        The exported (or symbolically traced) GraphModule. Module paths in `nn_module_stack`
        and `get_attr` targets of an exported graph start with "m." (the export wrapper).
    Example:
        >>> gm = capture_graph(AutoModelForCausalLM.from_config(cfg))
    """
    return capture(model, example_inputs, blocks=False).graph


def capture(model: nn.Module, example_inputs: Any = None, *, blocks: bool = True) -> Capture:
    """Capture `model`, short-circuiting repeated blocks when `blocks` is set.

    Tries, in order: export with stand-ins for repeated blocks, export of the whole model (each
    with every candidate call, most complete first), the same on a real copy with real inputs
    when those failed, then the forward run and recorded (`_capture_with_values`), `symbolic_trace` (its
    capture carries a caveat: roles read from it are uncertain). Raises `CaptureError` with every front end's
    reason when none works.
    """
    candidates = _candidates(model, example_inputs)
    reasons: list[str] = []
    if not candidates:
        reasons.append(f"export: {_no_inputs(model)}")
    attempts = ((True, "export-blocks"), (False, "export")) if blocks else ((False, "export"),)
    for use_blocks, frontend in attempts:
        for inputs in candidates:
            try:
                return _export(meta_copy(model).eval(), inputs, use_blocks, frontend)
            except Exception as error:  # noqa: BLE001 - any tracing failure moves to the next try
                reasons.append(f"{frontend}: {_first_line(error)}")
    found = _capture_with_values(model, example_inputs, attempts, reasons)
    if found is not None:
        return found
    try:
        meta = meta_copy(model).eval()
        return Capture(torch.fx.symbolic_trace(meta), "", "symbolic_trace", {}, meta,
                       caveat=f"{TRACED_CAVEAT}; {reasons[-1]}")
    except Exception as error:  # noqa: BLE001
        reasons.append(f"symbolic_trace: {_first_line(error)}")
    raise CaptureError(
        f"Could not capture the dataflow of `{type(model).__name__}`: " + "; ".join(_unique(reasons))
        + f". {_SUGGESTION}"
    )


def _capture_with_values(model: nn.Module, example_inputs: Any, attempts: Any,
                         reasons: list[str]) -> Capture | None:
    """Export a real copy on real inputs with `torch.export.draft_export`, which settles branches
    on input values (sizes read from an image grid, a `.item()`) by the values themselves; on the
    meta device there are no values, so export refuses them. Only for models small enough to copy
    (`REAL_COPY_BYTES`); the graph is the one these inputs take, as any capture's is."""
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or any(t.is_meta for t in tensors):
        return None
    size = sum(t.numel() * t.element_size() for t in tensors)
    if size > REAL_COPY_BYTES:
        reasons.append(f"draft-export: not tried: export on the meta device failed, retrying on "
                       f"input values needs a real copy, and it holds {size / 2**30:.1f} GiB (the limit is "
                       f"{REAL_COPY_BYTES / 2**30:.0f} GiB); {INPUT_HINT}")
        return None
    if example_inputs is None:
        candidates = input_candidates(model, tensors[0].device)
    else:  # the user's values (`.to()` would keep only shapes), copied: the forward runs on them
        candidates = [_copied(from_user(model, example_inputs))]
    for use_blocks, frontend in attempts:
        for inputs in candidates:
            for mode in ("draft", "real"):  # draft export itself fails on some unbacked sizes
                try:
                    copied = copy.deepcopy(model).eval()
                    return _export(copied, inputs, use_blocks, f"{mode}-{frontend}", mode=mode)
                except Exception as error:  # noqa: BLE001 - as above
                    reasons.append(f"{mode}-{frontend}: {_first_line(error)}")
    for use_blocks, frontend in attempts:  # the last resort: record the forward as it runs
        name = frontend.replace("export", "run")
        for inputs in candidates:
            try:
                return _run(copy.deepcopy(model).eval(), inputs, use_blocks, name)
            except Exception as error:  # noqa: BLE001 - as above
                reasons.append(f"{name}: {_first_line(error)}")
    return None


def _run(model: nn.Module, inputs: ExampleInputs, use_blocks: bool, frontend: str) -> Capture:
    """Capture `model` (a real copy) by running it once on `inputs` and recording every op
    (surgeon.capture.running): Python branches on values (`.tolist()` loops, `.item()` sizes)
    are settled by the values, where export's symbolic shapes give up."""
    stand_ins = _install_stand_ins(model) if use_blocks else {}
    if use_blocks and not stand_ins:
        raise CaptureError("no repeated blocks to short-circuit")
    with _quiet(), torch.no_grad():
        graph = trace_by_running(_Wrapper(model, inputs), inputs.flat())
    return Capture(graph, WRAPPED + ".", frontend, stand_ins, model, inputs.names())


def _copied(inputs: ExampleInputs) -> ExampleInputs:
    args, kwargs = inputs.split(tuple(t.clone() for t in inputs.flat()))
    options = dict(inputs.options)
    return ExampleInputs(args, tuple((k, v) for k, v in kwargs.items() if k not in options), inputs.options)


def _candidates(model: nn.Module, example_inputs: Any) -> list[ExampleInputs]:
    """The calls to try, on the meta device: the user's, else those synthesized from the config."""
    if example_inputs is None:
        return input_candidates(model, "meta")
    try:
        return [from_user(model, example_inputs).to("meta")]
    except Exception as error:  # noqa: BLE001 - malformed user inputs: say so, do not crash
        raise CaptureError(f"Cannot use the example inputs given for `{type(model).__name__}`: "
                           f"{_first_line(error)}") from None


def _no_inputs(model: nn.Module) -> str:
    missing = missing_inputs(model) if getattr(model, "config", None) is not None else ()
    if missing:
        return (f"cannot make the required input(s) {', '.join(f'`{m}`' for m in missing)}; "
                + INPUT_HINT)
    return f"no example inputs ({INPUT_HINT})"


def _unique(reasons: list[str]) -> list[str]:
    return list(dict.fromkeys(reasons))


def as_example_inputs(model: nn.Module, example_inputs: Any) -> ExampleInputs | None:
    """The user's inputs in one shape, moved to the meta device; synthesized when None."""
    found = _candidates(model, example_inputs)
    return found[0] if found else None


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are empty meta tensors.

    The deepcopy memo maps every tensor to its meta twin before copying, so no weight is ever
    duplicated in memory and tied weights stay tied. Each capture attempt takes a fresh copy
    (in eval mode: inference dataflow, no train-only sampling) because stand-ins change it.
    """
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in memo:
            continue
        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if isinstance(tensor, nn.Parameter):
            empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = empty
    copied = copy.deepcopy(model, memo)
    if "bitsandbytes" in sys.modules:  # quantised layers trace as their float twins
        from surgeon.runtime.quantized import float_stand_ins

        float_stand_ins(copied)
    return copied


def _export(meta: nn.Module, inputs: ExampleInputs, use_blocks: bool, frontend: str,
            mode: str = "meta") -> Capture:
    """Export `meta` on `inputs`: on the meta device ("meta"), or a real copy on real values by
    `torch.export.draft_export` ("draft") or by plain non-strict export ("real")."""
    stand_ins = _install_stand_ins(meta) if use_blocks else {}
    if use_blocks and not stand_ins:
        raise CaptureError("no repeated blocks to short-circuit")
    # no_grad: no grad-mode HOPs in the graph; meta: tensors the forward creates meet the weights.
    export = torch.export.draft_export if mode == "draft" else torch.export.export
    device = torch.device("meta") if mode == "meta" else contextlib.nullcontext()
    with _quiet(), torch.no_grad(), device:
        program = export(_Wrapper(meta, inputs), inputs.flat(), strict=False)
    return Capture(program.module(), WRAPPED + ".", frontend, stand_ins, meta, inputs.names())


@contextlib.contextmanager
def _quiet() -> Any:
    """An attempt that fails logs tracebacks and prints the partial program to stderr; its reason
    is kept instead, so both are silenced for the attempt and restored after."""
    loggers = [logging.getLogger(name) for name in _NOISY]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


_NOISY = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes", "torch.export",
          "torch._export", "torch._export.non_strict_utils", "torch._dynamo", "torch.fx.passes")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# ---- repeated blocks -------------------------------------------------------------------------

def repeated_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Representative block path -> its siblings of identical structure, for every block stack.

    Stacks and their blocks are `surgeon.layer_kinds.outer_stacks`, the definition layer indices
    use too, so a block stands in for exactly the blocks that share its layer numbering.
    """
    groups: dict[str, list[str]] = {}
    for path, blocks in outer_stacks(model.named_modules()).items():
        container = model.get_submodule(path)
        seen: dict[tuple, str] = {}
        for name in blocks:
            child_path = f"{path}.{name}" if path else name
            rep = seen.setdefault(_structure(container.get_submodule(name)), child_path)
            groups.setdefault(rep, [])
            if rep != child_path:
                groups[rep].append(child_path)
    return {rep: sibs for rep, sibs in groups.items() if sibs}


def _structure(block: nn.Module) -> tuple:
    """What must match for one block's roles to hold for another: types, paths, shapes."""
    return tuple(
        (path, type(module).__qualname__,
         tuple((name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False)))
        for path, module in block.named_modules()
    )


def _install_stand_ins(meta: nn.Module) -> dict[str, str]:
    """Replace every sibling block of the meta copy by a stand-in; return sibling -> representative."""
    outputs: dict[str, Any] = {}
    stand_ins: dict[str, str] = {}
    for rep, siblings in repeated_blocks(meta).items():
        meta.get_submodule(rep).register_forward_hook(functools.partial(_record, outputs, rep))
        for sibling in siblings:
            parent, _, name = sibling.rpartition(".")
            block = meta.get_submodule(sibling)
            setattr(meta.get_submodule(parent), name, _StandIn(block, functools.partial(_pass_through, outputs, rep)))
            stand_ins[sibling] = rep
    return stand_ins


class _StandIn(nn.Module):
    """Takes a sibling block's place in the meta copy during capture.

    It owns no parameters, so the sibling's weights never enter the exported program (lifting
    them is what makes a 32-layer export slow); attribute reads the model's forward makes on its
    layers (`layer.attention_type`) still reach the block it replaces.
    """

    def __init__(self, block: nn.Module, forward: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # unregistered on purpose
        object.__setattr__(self, "_forward", forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return object.__getattribute__(self, "_forward")(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_block"), name)


def _record(outputs: dict[str, Any], rep: str, module: nn.Module, args: Any, output: Any) -> None:
    outputs[rep] = output


def _pass_through(outputs: dict[str, Any], rep: str, *args: Any, **kwargs: Any) -> Any:
    """A sibling's stand-in: the representative's output with the hidden states passed through."""
    if rep not in outputs:
        raise CaptureError(f"block `{rep}` did not run before the blocks it stands for")
    candidates = (kwargs.get("hidden_states"), *args, *kwargs.values())
    hidden = next(t for t in candidates if isinstance(t, torch.Tensor) and t.is_floating_point())
    leaves, spec = pytree.tree_flatten(outputs[rep])
    index = next((i for i, t in enumerate(leaves)
                  if isinstance(t, torch.Tensor) and t.shape == hidden.shape), None)
    if index is None:
        raise CaptureError(f"block `{rep}` returns no tensor shaped like its hidden states")
    leaves[index] = hidden
    return pytree.tree_unflatten(leaves, spec)
