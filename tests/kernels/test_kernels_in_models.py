"""The kernels inside adapted models: forwards lowered where the kernels run (a GPU; here CPU
routed through Triton's interpreter) equal PEFT's on the same weights, for plain LoRA, a
mixed-adapter batch and DoRA, and training still takes the differentiable torch path.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import surgeon
from surgeon import kernels

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from before triton loaded", allow_module_level=True)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(12, 20), nn.Linear(20, 6)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def peft_pair(use_dora: bool = False, adapters: tuple[str, ...] = ("default",)):
    """PEFT's model with seeded non-zero adapters, and surgeon's with the same tensors."""
    torch.manual_seed(0)
    base = Mlp()
    config = LoraConfig(target_modules=["up", "down"], r=4, lora_alpha=8, use_dora=use_dora)
    pm = get_peft_model(copy.deepcopy(base), config, adapter_name=adapters[0])
    for name in adapters[1:]:
        pm.add_adapter(name, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ours = copy.deepcopy(base)
    spec = "\n".join(f'adapter {a} = lora(r=4, alpha=8, dora={str(use_dora).lower()}) {{ target up, down }}'
                     for a in adapters)
    surgeon.apply(spec, ours)
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()},
                         strict=False)
    return ours.eval(), pm.eval()


@pytest.fixture
def ran(monkeypatch) -> dict[str, int]:
    """Counts the Triton kernels' launches (their wrappers in surgeon.kernels.lora / .dora)."""
    from surgeon.kernels import dora, lora

    counts: dict[str, int] = {}

    def counting(name: str, fn):
        def counted(*args):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args)
        return counted

    for module, name in ((lora, "lora_add"), (lora, "gathered_add"), (dora, "weight_norm")):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return counts


def test_lora_forward_runs_the_fused_kernel_and_equals_peft(ran):
    ours, pm = peft_pair()
    x = torch.randn(3, 5, 12)
    with kernels.interpreted_on_cpu(), torch.no_grad():
        ours.to(torch.float64).float()  # a device/dtype move relowers (here: a dtype round trip)
        got = ours(x)
    assert ran == {"lora_add": 2}
    torch.testing.assert_close(got, pm(x), atol=1e-5, rtol=1e-5)
    assert (got - ours.down.base_layer(torch.relu(ours.up.base_layer(x)))).abs().max() > 1e-2


def test_training_through_a_kernel_graph_takes_the_torch_path(ran):
    """Same graph, grad enabled: the dispatch computes with torch, so gradients flow (as PEFT's)."""
    x = torch.randn(4, 12)
    with kernels.interpreted_on_cpu():
        ours, pm = peft_pair()
        ours(x).sum().backward()
    assert ran == {}
    pm(x).sum().backward()
    theirs = dict(pm.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs[f"base_model.model.{name}"].grad, atol=1e-5, rtol=1e-5)


def test_mixed_batch_runs_the_gather_kernel_and_equals_peft(ran):
    x = torch.randn(5, 3, 12)
    names = ["b", "a", "__base__", "c", "b"]
    with kernels.interpreted_on_cpu(), torch.no_grad():
        ours, pm = peft_pair(adapters=("a", "b", "c"))
        got = ours(x, adapter_names=names)
    assert ran == {"gathered_add": 2}
    with torch.no_grad():
        torch.testing.assert_close(got, pm(x, adapter_names=names), atol=1e-5, rtol=1e-5)


def test_dora_norm_kernel_gives_peft_outputs(ran):
    x = torch.randn(3, 12)
    with kernels.interpreted_on_cpu(), torch.no_grad():
        ours, pm = peft_pair(use_dora=True)
        got = ours(x)
    assert ran == {"weight_norm": 4}  # per layer: the magnitude init, then the forward
    torch.testing.assert_close(got, pm(x), atol=1e-5, rtol=1e-5)
