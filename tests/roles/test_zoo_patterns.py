"""Attention, MLPs and modulation written the ways issue 13's zoo writes them, each in a tiny
hand-written module.

Each module computes what a real architecture computes (named in its docstring); the expected
roles are the ones its math gives: the projection whose output is weighed by scores is the value,
the ones the scores are computed from are query and key, the first one reading the result is
`o`; an MLP's down reads its up through the nonlinearity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.capture.graph import capture
from surgeon.capture.infer import infer_roles

D, HEADS, L = 16, 4, 6


def roles(model: nn.Module, *inputs: torch.Tensor) -> dict[str, str]:
    found = infer_roles(model, example_inputs=inputs or torch.randn(2, L, D))
    return {path: str(role) for path, role in found.items()}


def heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], D)


class LinearAttention(nn.Module):
    """Gated delta rule / lightning attention, chunk form: q, k, v from their own projections,
    concatenated through one depthwise short convolution and split again; a delta rule's
    `k_beta @ k.T` (a product of k with itself) before the query-key scores; no softmax, a decay
    mask and a sum normaliser; the output written into a preallocated buffer, then a gated norm
    and `o` (olmo_hybrid, Qwen3-Next, MiniMax)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.b_proj, self.g_proj = nn.Linear(D, HEADS), nn.Linear(D, D)
        self.conv1d = nn.Conv1d(3 * D, 3 * D, 3, groups=3 * D, padding=2)
        self.norm = nn.LayerNorm(D)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)
        mixed = F.silu(self.conv1d(mixed)[..., :L]).transpose(1, 2)
        q, k, v = (heads(t) for t in torch.split(mixed, [D, D, D], dim=-1))
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)[..., None]
        gram = torch.tril(k * beta @ k.transpose(-1, -2))  # the delta rule's own k product
        v = v + gram @ (v * beta)
        decay = torch.tril(torch.ones(L, L))
        scores = (q @ k.transpose(-1, -2)) * decay
        scores = scores / scores.sum(-1, keepdim=True).abs().clamp_min(1.0)
        out = torch.zeros_like(q)
        out[:, :, :] = scores @ v  # written in place, as the chunk loop writes each chunk
        return self.o_proj(self.norm(merge(out)) * F.silu(self.g_proj(x)))


def test_linear_attention_through_a_short_conv_and_an_in_place_write() -> None:
    found = roles(LinearAttention())
    assert {p: found[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj")} == {
        "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
        "g_proj": "attn.gate"}
    assert found["conv1d"] == "other"  # filters q, k and v along time: no part of its own
    assert found["b_proj"] != "attn.v"  # beta weighs the values; it is not a value


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, RT-DETR, Mask2Former): values sampled
    at offsets predicted from the query, weighed by softmax weights predicted from the query too
    (no key), summed over the sampling points."""

    points = 4

    def __init__(self) -> None:
        super().__init__()
        self.value_proj = nn.Linear(D, D)
        self.sampling_offsets = nn.Linear(D, HEADS * self.points * 2)
        self.attention_weights = nn.Linear(D, HEADS * self.points)
        self.output_proj = nn.Linear(D, D)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        batch, queries, _ = query.shape
        value = self.value_proj(memory).view(batch, 4, 4, HEADS, D // HEADS)
        value = value.permute(0, 3, 4, 1, 2).flatten(0, 1)  # (batch*heads, d, h, w)
        grid = torch.tanh(self.sampling_offsets(query)).view(batch, queries, HEADS, self.points, 2)
        grid = grid.transpose(1, 2).flatten(0, 1)  # (batch*heads, queries, points, 2)
        sampled = F.grid_sample(value, grid, align_corners=False)  # (batch*heads, d, queries, points)
        weights = self.attention_weights(query).view(batch, queries, HEADS, self.points).softmax(-1)
        weights = weights.transpose(1, 2).flatten(0, 1)[:, None]  # (batch*heads, 1, queries, points)
        out = (sampled * weights).sum(-1).view(batch, D, queries).transpose(1, 2)
        return self.output_proj(out)


def test_deformable_attention_value_is_the_sampled_map() -> None:
    found = roles(DeformableAttention(), torch.randn(2, L, D), torch.randn(2, 16, D))
    assert found["value_proj"] in ("attn.v", "xattn.v")
    assert found["output_proj"] == found["value_proj"].replace(".v", ".o")
    assert found["attention_weights"] == "other" and found["sampling_offsets"] == "other"


class LearnedQueries(nn.Module):
    """Attention pooling with learned queries (VideoPrism's head, Kosmos-2.5's latent queries):
    the query projection reads a parameter, not an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, 3, D))
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = heads(self.q_proj(self.latents.expand(x.shape[0], -1, -1)))
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        return self.o_proj(merge(torch.softmax(q @ k.transpose(-1, -2), -1) @ v))


