"""Attention written in ways the plain operand edges hide (issue 13's name disagreements), each in
a tiny hand-written module whose expected roles follow from its math: projections whose output
is weighed by scores are values, the ones the scores are computed from are query and key, the
first one reading the weighed sum is `o`; what only weighs the state or the scores is no part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.roles.test_zoo_patterns import HEADS, D, L, heads, merge, roles


class NoOutputProjection(nn.Module):
    """D-FINE's / DEIMv2's decoder layer: the cross-attention has no output projection of its own
    (the weighed sum of the memory goes straight back into the residual stream, through a gate
    reading both), so the projections after the residual belong to the MLP that follows. The
    self-attention adds a local term of its values before `o` (LePE), which is no residual."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.local, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.cross_q = nn.Linear(D, D)
        self.gate = nn.Linear(2 * D, 2 * D)
        self.norm = nn.LayerNorm(D)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        v = self.v_proj(x)
        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(v))
        x = x + self.o_proj(merge(out) + self.local(v))
        weighed = merge(F.scaled_dot_product_attention(heads(self.cross_q(x)), heads(memory), heads(memory)))
        keep, take = torch.sigmoid(self.gate(torch.cat([x, weighed], -1))).chunk(2, -1)
        x = self.norm(keep * x + take * weighed)
        return x + self.down(F.relu(self.up(x)))


def test_an_attention_without_output_projection_ends_at_the_residual() -> None:
    found = roles(NoOutputProjection(), torch.randn(2, L, D), torch.randn(2, 8, D))
    assert (found["up"], found["down"]) == ("mlp.up", "mlp.down")
    assert found["gate"] == "other"  # mixes the residual with the attention: no part of either
    assert found["cross_q"].endswith(".q")
    assert [found[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj")] == [
        "attn.q", "attn.k", "attn.v", "attn.o"]


class HandWrittenScores(nn.Module):
    """Kimi delta attention's intra-chunk scores (Kimi Linear, Bailing hybrid, GLM-5 next): the
    q.k products written as a broadcast product summed over the features and weighed by a
    per-channel decay, `(q[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)`, then applied
    to the values by a matmul; no softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.f_proj, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        g = heads(F.logsigmoid(self.f_proj(x))).cumsum(2)
        decay = (g[..., :, None, :] - g[..., None, :, :]).exp()
        scores = (q[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), 0)
        return self.o_proj(merge(scores @ v))


def test_scores_written_as_a_broadcast_product_and_sum() -> None:
    found = roles(HandWrittenScores())
    assert [found[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj")] == [
        "attn.q", "attn.k", "attn.v", "attn.o"]
    assert found["f_proj"] == "other"  # the decay weighs the scores; it is no operand


class RecurrentStep(nn.Module):
    """mLSTM's recurrent form (xLSTM): per step a state `C = f * C + i * (k (x) v)` read as `q @ C`
    and normalised by `q . n`; the input and forget gates weigh the state, an output gate scales
    the result before `o`. No score matrix is ever formed."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.i_proj, self.f_proj = nn.Linear(D, HEADS), nn.Linear(D, HEADS)
        self.out_gate, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        i, f = self.i_proj(x).transpose(1, 2).exp(), torch.sigmoid(self.f_proj(x)).transpose(1, 2)
        state = x.new_zeros(x.shape[0], HEADS, D // HEADS, D // HEADS)
        norm = x.new_zeros(x.shape[0], HEADS, D // HEADS)
        steps = []
        for t in range(L):
            f_t, i_t = f[:, :, t, None, None], i[:, :, t, None, None]
            state = f_t * state + i_t * (k[:, :, t, :, None] @ v[:, :, t, None, :])
            norm = f_t[..., 0] * norm + i_t[..., 0] * k[:, :, t]
            q_t = q[:, :, t, None, :]
            steps.append((q_t @ state) / (q_t @ norm[..., None]).abs().clamp_min(1.0))
        out = merge(torch.cat(steps, 2))
        return self.o_proj(out * torch.sigmoid(self.out_gate(x)))


def test_the_recurrent_form_of_linear_attention() -> None:
    found = roles(RecurrentStep())
    assert [found[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj", "out_gate")] == [
        "attn.q", "attn.k", "attn.v", "attn.o", "attn.gate"]
    assert found["i_proj"] == found["f_proj"] == "other"  # they weigh the state, not the output


class BandedScores(nn.Module):
    """Longformer's / LED's sliding-window attention: scores computed chunk by chunk are copied
    into a zeros buffer (`buffer[:, :, rows] = q_rows @ k.T`), and the softmax reads the buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.dense = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q.new_zeros(x.shape[0], HEADS, L, L)
        half = L // 2
        scores[:, :, :half] = q[:, :, :half] @ k.transpose(-1, -2)
        scores[:, :, half:] = q[:, :, half:] @ k.transpose(-1, -2)
        return self.dense(merge(torch.softmax(scores, -1) @ v))


def test_scores_written_into_a_buffer_in_place() -> None:
    found = roles(BandedScores())
    assert [found[p] for p in ("query", "key", "value", "dense")] == [
        "attn.q", "attn.k", "attn.v", "attn.o"]


class PointerHead(nn.Module):
    """PP-DocLayout-V4's reading-order head (a global pointer): the q.k scores are the output
    (pairwise order logits), with a soft transitive closure `adjacency @ adjacency` of them. No
    values are weighed, so neither projection is an attention operand."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adjacency = torch.sigmoid(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2))
        adjacency = adjacency / adjacency.sum(-1, keepdim=True).clamp(min=1.0)
        return adjacency + torch.bmm(adjacency, adjacency)


def test_a_pointer_head_weighs_no_values() -> None:
    found = roles(PointerHead())
    assert found["q_proj"] == found["k_proj"] == "head"


class RotationAsProductSum(nn.Module):
    """PE Audio's RoPE: each pair of channels rotated by a 2x2 matrix written as a broadcast
    product summed over the pair, `(q_ * freqs_cis).sum(-1)`: a pass-through on the way to the
    scores (not a score product, though it has the same shape of ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))

    @staticmethod
    def rotate(x: torch.Tensor) -> torch.Tensor:
        angle = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] * torch.arange(1, x.shape[-1] // 2 + 1,
                                                                               dtype=x.dtype)
        cos, sin = angle.cos(), angle.sin()
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
        return (pairs * rotation).sum(-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.rotate(heads(self.q_proj(x))), self.rotate(heads(self.k_proj(x)))
        return self.o_proj(merge(F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)))))


def test_a_rotation_written_as_a_product_sum_is_passed_through() -> None:
    found = roles(RotationAsProductSum(), torch.randn(2, L, D))
    assert [found[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj")] == [
        "attn.q", "attn.k", "attn.v", "attn.o"]
