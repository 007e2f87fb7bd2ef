"""Layer indices: which repeated block ("layer") of which stack each module sits in.

Two ways to number layers, because a spec can say `layers[0:4]` (structure) or
`layers[0:4] of "h"` (PEFT's `layers_pattern`):

- Structure (no pattern): a module's layer is the position of its block in the outermost stack
  on its path (`surgeon.layer_kinds.outer_stacks`: a ModuleList/Sequential holding >= 2 non-leaf
  children owning parameters); the container's path names the stack ("model.layers",
  "encoder.block", ...). No names are consulted, so it works on T5, Q-Formers and hybrid stacks
  alike (shared/notes/capture-and-roles.md, "Layer indices without names"). As with a pattern,
  the block module itself is not *inside* its layer; its submodules are.
- Pattern: PEFT 0.21's exact rule (`check_target_module_exists`): the first pattern for which
  `(?:^|.*?\\.)PATTERN\\.(\\d+)\\.` matches the path gives the index (the first numbered segment
  after the pattern, so a block itself, which has no trailing segment, has no index).

Slices and negative indices resolve per stack against its length (1 + its largest index).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgeon.lang.spec import Layers, LayerSlice
from surgeon.layer_kinds import outer_stacks

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True, slots=True)
class LayerIndex:
    """Where a module sits: the stack container's path and the block's position in it."""

    stack: str  # path of the container holding the repeated blocks ("" for a root Sequential)
    index: int  # position of the block in that container


@dataclass(frozen=True, slots=True)
class LayerMap:
    """Each indexed module's layer and each stack's length (1 + largest block position)."""

    of: Mapping[str, LayerIndex]  # module path -> its layer; modules outside stacks are absent
    sizes: Mapping[str, int]  # stack path -> number of layers, for slices and negative indices

    def select(self, layers: Layers) -> frozenset[str]:
        """The paths whose layer index is one of `layers.items` in their stack."""
        wanted = {stack: resolve_items(layers.items, size) for stack, size in self.sizes.items()}
        return frozenset(p for p, at in self.of.items() if at.index in wanted[at.stack])


def resolve_items(items: Sequence[int | LayerSlice], size: int) -> frozenset[int]:
    """Python indexing over `range(size)`: ints (negative from the end) and slices, unioned.

    A positive int is kept even past `size` (it then matches nothing), as PEFT compares
    `layers_to_transform` entries by equality.
    """
    out: set[int] = set()
    for item in items:
        if isinstance(item, LayerSlice):
            out.update(range(size)[slice(item.start, item.stop, item.step)])
        else:
            out.add(item + size if item < 0 else item)
    return frozenset(out)


def structural_layers(named: Iterable[tuple[str, nn.Module]]) -> LayerMap:
    """Layer indices from the module tree alone (see module docstring).

    `named` is `model.named_modules()` (pre-order, so a parent comes before its children). A
    stack's size counts the blocks listed in `named`, so a block seen earlier under another name
    (a shared module) is indexed there, not here.
    """
    named = list(named)
    stacks = outer_stacks(named)
    of: dict[str, LayerIndex] = {}
    blocks: dict[str, LayerIndex] = {}  # block path -> its layer (the block is not inside itself)
    sizes: dict[str, int] = {}
    for path, _ in named:
        if not path:
            continue
        parent, _, name = path.rpartition(".")
        if name in stacks.get(parent, ()):
            at = blocks[path] = LayerIndex(parent, stacks[parent][name])
            sizes[parent] = max(sizes.get(parent, 0), at.index + 1)
        elif (at := of.get(parent) or blocks.get(parent)) is not None:
            of[path] = at
    return LayerMap(of, sizes)


def pattern_layers(paths: Iterable[str], patterns: Sequence[str]) -> LayerMap:
    """Layer indices with PEFT's `layers_pattern` semantics (first matching pattern wins).

    The stack is the path up to the pattern's segment, e.g. "transformer.h" for pattern "h".
    """
    regexes = [re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns]
    of: dict[str, LayerIndex] = {}
    sizes: dict[str, int] = {}
    for path in paths:
        for regex in regexes:
            match = regex.match(path)
            if match is not None:
                at = LayerIndex(path[: match.start("idx") - 1], int(match["idx"]))
                of[path] = at
                sizes[at.stack] = max(sizes.get(at.stack, 0), at.index + 1)
                break
    return LayerMap(of, sizes)
