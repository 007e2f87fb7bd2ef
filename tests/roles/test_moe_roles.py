"""Roles of MoE expert stacks (`@moe.up`, `@moe.down`): 3-D parameters in transformers 5.

Expectations are stated by hand per architecture (every 3-D parameter and its role), then
checked against the model's own code: the experts' output is linear in the `moe.down` stack
(scaling it scales the output) and not in the `moe.up` one (it passes the nonlinearity). An
expert stack the captured call never applies is uncertain, and a role selector refuses it.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from surgeon.capture.infer import analyse
from surgeon.errors import UserError
from surgeon.planning.planner import plan
from tests.roles.zoo import _auto

ARCHS = {
    "mixtral": _auto("mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _auto("qwen2_moe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, shared_expert_intermediate_size=32),
    "qwen3_moe": _auto("qwen3_moe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, head_dim=8),
    "gpt_oss": _auto("gpt_oss", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                     head_dim=8, layer_types=["sliding_attention", "full_attention"]),
}
EXPECTED = {"moe.up": "model.layers.{i}.mlp.experts.gate_up_proj",
            "moe.down": "model.layers.{i}.mlp.experts.down_proj"}


@functools.cache
def built(arch: str):
    model = ARCHS[arch]()
    return model, analyse(model)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_expert_stacks_have_their_roles(arch: str) -> None:
    _, found = built(arch)
    expected = {path.format(i=i): role for role, path in EXPECTED.items() for i in (0, 1)}
    assert {p: str(r) for p, r in found.parameters.items()} == expected
    assert not any(r.uncertain for r in found.parameters.values())
    assert not found.unreached


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_roles_agree_with_the_models_own_code(arch: str) -> None:
    """The experts' output is linear in `moe.down` only (biases zeroed: gpt-oss has them)."""
    model, found = built(arch)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    calls = []
    hook = experts.register_forward_hook(lambda m, a, k, out: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        model(torch.randint(0, 99, (2, 6)))
    hook.remove()
    args, kwargs = calls[0]
    by_role = {str(found.parameters[f"model.layers.0.mlp.experts.{n}"]): n
               for n, p in experts.named_parameters() if p.dim() == 3}

    def scaled_output_ratio(name: str) -> bool:
        base = experts(*args, **kwargs)
        param = getattr(experts, name)
        with torch.no_grad():
            param.mul_(2.0)
            doubled = experts(*args, **kwargs)
            param.div_(2.0)
        return torch.allclose(doubled, 2 * base, atol=1e-5)

    with torch.no_grad():
        assert scaled_output_ratio(by_role["moe.down"])
        assert not scaled_output_ratio(by_role["moe.up"])


class Stack(nn.Module):
    """A hand-written MoE feed-forward: every token through every expert, bmm per stack."""

    def __init__(self, experts: int = 3, d: int = 8, f: int = 12) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, d, f) / 3)
        self.w_out = nn.Parameter(torch.randn(experts, f, d) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(x.expand(self.w_in.shape[0], -1, -1), self.w_in)
        return torch.bmm(torch.nn.functional.gelu(h), self.w_out).sum(0)


class Host(nn.Module):
    """`used` runs; `spare` is a branch the captured call never takes."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = Stack(), Stack()

    def forward(self, x: torch.Tensor, spare: bool = False) -> torch.Tensor:
        return self.spare(x) if spare else self.used(x)


def test_an_unreached_stack_is_uncertain_and_role_selectors_refuse_it() -> None:
    model, x = Host(), torch.randn(5, 8)
    found = analyse(model, example_inputs=x)
    assert {p: str(r) for p, r in found.parameters.items()} == {
        "used.w_in": "moe.up", "used.w_out": "moe.down", "spare.w_in": "other", "spare.w_out": "other"}
    assert found.parameters["spare.w_in"].uncertain and not found.parameters["used.w_in"].uncertain
    with pytest.raises(UserError, match="uncertain"):
        plan("adapter default = lora(r=2) { target @moe.up }", model, example_inputs=x)


class ReadsChild(nn.Module):
    """A parent that applies its child's weight itself (as nn.MultiheadAttention's out_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.inner, self.spare = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, spare: bool = False) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        h = self.spare(h) if spare else h
        return torch.nn.functional.linear(h, self.inner.weight, self.inner.bias)


def test_dead_adapters_are_refused_or_warned_when_roles_were_captured() -> None:
    """The model's own code never calls `inner` (refused) and calls `spare` only on request
    (warned); a plan by names alone makes no capture and checks nothing."""
    model, x = ReadsChild(), torch.randn(2, 8)
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: calls.append(n))
             for n, m in model.named_children()]
    model(x)
    assert calls == ["fc"]
    for hook in hooks:
        hook.remove()
    with pytest.raises(UserError, match="reads its weight directly"):
        plan("adapter default = lora(r=2) { target @mlp.up within fc  target inner }", model, example_inputs=x)
    with pytest.warns(UserWarning, match="never called"):
        plan("adapter default = lora(r=2) { target @mlp.up within fc  target spare }", model, example_inputs=x)
    assert {s.path for s in plan("adapter default = lora(r=2) { target inner, spare }", model).sites} \
        == {"inner", "spare"}


def test_the_roles_command_lists_expert_stacks(capsys) -> None:
    """`surgeon roles` lists the expert stacks a `@moe.up` / `@moe.down` rule selects next to the
    module layers; Mixtral's experts compute `down_proj @ act(gate_up_proj @ x)`."""
    import json

    from surgeon.cli.main import main

    assert main(["roles", "--model", "tiny:mixtral", "--json"]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    up, down = (rows[f"model.layers.0.mlp.experts.{n}"] for n in ("gate_up_proj", "down_proj"))
    assert (up["kind"], up["role"], down["kind"], down["role"]) == ("Parameter", "moe.up", "Parameter", "moe.down")
    assert main(["roles", "--model", "tiny:mixtral"]) == 0
    assert "expert stacks" in capsys.readouterr().out
