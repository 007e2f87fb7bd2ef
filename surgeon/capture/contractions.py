"""Matrix products written by hand: `(q[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)`
is `q @ k.T` weighed by a decay (Kimi delta attention's intra-chunk scores). The graph shows a
`mul` and a `sum`; `contraction` finds the two operands of the product they make, so the flow
can treat that `sum` as a matmul of two activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from surgeon.capture.ops import op_name

_VIEWS = frozenset({"view", "reshape", "unsqueeze", "expand", "transpose", "permute", "t", "to",
                    "_to_copy", "contiguous", "alias", "select", "slice"})


def contraction(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of `sum(a * b * w, dim)` when it is a matrix product written by hand: `a`
    and `b` are broadcast along different axes of the product (an outer product) and both run
    along the summed axis; other factors (`w`, a decay) only weigh it. A sum over two elements is
    a rotation written as a product (PE Audio's RoPE: `(q_ * freqs_cis).sum(5)` with a 2x2
    `freqs_cis`), which q and k pass through on their way to the scores."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    product = node.args[0] if node.args else None
    shape = _shape(product)
    if len(dims) != 1 or not isinstance(dims[0], int) or shape is None or op_name(product) != "mul":
        return None
    axis = dims[0] % len(shape)
    if shape[axis] <= 2:  # a sum of two products is a rotation (RoPE as a 2x2 matrix), no scores
        return None
    outer = []
    for factor in _factors(product):
        spread = _broadcast_axes(_shape(factor), shape)
        if spread is None or axis in spread:
            continue  # not a tensor, or constant along the summed axis: a weight
        if spread:
            outer.append((factor, spread))
    if len(outer) == 2 and outer[0][0] is not outer[1][0] and not outer[0][1] & outer[1][1] \
            and not any(_stored(f) for f, _ in outer):
        return outer[0][0], outer[1][0]
    return None


def _stored(node: fx.Node) -> bool:
    """A parameter or buffer seen through views: `(x[..., None] * weight).sum(-2)` is a linear
    written by hand, not a product of two activations."""
    while node.op == "call_function" and op_name(node) in _VIEWS and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.op == "get_attr"


def _factors(node: fx.Node) -> list[fx.Node]:
    """Tensor factors of a product tree `a * b * c`."""
    if op_name(node) != "mul" or len(node.args) < 2:
        return [node]
    return [f for arg in node.args[:2] if isinstance(arg, fx.Node) for f in _factors(arg)]


def _broadcast_axes(factor: tuple[int, ...] | None, product: tuple[int, ...]) -> set[int] | None:
    """Axes of `product` along which `factor` is broadcast (size 1, or missing on the left)."""
    if factor is None or len(factor) > len(product):
        return None
    padded = (1,) * (len(product) - len(factor)) + factor
    return {i for i, (f, p) in enumerate(zip(padded, product)) if f == 1 and p > 1}


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.shape):
        return None
    return tuple(val.shape)
