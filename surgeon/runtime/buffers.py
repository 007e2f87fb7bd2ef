"""`BufferDict`: one tensor per adapter as a buffer (PEFT's `BufferDict`), for method containers.

Buffers move and cast with the layer and are never trained. `persistent` decides whether they
are in `state_dict()` (and so in the checkpoint): DeLoRA's weight norms are, SHiRA's and
WaveFT's indices, OSF's frozen SVD parts and unsaved VeRA projections are not. A method's
container type is built with no arguments (`surgeon.runtime.method`), so a subclass states its
default as the class attribute.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class BufferDict(nn.Module):
    """Adapter name -> tensor, registered as buffers (persistent per `persistent`)."""

    persistent: bool = False

    def __init__(self, persistent: bool | None = None) -> None:
        super().__init__()
        if persistent is not None:
            self.persistent = persistent

    def __contains__(self, adapter: str) -> bool:
        return adapter in self._buffers

    def __getitem__(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]

    def __setitem__(self, adapter: str, tensor: torch.Tensor) -> None:
        self.register_buffer(adapter, tensor, persistent=self.persistent)

    def __delitem__(self, adapter: str) -> None:
        del self._buffers[adapter]
        self._non_persistent_buffers_set.discard(adapter)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)
