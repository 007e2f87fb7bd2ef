"""Roles never come from names: renaming every module to m0, m1, ... changes no role.

The renamed model registers its children under meaningless names (what `named_modules`, the
exported graph and its `nn_module_stack` see) while the forward code keeps reaching them through
plain attributes. List indices stay (a ModuleList is indexed by position).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from surgeon.capture.infer import infer_roles
from tests.roles.test_pitfalls import Attention, D, MoE
from tests.roles.zoo import build, roles_of


def anonymize(module: nn.Module, counter: list[int] | None = None) -> nn.Module:
    """Rename every child of every module in place; return `module`."""
    counter = counter if counter is not None else [0]
    keep_keys = isinstance(module, (nn.ModuleList, nn.Sequential))
    renamed: OrderedDict[str, nn.Module | None] = OrderedDict()
    for name, child in module._modules.items():
        if keep_keys:
            new = name
        else:
            new = f"m{counter[0]}"
            counter[0] += 1
            object.__setattr__(module, name, child)  # the forward still finds `self.q_proj`
        renamed[new] = child
        if child is not None:
            anonymize(child, counter)
    module._modules = renamed  # type: ignore[assignment]
    return module


def positions(found: dict[str, str]) -> list[str]:
    return [str(role) for role in found.values()]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart", "phi3", "whisper"])
def test_transformers_models(arch: str) -> None:
    model = anonymize(build(arch))
    renamed = infer_roles(model)
    assert not any(part in path for path in renamed for part in ("attn", "proj", "mlp", "fc"))
    assert positions(renamed) == positions(roles_of(arch))


@pytest.mark.parametrize("make", [MoE, lambda: Attention(fused=True)])
def test_plain_modules(make) -> None:
    inputs = torch.zeros(2, 5, D)
    original = infer_roles(make(), example_inputs=inputs)
    assert positions(infer_roles(anonymize(make()), example_inputs=inputs)) == positions(original)
