"""The short name of a graph node's op, for both graph flavours (a leaf: every capture module
reads it)."""

from __future__ import annotations

import operator

from torch import fx


def op_name(node: fx.Node) -> str:
    """The op's short name: "linear" for aten.linear.default, torch.matmul, or Tensor.matmul."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))
