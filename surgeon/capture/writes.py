"""In-place writes and pieces of concatenations: two ways data reaches a node that the plain
operand edges of the graph hide or blur.

- `written_bases`: `out[:, i] = x` is a `copy_` into a view of `out`; the later readers of `out`
  read `x` (a chunked attention loop writes each chunk's result into a preallocated buffer).
- `pieces`: `q, k, v = split(conv(cat([q_proj(x), k_proj(x), v_proj(x)])))` (a short
  convolution run over q, k and v at once): each piece reads only the concatenated part it
  takes back apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from surgeon.capture.ops import op_name

_VIEWS = frozenset({"select", "slice", "view", "reshape", "transpose", "permute", "unsqueeze",
                    "squeeze", "as_strided", "alias", "expand", "diagonal", "narrow", "t", "unflatten"})


def written_bases(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """In-place write (`out[:, i] = x`, a `copy_` into a view) -> the tensor it writes into."""
    found: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        name = op_name(node)
        if node.op == "call_function" and name.endswith("_") and not name.startswith("_") \
                and node.args and isinstance(node.args[0], fx.Node):
            found[node] = _view_base(node.args[0])
    return found


def pieces(nodes: list[fx.Node], step_back: Callable[[fx.Node], fx.Node | None]) -> dict[fx.Node, fx.Node]:
    """Piece of a split (or a slice) -> the input of the concatenation it takes back apart, when
    every step between the cat and the split keeps channels apart (`step_back`: the one input of
    such a step - a view, a cast, an activation, a depthwise convolution - else None) and the
    piece's bounds are that part's bounds."""
    found: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        piece = _piece_bounds(node)
        if piece is None:
            continue
        base, dim, start, stop = piece
        cat = _cat_behind(base, step_back)
        if cat is None or _size(base, dim) != _size(cat, _cat_dim(cat)):
            continue
        offset = 0
        for part in cat.args[0]:
            size = _size(part, _cat_dim(cat))
            if size is None:
                break
            if (offset, offset + size) == (start, stop) and isinstance(part, fx.Node):
                found[node] = part
            offset += size
    return found


def _cat_behind(node: fx.Node, step_back: Callable[[fx.Node], fx.Node | None]) -> fx.Node | None:
    """The `cat` that `node` is, through single-input steps that keep channels apart."""
    for _ in range(12):
        if op_name(node) == "cat":
            return node
        previous = step_back(node)
        if previous is None:
            return None
        node = previous
    return None


def _piece_bounds(node: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    """(base, dim, start, stop) of a node taking one contiguous piece of `base` along `dim`:
    `getitem` of a split, or a slice."""
    name = op_name(node)
    if name == "getitem" and isinstance(node.args[0], fx.Node) \
            and op_name(node.args[0]) in ("split_with_sizes", "split", "unsafe_split"):
        split, index = node.args[0], node.args[1]
        base = split.args[0]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        parts = split.meta.get("val")
        if not isinstance(base, fx.Node) or not isinstance(parts, (list, tuple)):
            return None
        sizes = [_size_of(p, dim) for p in parts]
        if not isinstance(index, int) or not 0 <= index < len(sizes) or None in sizes:
            return None
        start = sum(sizes[:index])
        return base, dim, start, start + sizes[index]
    if name == "slice" and len(node.args) >= 4 and isinstance(node.args[0], fx.Node) \
            and all(isinstance(a, int) for a in node.args[1:4]):
        base, dim, start, stop = node.args[:4]
        size = _size(base, dim)
        if size is None:
            return None
        start, stop, _ = slice(start, stop).indices(size)
        return base, dim, start, stop
    return None


def _cat_dim(cat: fx.Node) -> int:
    return cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)


def _size(node: Any, dim: int) -> int | None:
    return _size_of(node.meta.get("val") if isinstance(node, fx.Node) else None, dim)


def _size_of(val: Any, dim: int) -> int | None:
    if not isinstance(val, torch.Tensor) or not -val.dim() <= dim < max(val.dim(), 1):
        return None
    size = val.shape[dim]
    return size if isinstance(size, int) else None


def _view_base(node: fx.Node) -> fx.Node:
    """The tensor `node` is a view of (itself when it is none)."""
    while node.op == "call_function" and op_name(node) in _VIEWS and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node
