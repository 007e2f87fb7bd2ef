"""Patterns that fool naive role rules, each in a tiny hand-written module.

Each module is written the way some real architecture writes it (named in its docstring); the
expected roles are the ones the math gives.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.capture.infer import infer_roles

D, HEADS = 16, 4


def roles(model: nn.Module, *shape: int) -> dict[str, str]:
    found = infer_roles(model, example_inputs=torch.zeros(*(shape or (2, 5, D))))
    return {path: str(role) for path, role in found.items()}


class HandMLP(nn.Module):
    """fc1 -> activation written by hand -> fc2 (CLIP's quick_gelu, GPT-2's gelu_new)."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(D, 2 * D), nn.Linear(2 * D, D), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.act == "silu":
            h = h * torch.sigmoid(h)
        else:
            h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.fc2(h)


def test_hand_written_silu_is_not_a_gate() -> None:
    assert roles(HandMLP("silu")) == {"fc1": "mlp.up", "fc2": "mlp.down"}


def test_hand_written_gelu_tanh_is_not_a_gate() -> None:
    assert roles(HandMLP("gelu_tanh")) == {"fc1": "mlp.up", "fc2": "mlp.down"}


class Attention(nn.Module):
    """Eager softmax attention with the variants real models use, switched by flags."""

    def __init__(self, fused: bool = False, kv_heads: int = HEADS, rope: bool = False,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.fused, self.kv_heads, self.rope, self.qk_norm = fused, kv_heads, rope, qk_norm
        kv = D // HEADS * kv_heads
        if fused:  # GPT-2 / Bloom / Phi-3: one projection, split afterwards
            self.qkv = nn.Linear(D, D + 2 * kv)
        else:
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, kv), nn.Linear(D, kv)
        self.q_norm, self.k_norm = nn.LayerNorm(D // HEADS), nn.LayerNorm(D // HEADS)
        self.o = nn.Linear(D, D)
        self.unused = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        kv = D // HEADS * self.kv_heads
        if self.fused:
            q, k, v = self.qkv(x).split([D, kv, kv], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, t, HEADS, -1).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, -1).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, -1).transpose(1, 2)
        if self.qk_norm:  # OLMo-2 / Qwen-3
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:  # Llama's rotate_half
            cos = torch.cos(torch.arange(t, dtype=x.dtype))[:, None]
            q, k = q * cos + _rotate_half(q) * cos, k * cos + _rotate_half(k) * cos
        repeat = HEADS // self.kv_heads  # GQA: Llama's repeat_kv
        k = k[:, :, None].expand(b, self.kv_heads, repeat, t, -1).reshape(b, HEADS, t, -1)
        v = torch.repeat_interleave(v, repeat, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        probs = torch.softmax(scores, dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, t, D))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


SPLIT = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o"}


def test_gqa_repeat_rope_and_qk_norm() -> None:
    found = roles(Attention(kv_heads=2, rope=True, qk_norm=True))
    assert found == {**SPLIT, "unused": "other"}


def test_fused_qkv_split() -> None:
    assert roles(Attention(fused=True)) == {"qkv": "attn.qkv", "o": "attn.o", "unused": "other"}


def test_dead_module_evidence() -> None:
    found = infer_roles(Attention(), example_inputs=torch.zeros(2, 5, D))
    assert "never called" in found["unused"].evidence


class TransposedLinear(nn.Linear):
    """Falcon's FalconLinear: `x @ self.weight.T` instead of F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class FalconStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (TransposedLinear(D, D, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(nn.functional.scaled_dot_product_attention(q, k, v))


def test_weight_transposed_by_hand() -> None:
    assert roles(FalconStyle()) == SPLIT


class MoE(nn.Module):
    """A router choosing 2 of 4 gated experts (all computed, then weighted: no data-dependent loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D, 4, bias=False)
        self.experts = nn.ModuleList(_Expert() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = torch.topk(torch.softmax(self.router(x), dim=-1), 2, dim=-1)
        dense = torch.zeros(*x.shape[:-1], 4, dtype=x.dtype).scatter(-1, chosen, weights)
        outs = torch.stack([expert(x) for expert in self.experts], dim=-1)
        return (outs * dense[..., None, :]).sum(-1)


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def test_router_and_experts() -> None:
    expected = {"router": "moe.router"}
    for i in range(4):
        expected |= {f"experts.{i}.gate": "mlp.gate", f"experts.{i}.up": "mlp.up",
                     f"experts.{i}.down": "mlp.down"}
    assert roles(MoE()) == expected


def test_eager_attention_in_a_transformers_model() -> None:
    from tests.roles.zoo import build

    model = build("llama")
    model.config._attn_implementation = "eager"
    found = {p: str(r) for p, r in infer_roles(model).items()}
    assert found["model.layers.1.self_attn.q_proj"] == "attn.q"
    assert found["model.layers.1.self_attn.v_proj"] == "attn.v"
    assert "softmax" in infer_roles(model)["model.layers.0.self_attn.k_proj"].evidence
