"""Input shapes as a transformers forward's docstring gives them.

transformers documents every input of a forward as ``name (`type` of shape `(dims)`)``, its
dimensions named after config keys (`config.block_size`, `num_codebooks`) or counts
(`batch_size`, `num_patches`, `hidden_size * len(vision_feature_layer)`). Where a config does not
say how an input is laid out (a tower taking flattened patches, Dia's codebook ids) or no maker
knows the input at all (Molmo 2's pooling indices), that line does. The forward run that follows
is the check: a wrong reading fails there and the next candidate is tried.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

GUESS = 2  # a count the docstring names and no config sizes (crops, previous tokens, pool rows)


def documented_dims(model: nn.Module, name: str) -> list[str] | None:
    """The documented dimensions of `name`, as written (`['batch_size', 'config.block_size', 'dim']`)."""
    found = re.search(rf"^\s*{re.escape(name)} \(`[^`]*` of shape `([^`]*)`", model.forward.__doc__ or "",
                      re.MULTILINE)
    if found is None:
        return None
    # `(batch_size * num_codebooks, target_sequence_length) or (batch_size, ...)` (Dia): the last,
    # the layout the docstring ends on (Dia's first one reaches a `view` of a transposed tensor)
    text = re.split(r"\)\s+or\s+\(", found.group(1).strip())[-1].strip()
    text = "(" + text if text[-1:] == ")" and text[:1] != "(" else text
    if text[:1] not in "([" or text[-1:] not in ")]":
        return None
    return _split(text[1:-1])


def size_of(config: Any, text: str, known: dict[str, Any], guess: bool = False) -> int | None:
    """One dimension: a product of integers, names in `known`, config keys (`config.x` or `x`)
    and their lengths (`len(config.x)`); an unknown name is GUESS where `guess`, else None."""
    size = 1
    for factor in (f.strip() for f in text.split("*")):
        value = _factor(config, factor, known)
        if value is None and guess and re.fullmatch(r"[a-z_]+", factor):
            value = GUESS
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        size *= value
    return size


def _factor(config: Any, factor: str, known: dict[str, Any]) -> Any:
    if factor.isdigit():
        return int(factor)
    length = re.fullmatch(r"len\((?:config\.)?(\w+)\)", factor)
    if length:
        value = getattr(config, length.group(1), None)
        return len(value) if isinstance(value, list | tuple) else None
    key = factor.removeprefix("config.")
    return known.get(key, getattr(config, key, None))


def _split(text: str) -> list[str]:
    """`text` split at its top-level commas (`a, len(b), c * d` -> three dimensions)."""
    dims, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            dims.append(text[start:i].strip())
            start = i + 1
    dims.append(text[start:].strip())
    return [d for d in dims if d]  # `(num_marks,)`: one dimension


def documented_tensor(model: nn.Module, name: str, known: dict[str, Any], device: Any) -> torch.Tensor | None:
    """Zeros in `name`'s documented shape (long for ids and indices), or None where the docstring
    gives no shape or names a size nothing resolves. Zeros are valid ids and indices."""
    dims = documented_dims(model, name)
    if not dims:
        return None
    config = getattr(model, "config", None)
    sizes = [size_of(config, d, known, guess=True) for d in dims]
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        return None
    line = re.search(rf"^\s*{re.escape(name)} \(`([^`]*)`", model.forward.__doc__ or "", re.MULTILINE)
    integer = "Long" in (line.group(1) if line else "") or name.endswith(("_ids", "_idx", "_index"))
    return torch.zeros(sizes, dtype=torch.long if integer else torch.float32, device=device)
