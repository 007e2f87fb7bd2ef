"""AdaLoRA's orthogonality regulariser: the term a training loop adds to its loss.

PEFT's `AdaLoraModel.forward` adds it to `outputs.loss` by itself; surgeon leaves the model's
forward alone (the model stays the user's class), so the loop adds it:

    loss = model(**batch).loss + surgeon.methods.adalora.orth_loss(model)

The term is `orth_reg_weight` times the mean, over every adapted module's `lora_A` and `lora_B`,
of `||P P^T - I||_F` (`A A^T` for the `(r, in)` right factor, `B^T B` for the `(out, r)` left
one): it keeps both factors close to orthonormal, so `E` acts as singular values.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.runtime.state import require_state
from surgeon.runtime.wrappers import adapted_layers


def trainable_adapter(model: nn.Module) -> str:
    """The adapter AdaLoRA trains: the first active adalora adapter (PEFT allows one)."""
    state = require_state(model)
    for name in state.active:
        if state.get(name).adapter.method == "adalora":
            return name
    raise ValueError("the model has no active adalora adapter; apply one or `set_adapter` it first")


def orth_loss(model: nn.Module, adapter: str | None = None) -> torch.Tensor:
    """`orth_reg_weight * mean ||P P^T - I||_F` over the adapter's `lora_A` / `lora_B` (PEFT's).

    Args:
        model: a model with an adalora adapter (`surgeon.apply`).
        adapter: its name; default the active adalora adapter.
    Returns:
        A scalar tensor with gradients to the factors (0 when the weight is 0).
    """
    adapter = adapter or trainable_adapter(model)
    weight = float(require_state(model).get(adapter).adapter.option("orth_reg_weight"))
    if weight < 0:
        raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
    total, count = 0, 0
    for _, layer in adapted_layers(model):
        if layer.method.name != "adalora" or adapter not in layer.sites:
            continue
        for name in ("lora_A", "lora_B"):
            p = layer._modules[name][adapter]
            cov = p @ p.T if name == "lora_A" else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return weight * (total / count if count else torch.zeros(()))
