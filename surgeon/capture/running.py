"""Capture by running: the forward executed once on real values, every op it ran recorded.

The last front end `surgeon.capture.graph` tries, for the forwards export refuses even on real
values (a loop over `cu_seqlens.tolist()`, a `.item()` that sizes a tensor, sizes export's
symbolic shapes cannot settle). `make_fx(tracing_mode="real", pre_dispatch=True)` runs the model
as eager PyTorch would, so every Python branch is decided by the values themselves, and keeps
the ops at export's level (`aten.linear`, `aten.conv2d` stay single ops) with the same
`nn_module_stack` metadata. Parameters enter through `torch.func.functional_call` as graph
inputs, which are then turned into `get_attr` nodes named by their module paths: the graph reads
exactly as an exported one does (surgeon.capture.flow).

What it records is the forward as run on these inputs, as any capture is (export specializes
shapes too): modules the call never reached (MoE experts no token was routed to) stay
"never reached", uncertain, in surgeon.capture.infer. A float activation that leaves torch
(`.numpy()`, `.tolist()`, `.item()`) would come back as a constant, cutting the dataflow the
roles are read from: such a run is refused (`ValuesLeftTheTrace`), never guessed from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn


def trace_by_running(root: nn.Module, tensors: Sequence[torch.Tensor]) -> fx.GraphModule:
    """The graph of `root(*tensors)` as it runs, its parameters and buffers as `get_attr` nodes
    named by their paths in `root` (tied tensors by their first name).

    Args:
        root: the module to run (real weights, never meta: the values decide branches).
        tensors: its positional inputs, real values.
    Returns:
        A GraphModule whose placeholders are `tensors` in order, whose nodes carry
        `nn_module_stack` (module paths as in `root.named_modules()`) and `val` metadata.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    weights = {**dict(root.named_parameters()), **dict(root.named_buffers())}
    names = list(weights)

    def run(values: list[torch.Tensor], inputs: list[torch.Tensor]) -> object:
        return torch.func.functional_call(root, dict(zip(names, values, strict=True)), tuple(inputs))

    run._orig_mod = root  # type: ignore[attr-defined]  # where make_fx reads module paths from
    cuda = sorted({t.device.index or 0 for t in weights.values() if t.device.type == "cuda"})
    watch = _Escapes()
    with torch.random.fork_rng(devices=cuda), watch:  # the caller's RNG is left as it was
        traced = make_fx(run, tracing_mode="real", pre_dispatch=True, record_module_stack=True,
                         _error_on_data_dependent_ops=False)(list(weights.values()), list(tensors))
    _weights_as_attributes(traced, root, names)
    why = watch.found or _float_read_into_python(traced)
    if why:
        raise ValuesLeftTheTrace(f"{why}: what the forward computes from it is cut from the recorded "
                                 "dataflow, so roles read from it could be wrong")
    return traced


class ValuesLeftTheTrace(RuntimeError):
    """Activations left torch during the run (a NumPy round trip, a float `.item()`): the recorded
    graph would show the ops after it reading constants, not data, so it is refused."""


class _Escapes(torch.overrides.TorchFunctionMode):
    """Notes a float activation (a tensor computed from a model input) taken out of torch by
    `.numpy()` or `.tolist()`. Integer ones are sizes and indices, the values that decide
    branches (which is the point); floats computed from weights alone are constants anyway."""

    found = ""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in ("numpy", "tolist", "__array__") and not self.found and args \
                and isinstance(args[0], torch.Tensor) and (args[0].is_floating_point() or args[0].is_complex()) \
                and _from_inputs(_node_of(args[0])):
            self.found = f"the forward takes a float activation out of torch (`.{name}()`)"
        return func(*args, **(kwargs or {}))


def _node_of(tensor: torch.Tensor) -> fx.Node | None:
    """The graph node the running trace records `tensor` as (None: not traced)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

    mode = get_proxy_mode()
    slot = get_proxy_slot(tensor, mode.tracer, None) if mode is not None else None
    return getattr(getattr(slot, "proxy", None), "node", None)


def _from_inputs(node: fx.Node | None) -> bool:
    """Whether `node` depends on a model input (the trace's `inputs` placeholders)."""
    seen, stack = set(), [node] if node is not None else []
    while stack:
        current = stack.pop()
        if current.op == "placeholder" and current.name.startswith("inputs"):
            return True
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


def _float_read_into_python(traced: fx.GraphModule) -> str:
    """A float activation (one that depends on a model input) read into a Python number."""
    from_inputs: set[fx.Node] = set()
    for node in traced.graph.nodes:  # weights are get_attr by now: placeholders are the inputs
        if node.op == "placeholder" or any(a in from_inputs for a in node.all_input_nodes):
            from_inputs.add(node)
        packet = getattr(node.target, "_overloadpacket", None)
        if getattr(packet, "__name__", "") in ("item", "_local_scalar_dense") \
                and node.all_input_nodes and node.all_input_nodes[0] in from_inputs:
            value = node.all_input_nodes[0].meta.get("val")
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return "the forward reads a float activation into a Python number (`.item()`)"
    return ""


def _weights_as_attributes(traced: fx.GraphModule, root: nn.Module, names: list[str]) -> None:
    """Replace the placeholder of each weight (the first `len(names)`) by a `get_attr` of its
    path, with `root`'s submodules attached to `traced` so the paths resolve."""
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) < len(names):
        raise RuntimeError(f"the traced graph has {len(placeholders)} inputs, fewer than the "
                           f"{len(names)} weights passed in")
    for child, module in root.named_children():
        if hasattr(traced, child):
            raise RuntimeError(f"submodule `{child}` clashes with an attribute of the traced graph")
        traced.add_submodule(child, module)
    for name, tensor in list(root.named_parameters(recurse=False)) + list(root.named_buffers(recurse=False)):
        traced.register_buffer(name, tensor.detach())
    first_op = next(n for n in graph.nodes if n.op != "placeholder")  # the output, at least
    for node, name in zip(placeholders, names):
        with graph.inserting_before(first_op):
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    graph.lint()
    traced.recompile()
