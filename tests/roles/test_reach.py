"""Reach (issue 13): nested example inputs, never guessing, and patterns recognised by what they
compute — hand-written norms and softmaxes, clamped scores, gated attention, state-space mixers.

Each module is written the way some real architecture writes it (named in its docstring); the
expected roles are the ones the math gives.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from surgeon.capture.infer import infer_roles
from surgeon.planning.planner import plan
from surgeon.planning.select import PlanError
from surgeon.lang.parser import load_spec

D = 16


def roles(model: nn.Module, inputs) -> dict[str, str]:
    return {p: str(r) for p, r in infer_roles(model, example_inputs=inputs).items()}


class Attention(nn.Module):
    """Eager attention; `variant` picks how the scores reach the probabilities."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.gate = nn.Linear(D, D)
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(D)
        if self.variant == "clamp":  # a clamp between the scores and the softmax (Persimmon-style)
            scores = torch.max(scores, torch.tensor(-1e4))
        if self.variant == "manual":  # softmax written by hand
            e = torch.exp(scores - scores.amax(-1, keepdim=True))
            probs = e / e.sum(-1, keepdim=True)
        else:
            probs = scores.softmax(-1)
        out = probs @ self.v(x)
        if self.variant == "gated":  # gated attention (Qwen3-Next, AFMoE): sigmoid(g(x)) * out
            out = out * torch.sigmoid(self.gate(x))
        return self.o(out)


@pytest.mark.parametrize("variant", ["clamp", "manual", "gated"])
def test_attention_is_recognised_by_what_it_computes(variant: str) -> None:
    found = roles(Attention(variant), torch.zeros(2, 5, D))
    assert {k: found[k] for k in "qkvo"} == {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o"}
    assert found["gate"] == ("attn.gate" if variant == "gated" else "other")


class RMSNorm(nn.Module):
    """RMSNorm by hand, as most decoder-only models write it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).type_as(x)


class TwoBlocks(nn.Module):
    """fc1 -> act -> fc2, a hand-written norm, then a gated MLP with an xIELU-like activation
    (Apertus: expm1 on the negative side): the norm separates the two MLPs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.norm = RMSNorm()
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(torch.relu(self.fc1(x)))
        u = self.up(self.norm(h))
        act = torch.where(u > 0, u * u, torch.expm1(torch.clamp(u, max=0.0)) - u)
        return h + self.down(act)


def test_hand_written_norms_stop_mlp_walks_and_new_activations_count() -> None:
    assert roles(TwoBlocks(), torch.zeros(2, 5, D)) == {
        "fc1": "mlp.up", "fc2": "mlp.down", "up": "mlp.up", "down": "mlp.down"}


class Mixer(nn.Module):
    """Mamba's shape: in_proj -> (x, z); x -> depthwise conv -> scan; y * silu(z) -> out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(D, 4 * D)
        self.conv = nn.Conv1d(2 * D, 2 * D, 3, padding=2, groups=2 * D)
        self.out_proj = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, z = self.in_proj(x).chunk(2, dim=-1)
        h = self.conv(h.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        y = torch.cumsum(torch.nn.functional.silu(h), dim=1)  # a stand-in for the selective scan
        return self.out_proj(y * torch.nn.functional.silu(z))


def test_a_state_space_mixer_is_not_an_mlp() -> None:
    found = roles(Mixer(), torch.zeros(2, 5, D))
    assert found["in_proj"] == "mixer.in" and found["out_proj"] == "mixer.out"


class Detector(nn.Module):
    """Takes a list of images (torchvision detection models) or a dict (sentence-transformers)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = nn.Linear(D, D), nn.Linear(D, 4)

    def forward(self, images):
        if isinstance(images, dict):
            images = [images["a"], images["b"]]
        return self.head(torch.relu(self.backbone(torch.stack(images))))


@pytest.mark.parametrize("inputs", [([torch.zeros(D), torch.zeros(D)],),
                                    {"a": torch.zeros(D), "b": torch.zeros(D)}])
def test_nested_example_inputs(inputs) -> None:
    assert roles(Detector(), inputs) == {"backbone": "mlp.up", "head": "mlp.down"}


class Branchy(nn.Module):
    """Python control flow on shapes: symbolic tracing cannot see which branch runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_roles_from_symbolic_tracing_are_uncertain_and_role_selectors_refuse() -> None:
    model = Branchy()
    found = infer_roles(model)  # no inputs: export cannot run, symbolic tracing is the fallback
    assert all(r.uncertain and "symbolic tracing" in r.uncertain for r in found.values())
    with pytest.raises(PlanError, match="uncertain roles"):
        plan(load_spec("adapter a = lora(r=2) { target @mlp.up }"), model)
    # names and types need no graph
    assert plan(load_spec("adapter a = lora(r=2) { target a }"), model)
    # with inputs the roles are certain and the role selector plans
    assert plan(load_spec("adapter a = lora(r=2) { target @mlp.up }"), model,
                example_inputs=torch.zeros(2, D))


def test_dead_layers_are_uncertain_unless_left_out() -> None:
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = Branchy(), nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model, x = Dead(), torch.zeros(2, D)
    found = infer_roles(model, example_inputs=x)
    assert found["unused"] == "other" and "never reached" in found["unused"].uncertain
    assert not found["used.a"].uncertain
    with pytest.raises(PlanError, match="unused"):
        plan(load_spec("adapter a = lora(r=2) { target @mlp.up }"), model, example_inputs=x)
    chosen = plan(load_spec("adapter a = lora(r=2) { target @mlp.up within used }"), model, example_inputs=x)
    assert [s.path for s in chosen.sites] == ["used.a"]
