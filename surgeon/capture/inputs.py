"""Example inputs: the user's (any nesting of tensors), or synthesized from a model's config.

Capture needs one call of the model to trace. Hugging Face models say what they take in their
forward signature (`input_ids`, `pixel_values`, `input_values`, `bbox`, `encoder_hidden_states`)
and how big it is in their config (vocabulary, image size, mel bins, hidden size), so inputs can
be made up without the user's help (surgeon.capture.synthesize). Values never matter: capture
runs on the meta device, where tensors have shapes and no data.

User inputs may nest tensors in tuples, lists, dicts and dataclasses (a detection model takes a
list of images, a sentence-transformers model a dict of features): the export wrapper takes the
tensor leaves positionally and rebuilds the structure around them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ExampleInputs:
    """One forward call: positional values, keyword values, constant keyword options.

    Values are tensors or tuples/lists/dicts/dataclasses holding tensors (and constants).
    """

    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # non-tensor keywords passed as they are

    def flat(self) -> tuple[torch.Tensor, ...]:
        """Every tensor leaf, positional first: what the export wrapper takes."""
        return tuple(t for _, t in self._leaves())

    def names(self) -> tuple[str, ...]:
        """How each tensor of `flat()` is reached: `args[0]`, `input_ids`, `args[0]['mask']`."""
        return tuple(name for name, _ in self._leaves())

    def split(self, flat: tuple[torch.Tensor, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """`flat` back into (args, kwargs) for calling the model, options included."""
        leaves = iter(flat)
        args = tuple(_rebuild(a, leaves) for a in self.args)
        kwargs = {k: _rebuild(v, leaves) for k, v in self.kwargs}
        return args, {**kwargs, **dict(self.options)}

    def to(self, device: torch.device | str) -> ExampleInputs:
        """The same inputs with every tensor an empty one on `device` (shapes and dtypes kept)."""
        leaves = iter(_empty_like(t, device) for t in self.flat())
        args = tuple(_rebuild(a, leaves) for a in self.args)
        kwargs = tuple((k, _rebuild(v, leaves)) for k, v in self.kwargs)
        return ExampleInputs(args, kwargs, self.options)

    def _leaves(self) -> list[tuple[str, torch.Tensor]]:
        found: list[tuple[str, torch.Tensor]] = []
        for i, value in enumerate(self.args):
            _collect(value, f"args[{i}]", found)
        for key, value in self.kwargs:
            _collect(value, key, found)
        return found


def from_user(model: nn.Module, example_inputs: Any) -> ExampleInputs:
    """The user's example inputs as `ExampleInputs`.

    A tensor is the one positional input; a tuple or list is the positional inputs; a dict is
    keyword inputs, unless the forward takes none of its keys and one positional argument (a
    sentence-transformers model takes its features as one dict).
    """
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs
    if isinstance(example_inputs, Mapping):
        params = forward_parameters(model)
        if not any(k in params for k in example_inputs) and _positional_count(model) == 1:
            return ExampleInputs((dict(example_inputs),))
        tensors = {k: v for k, v in example_inputs.items() if _holds_tensor(v)}
        options = tuple((k, v) for k, v in example_inputs.items() if k not in tensors)
        return ExampleInputs((), tuple(tensors.items()), options)
    if isinstance(example_inputs, tuple | list):
        return ExampleInputs(tuple(example_inputs))
    return ExampleInputs((example_inputs,))


def forward_parameters(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's forward parameters, in order."""
    try:
        return tuple(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return ()


def _positional_count(model: nn.Module) -> int:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds)


def _holds_tensor(value: Any) -> bool:
    found: list[tuple[str, torch.Tensor]] = []
    _collect(value, "", found)
    return bool(found)


def _collect(value: Any, name: str, found: list[tuple[str, torch.Tensor]]) -> None:
    """Tensor leaves of `value` with the path that reaches each, in a fixed order."""
    if isinstance(value, torch.Tensor):
        found.append((name, value))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _collect(item, f"{name}[{key!r}]", found)
    elif isinstance(value, tuple | list):
        for i, item in enumerate(value):
            _collect(item, f"{name}[{i}]", found)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in (f for f in dataclasses.fields(value) if f.init):
            _collect(getattr(value, field.name), f"{name}.{field.name}", found)


def _rebuild(value: Any, leaves: Any) -> Any:
    """`value` with each tensor leaf replaced by the next of `leaves` (same order as _collect)."""
    if isinstance(value, torch.Tensor):
        return next(leaves)
    if isinstance(value, Mapping):
        return type(value)((k, _rebuild(v, leaves)) for k, v in value.items()) \
            if type(value) is not dict else {k: _rebuild(v, leaves) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_rebuild(v, leaves) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_rebuild(v, leaves) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _rebuild(getattr(value, f.name), leaves) for f in dataclasses.fields(value)
                   if f.init}
        return dataclasses.replace(value, **changes)
    return value


def _empty_like(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
