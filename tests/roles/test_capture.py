"""Capture: front ends, meta-device copies, block stand-ins, and the errors it raises."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from surgeon.capture.graph import CaptureError, capture, capture_graph, meta_copy, repeated_blocks
from surgeon.capture.infer import Role, RolesError, infer_roles
from surgeon.capture.synthesize import synthesize_inputs
from tests.roles.zoo import build


def _meta_llama(layers: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_capture_graph_of_a_cpu_model_leaves_it_untouched() -> None:
    model = build("llama")
    before = {name: (p, p.device) for name, p in model.named_parameters()}
    graph = capture_graph(model)
    assert isinstance(graph, fx.GraphModule)
    assert any("scaled_dot_product_attention" in str(n.target) for n in graph.graph.nodes)
    after = {name: (p, p.device) for name, p in model.named_parameters()}
    assert after.keys() == before.keys()
    assert all(after[k][0] is before[k][0] and after[k][1] == torch.device("cpu") for k in after)
    assert not any("forward" in vars(m) for m in model.modules())  # no stand-in left behind
    assert not any(m._forward_hooks for m in model.modules())


def test_meta_copy_keeps_ties_and_allocates_nothing() -> None:
    model = build("gpt2")  # lm_head is tied to the token embedding
    copy = meta_copy(model)
    assert all(p.is_meta for p in copy.parameters())
    assert copy.lm_head.weight is copy.transformer.wte.weight
    assert not model.lm_head.weight.is_meta


def test_repeated_blocks_are_captured_once() -> None:
    model = _meta_llama(layers=4)
    assert repeated_blocks(model) == {"model.layers.0": ["model.layers.1", "model.layers.2", "model.layers.3"]}
    captured = capture(model)
    assert captured.frontend == "export-blocks"
    assert dict(captured.stand_ins) == {f"model.layers.{i}": "model.layers.0" for i in (1, 2, 3)}
    roles = infer_roles(model)
    for i in range(4):
        assert roles[f"model.layers.{i}.self_attn.q_proj"] == "attn.q"
        assert roles[f"model.layers.{i}.mlp.gate_proj"] == "mlp.gate"
    assert "same block structure" in roles["model.layers.3.self_attn.q_proj"].evidence
    assert roles["lm_head"] == "head" and roles["model.embed_tokens"] == "embed"


def test_whole_model_capture_traces_every_block() -> None:
    graph = capture_graph(_meta_llama(layers=3))
    sdpa = [n for n in graph.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert len(sdpa) == 3


def test_inputs_synthesized_from_the_config() -> None:
    assert [k for k, _ in synthesize_inputs(build("t5")).kwargs] == ["input_ids", "decoder_input_ids"]
    assert [k for k, _ in synthesize_inputs(build("vit")).kwargs] == ["pixel_values"]
    features = dict(synthesize_inputs(build("whisper")).kwargs)["input_features"]
    assert tuple(features.shape) == (1, 8, 16)  # mel bins, 2 * max_source_positions
    assert synthesize_inputs(nn.Linear(2, 2)) is None


class _Branchy(nn.Module):
    """Data-dependent control flow: symbolic_trace cannot follow it, and no inputs are given."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x)


def test_symbolic_trace_fallback_without_inputs() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    assert capture(model).frontend == "symbolic_trace"
    assert infer_roles(model) == {"0": "mlp.up", "2": "mlp.down"}


def test_capture_error_says_why_and_what_to_do() -> None:
    with pytest.raises(CaptureError) as error:
        capture_graph(_Branchy())
    message = str(error.value)
    assert "no example inputs" in message and "symbolic_trace" in message
    assert "by name" in message and "by type" in message


def test_roles_error_is_a_capture_error() -> None:
    with pytest.raises(RolesError, match="Cannot infer roles"):
        infer_roles(_Branchy())
    assert issubclass(RolesError, CaptureError)


def test_role_is_a_string_with_evidence() -> None:
    role = Role("attn.q", "reaches the query")
    assert role == "attn.q" and isinstance(role, str) and role.evidence == "reaches the query"
    assert {role: 1}["attn.q"] == 1
    with pytest.raises(ValueError, match="unknown role"):
        Role("attn.qq", "")
