"""A member's forward with its shrinks taken out: each fused adapter's `x @ A.T` becomes an input.

The site-scope graph of a LoRA layer (`surgeon.runtime.adapted`) computes, per adapter,
`linear(x, lora_A.<a>.weight)` (on the layer input, or on `x.to(dtype)` when the adapter's dtype
differs from the base's) and then its expand. Here a copy of that graph gets one placeholder
`h_<a>` per fused adapter in place of the shrink; the group (`surgeon.fusion.shared`) computes
every member's `h` with one GEMM over the concatenated `A`s and passes each its slices. Base
call, expand, scaling, casts and epilogue stay the nodes the site scope runs, so the two differ
only in how the shrink GEMM is blocked (float rounding).

An adapter whose shrink reads anything else (its dropout's output, in training) keeps its own
shrink; DoRA's branch fuses like LoRA's (its shrink is the same node). On a GPU the site graph's
fused `kernels.lora_add` node (in a CPU eval graph, `lora_add_`) becomes a shrink-free
`expand_add`. The new placeholders carry the provenance role "shared_shrink" (they are no
mixed-batch "rows").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from surgeon import kernels
from surgeon.kernels import reference
from surgeon.runtime import graph as site_graph
from surgeon.runtime.graph import META, compile_forward, copy_graph, tag

_LINEAR = torch._C._nn.linear


def expand_add(prev: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`prev + scaling * h @ b.T` (the GPU kernel's half of `kernels.lora_add`)."""
    if kernels.usable(prev, h, b):
        from surgeon.kernels import lora

        return lora.expand_add(prev, h, b, scaling)
    return reference.expand_add(prev, h, b, scaling)


# Whole-branch calls `(prev, x, A, B, scaling)` -> their shrink-free half `(prev, h, B, scaling)`:
# the GPU kernel's, and the CPU eval graph's in-place one (`surgeon.runtime.graph.lora_add_`).
_WHOLE_BRANCH = {kernels.lora_add: expand_add, site_graph.lora_add_: site_graph.expand_add_}


def _reads_input(node: object, x: fx.Node) -> bool:
    """`node` is the layer input, or a cast of it (PEFT's `x.to(lora_A.dtype)`)."""
    if node is x:
        return True
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to"
            and node.args[0] is x and len(node.args) == 2 and not node.kwargs)


def _shrink_of(node: fx.Node, x: fx.Node) -> tuple[str, fx.Node] | None:
    """`(adapter, the A get_attr)` when `node` is a shrink (or fused LoRA call) on the input."""
    adapter = tag(node).get("adapter")
    if node.op != "call_function" or adapter is None:
        return None
    if node.target is _LINEAR and len(node.args) == 2:
        source, weight = node.args
    elif node.target in _WHOLE_BRANCH:
        source, weight = node.args[1], node.args[2]
    else:
        return None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"
            and weight.target == f"lora_A.{adapter}.weight" and _reads_input(source, x)):
        return None
    return adapter, weight


def shrinks(graph: fx.Graph) -> list[str]:
    """The adapters of `graph` whose shrink reads the layer input, in graph order."""
    x = next(n for n in graph.nodes if n.op == "placeholder")
    found = (_shrink_of(n, x) for n in graph.nodes)
    return [s[0] for s in found if s is not None]


def without_shrinks(graph: fx.Graph, layer: object, adapters: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    """`run(layer, x, h_a, h_b, ...)`: `graph` with the shrinks of `adapters` read from inputs."""
    new = copy_graph(graph)
    x = next(n for n in new.nodes if n.op == "placeholder")
    inputs: dict[str, fx.Node] = {}
    anchor = x
    for adapter in adapters:
        with new.inserting_after(anchor):
            anchor = inputs[adapter] = new.placeholder(f"h_{adapter}")
        anchor.meta[META] = {"rule": "", "pass": "fuse-shrinks", "adapter": adapter,
                              "role": "shared_shrink"}
    for node in list(new.nodes):
        found = _shrink_of(node, x)
        if found is None or found[0] not in inputs:
            continue
        h = inputs[found[0]]
        if node.target is _LINEAR:
            node.replace_all_uses_with(h)
        else:  # lora_add(prev, x, A, B, scaling) -> expand_add(prev, h, B, scaling)
            prev, _, _, b, scaling = node.args
            with new.inserting_before(node):
                fused = new.call_function(_WHOLE_BRANCH[node.target], (prev, h, b, scaling))
            fused.meta[META] = dict(node.meta[META])
            node.replace_all_uses_with(fused)
        new.erase_node(node)
    new.eliminate_dead_code()
    new.lint()
    return compile_forward(new, layer)