def test_learned_queries_are_a_query() -> None:
    found = roles(LearnedQueries())
    assert found["q_proj"].endswith(".q") and found["k_proj"].endswith(".k")
    assert found["v_proj"].endswith(".v") and found["o_proj"].endswith(".o")


class ComplexRope(nn.Module):
    """RoPE applied as a complex product (Llama 4): q and k pass through complex tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.polar(torch.ones(L, D // HEADS // 2), torch.arange(L * 2.0).view(L, 2))

        def rotate(t: torch.Tensor) -> torch.Tensor:
            pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
            return torch.view_as_real(pairs * angles).flatten(-2)

        q, k = rotate(heads(self.q_proj(x))), rotate(heads(self.k_proj(x)))
        out = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)))
        return self.o_proj(merge(out))


def test_rope_through_complex_numbers_keeps_query_and_key() -> None:
    assert roles(ComplexRope()) == {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v",
                                    "o_proj": "attn.o"}


class PooledQuery(nn.Module):
    """Hiera's mask-unit attention: the query is max-pooled over a window (`max(dim).values`,
    its indices unused) before the scores; still a query, not a router's top-k."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = heads(self.qkv(x)).view(x.shape[0], HEADS, L, 3, -1).unbind(3)
        q = q.view(x.shape[0], HEADS, 2, L // 2, -1).max(dim=2).values
        return self.proj(merge(torch.softmax(q @ k.transpose(-1, -2), -1) @ v))


def test_a_max_pooled_query_is_still_a_query() -> None:
    assert roles(PooledQuery()) == {"qkv": "attn.qkv", "proj": "attn.o"}


class HardAssignment(nn.Module):
    """GroupViT's assign attention: softmax over the other axis, a straight-through one-hot, the
    assignment renormalised by its sum before it weighs the values."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.proj = nn.Linear(D, D)

    def forward(self, groups: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        soft = torch.softmax(self.q_proj(groups) @ self.k_proj(x).transpose(-1, -2), dim=-2)
        index = soft.max(dim=-2, keepdim=True)[1]
        hard = torch.zeros_like(soft).scatter_(-2, index, 1.0) - soft.detach() + soft
        assign = hard / (hard.sum(dim=-1, keepdim=True) + 1.0)
        return self.proj(assign @ self.v_proj(x))


def test_a_renormalised_hard_assignment_is_attention() -> None:
    found = roles(HardAssignment(), torch.randn(2, 3, D), torch.randn(2, L, D))
    assert [found[p].split(".")[1] for p in ("q_proj", "k_proj", "v_proj", "proj")] == ["q", "k", "v", "o"]


class SubNormMLP(nn.Module):
    """BitNet's MLP: the gated product is RMS-normalised before `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D)
        self.down_proj = nn.Linear(2 * D, D)
        self.weight = nn.Parameter(torch.ones(2 * D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.down_proj(h)


def test_a_norm_of_the_gated_product_keeps_the_mlp() -> None:
    assert roles(SubNormMLP()) == {"gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}


class PredictionHead(nn.Module):
    """BERT's prediction head: dense -> gelu -> LayerNorm -> decoder. A norm of one projection's
    activation, not of a gated product: no MLP across it."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.norm, self.decoder = nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


def test_a_norm_after_one_activation_is_not_crossed() -> None:
    assert roles(PredictionHead())["decoder"] == "head"


class Indexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer: relu'd query-key scores, weighed per head and summed,
    only pick the top-k keys the main attention may read; no values are weighed."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.weights_proj = nn.Linear(D, D), nn.Linear(D, D // HEADS), nn.Linear(D, HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = heads(self.wq(x))  # (batch, heads, L, d)
        scores = torch.relu(q @ self.wk(x)[:, None].transpose(-1, -2))  # (batch, heads, L, L)
        index = (scores * self.weights_proj(x).transpose(1, 2)[..., None]).sum(1)
        return index.topk(2, dim=-1).indices


def test_an_indexer_key_is_no_attention_operand_and_says_why() -> None:
    found = infer_roles(Indexer(), example_inputs=torch.randn(2, L, D))
    assert found["wk"] == "other" and "topk" in found["wk"].evidence


class GridFromInput(nn.Module):
    """Sizes read from an input's values (Qwen2-VL's `grid_thw`, `.item()`/`.tolist()`): export
    on the meta device has no values to read."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = x[:, : int(lengths.max())]
        return F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                              heads(self.v_proj(x)))


def test_shapes_read_from_input_values_are_captured_on_a_real_copy(capsys) -> None:
    model = GridFromInput()
    inputs = (torch.randn(2, L, D), torch.tensor([L - 2, L - 1]))
    captured = capture(model, inputs)
    assert captured.frontend.startswith("draft-")
    attention = next(n for n in captured.graph.graph.nodes if "scaled_dot_product" in str(n.target))
    assert attention.meta["val"].shape[-2] == L - 1  # sliced by the input's own values
    assert captured.model is not model and all(p.device.type == "cpu" for p in model.parameters())
    assert roles(model, *inputs) == {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v"}
    assert "def forward" not in capsys.readouterr().err  # the failed meta export's program, silenced


class MadeInForward(nn.Module):
    """A weight made inside forward (`torch.tensor(...)`): export lifts it into a graph constant
    that belongs to no module (OneFormer, Janus)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = torch.tensor([[1.0 if i == j else 0.5 for j in range(D)] for i in range(D)])
        return F.linear(self.fc2(F.gelu(self.fc1(x))), mix)


def test_a_constant_made_in_forward_is_not_a_weight() -> None:
    assert roles(MadeInForward()) == {"fc1": "mlp.up", "fc2": "mlp.down"}


class DiTBlock(nn.Module):
    """A diffusion transformer block (DiT): a timestep MLP makes the condition, `adaLN_modulation`
    (SiLU, Linear) turns it into shift, scale and gate for the block's norm and residual."""

    def __init__(self) -> None:
        super().__init__()
        self.t_fc1, self.t_fc2 = nn.Linear(D, D), nn.Linear(D, D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 3 * D))
        self.norm = nn.LayerNorm(D, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        condition = self.t_fc2(F.silu(self.t_fc1(t)))
        shift, scale, gate = self.adaLN_modulation(condition)[:, None].chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.fc2(F.gelu(self.fc1(h)))


def test_adaln_modulation_has_its_own_role() -> None:
    found = roles(DiTBlock(), torch.randn(2, L, D), torch.randn(2, D))
    assert found["adaLN_modulation.1"] == "adaln"  # not the timestep MLP's down projection
    assert (found["fc1"], found["fc2"]) == ("mlp.up", "mlp.down")
    assert (found["t_fc1"], found["t_fc2"]) == ("mlp.up", "mlp.down")


class AdaptedFusedMLP(nn.Module):
    """Zamba2's shared MLP: a fused gate_up projection with a low-rank adapter added to its output
    before the split into `act(gate) * up`."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(D, 4 * D), nn.Linear(2 * D, D)
        self.adapter = nn.Sequential(nn.Linear(D, 4, bias=False), nn.Linear(4, 4 * D, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.gate_up_proj(x) + self.adapter(x)).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate) * up)


def test_a_fused_gate_up_with_an_adapter_added_is_still_fused() -> None:
    found = roles(AdaptedFusedMLP())
    assert (found["gate_up_proj"], found["down_proj"]) == ("mlp.gate_up", "mlp.down")


class ConvAttention(nn.Module):
    """A VQ-VAE / diffusion VAE attention block (Janus' VQ encoder): 1x1 convolutions make q, k
    and v, and the values come first: `out = v @ softmax(q.T @ k).T`."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(D, D, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q = self.q(x).reshape(batch, channels, -1).permute(0, 2, 1)
        weights = torch.softmax(torch.bmm(q, self.k(x).reshape(batch, channels, -1)), dim=2)
        out = torch.bmm(self.v(x).reshape(batch, channels, -1), weights.permute(0, 2, 1))
        return x + self.proj_out(out.reshape(batch, channels, height, width))


def test_values_first_attention() -> None:
    assert roles(ConvAttention(), torch.randn(2, D, 3, 3)) == {"q": "attn.q", "k": "attn.k", "v": "attn.v",
                                                               "proj_out": "attn.o"}


class StateSpaceDuality(nn.Module):
    """Mamba-2's SSD scan, chunk form: x, B, C split from one `in_proj` (with the gate z) through
    a depthwise short conv; `C @ B.T` under a decay mask applied to x (linear attention, no
    softmax), plus the skip `D * x` every state-space layer adds; a gated norm, then `out_proj`."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(D, 4 * D)
        self.conv1d = nn.Conv1d(3 * D, 3 * D, 3, groups=3 * D, padding=2)
        self.D = nn.Parameter(torch.ones(HEADS))
        self.norm = nn.LayerNorm(D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        z, xbc = torch.split(self.in_proj(hidden), [D, 3 * D], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :L]).transpose(1, 2)
        x, b, c = (heads(t) for t in torch.split(xbc, [D, D, D], dim=-1))
        decay = torch.tril(torch.ones(L, L, device=hidden.device))
        y = ((c @ b.transpose(-1, -2)) * decay) @ x
        y = y + self.D[None, :, None, None] * x
        return self.out_proj(self.norm(merge(y)) * F.silu(z))


def test_a_state_space_scan_keeps_the_mixer_roles() -> None:
    """SSD computes linear attention, but with its `D * x` skip it is a state-space layer: the
    mixer roles, so `@attn.*` never selects the SSM layers of a hybrid (issue 13: new role names
    where attn/mlp would lie). Dropping the skip makes it the linear attention above again."""
    found = roles(StateSpaceDuality())
    assert (found["in_proj"], found["out_proj"]) == ("mixer.in", "mixer.out")
    assert roles(WithoutSkip())["out_proj"] == "attn.o"


class WithoutSkip(StateSpaceDuality):
    """The same scan without `D * x`: plain linear attention."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        z, xbc = torch.split(self.in_proj(hidden), [D, 3 * D], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :L]).transpose(1, 2)
        x, b, c = (heads(t) for t in torch.split(xbc, [D, D, D], dim=-1))
        y = ((c @ b.transpose(-1, -2)) * torch.tril(torch.ones(L, L, device=hidden.device))) @ x
        return self.out_proj(self.norm(merge(y)) * F.silu(z))


class SizesMadeInForward(GridFromInput):
    """Sizes read by `.tolist()` from a tensor the forward makes itself (Step3.5's vision tower,
    `get_vision_position_ids`): made on the meta device during capture, it has no storage, so
    export on meta fails outright ("unallocated storage"), not as a data-dependent guard; the
    real copy still settles it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, : torch.tensor([L - 1]).tolist()[0]]
        return F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                              heads(self.v_proj(x)))


def test_any_meta_export_failure_is_retried_on_a_real_copy() -> None:
    model = SizesMadeInForward()
    captured = capture(model, torch.randn(2, L, D))
    assert captured.frontend.startswith(("draft-", "real-"))
    attention = next(n for n in captured.graph.graph.nodes if "scaled_dot_product" in str(n.target))
    assert attention.meta["val"].shape[-2] == L - 1  # sliced by the forward's own values
    assert roles(model) == {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v"}


class MaskOnlyOutsideTracing(nn.Module):
    """LongT5's encoder makes its default mask only when not compiling, then reads it: under
    export the mask must be passed."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(vocab_size=32, hidden_size=D)
        self.embed = nn.Embedding(32, D)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None and not torch.compiler.is_compiling():
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(input_ids) * attention_mask[..., None]
        return F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                              heads(self.v_proj(x)))


def test_a_mask_the_forward_makes_only_outside_tracing_is_synthesized() -> None:
    found = infer_roles(MaskOnlyOutsideTracing())
    assert {p: str(r) for p, r in found.items() if p.endswith("proj")} == {
        "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v"}
    assert not any(r.uncertain for r in found.values())  # exported, not symbolically traced


def test_where_draft_export_itself_fails_plain_export_runs_on_the_real_copy(monkeypatch) -> None:
    """Draft export fails inside torch on some unbacked sizes (Inkling 2's vision tower): plain
    non-strict export of the same real copy on the same values is tried next."""

    def broken(*args, **kwargs):
        raise RuntimeError("PendingUnbackedSymbolNotFound")

    monkeypatch.setattr(torch.export, "draft_export", broken)
    model = SizesMadeInForward()
    captured = capture(model, torch.randn(2, L, D))
    assert captured.frontend.startswith("real-")
    attention = next(n for n in captured.graph.graph.nodes if "scaled_dot_product" in str(n.target))
    assert attention.meta["val"].shape[-2] == L - 1
    assert roles(model) == {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v"}
