"""`SavedModule`: PEFT's ModulesToSaveWrapper (`modules_to_save`, e.g. a classifier head).

The original module stays in place and each adapter gets a trainable deep copy. In-memory names
are PEFT's (`original_module.*`, `modules_to_save.<adapter>.*`), so checkpoint keys map as in
PEFT. The active adapter's copy runs, the original when none is active or adapters are
disabled. It implements `surgeon.runtime.wrappers.Wrapper`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import ClassVar

from torch import nn

from surgeon.runtime.rows import run_rows


class SavedModule(nn.Module):
    """The original module and one trainable copy per adapter (see the module docstring)."""

    held_as: ClassVar[str] = "is saved whole by another adapter"

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.adapter_names: Sequence[str] | None = None

    def current(self) -> nn.Module:
        """The module that runs: the active adapter's copy, else the original."""
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        names = self.adapter_names
        if names is None or self.disabled:
            return self.current()(*args, **kwargs)
        saved, original = self.modules_to_save, self.original_module
        return run_rows(args[0], names, lambda name, rows: (saved[name] if name in saved else original)(
            rows, *args[1:], **kwargs))

    # ------------------------------------------------------------------ the wrapper protocol
    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.modules_to_save)

    def adapter_parameters(self, adapter: str) -> Iterator[nn.Parameter]:
        return self.modules_to_save[adapter].parameters()

    def set_active(self, names: Sequence[str], frozen: Collection[str]) -> Callable[[], None]:
        present = [a for a in names if a in self.modules_to_save]
        if len(present) > 1:
            raise ValueError("only one adapter with saved modules can be active at a time, got "
                             f"{present} (PEFT's rule)")
        before, self.active = self.active, present[0] if present else None
        for name, copy_ in self.modules_to_save.items():
            copy_.requires_grad_(name == self.active and name not in frozen)
        return lambda: setattr(self, "active", before)

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled
        if not enabled:
            self.modules_to_save.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def unloaded(self, merged: Sequence[str]) -> nn.Module:
        return self.current()  # PEFT unloads to the active adapter's copy

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or name in ("original_module", "modules_to_save"):
                raise
            # host code reads attributes of the wrapped module (`lm_head.weight`, `out_features`)
            return getattr(self.current(), name)
