"""Precision rules of the runtime that PEFT keeps by default: adapter weights in fp32 on
half-precision bases (`autocast_adapter_dtype`), and warnings when a merge would change a weight
shared with another module (a tied lm_head and embedding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgeon.runtime.base_kinds import layer_weight
from surgeon.runtime.state import unwrap
from surgeon.runtime.wrappers import adapted_layers

HALF = (torch.float16, torch.bfloat16)


@torch.no_grad()
def autocast_adapters(host: nn.Module, names: Sequence[str]) -> None:
    """PEFT's default `autocast_adapter_dtype=True`: adapter weights created on a fp16/bf16 base
    are kept in fp32 (training them in half precision loses updates). The forward casts the
    input to the adapter's dtype and the output back, as PEFT's layers do."""
    for _, layer in adapted_layers(host):
        if not getattr(layer.method, "autocast_adapters", True):  # optional part, method.py
            continue
        changed = False
        for table in layer.modules():
            if not isinstance(table, (nn.ModuleDict, nn.ParameterDict)):
                continue
            for name in (n for n in names if n in table):
                entry = table[name]
                params = [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
                for param in (p for p in params if p.dtype in HALF):
                    param.data = param.data.float()  # the same Parameter: optimizers keep it
                    changed = True
        if changed:
            layer.relower()


def warn_if_tied(model: nn.Module, layers) -> None:
    """Warn, as PEFT does, when a layer about to be merged shares its weight with another module
    (a tied lm_head and input embedding): the merge changes both. Ties are found by storage, so
    a layer merely named like an embedding is not reported."""
    import warnings

    owners: dict[int, list[str]] = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        if p.data_ptr():  # 0 on the meta device: nothing to share
            owners.setdefault(p.data_ptr(), []).append(name)
    for path, layer in layers:
        shared = [n for n in owners.get(layer_weight(layer).data_ptr(), ()) if not n.startswith(path + ".")]
        if shared:
            warnings.warn(f"`{path}` shares its weight with `{shared[0]}` (tie_word_embeddings=True): "
                          "merging changes both. Load the model with tie_word_embeddings=False (and "
                          "a cloned weight) to merge into one of them only.", UserWarning, stacklevel=3)
