"""Full role maps of architectures PEFT's tables do not list (and a few they do), stated by hand.

Every adaptable layer of each two-layer model is listed with the role its dataflow gives it;
`{i}` stands for both layer indices. The expectation is the architecture as its paper
describes it, written down here, never our own output.
"""

from __future__ import annotations

import pytest

from tests.roles.zoo import roles_of

LLAMA_LIKE = {
    "embed": ["model.embed_tokens"],
    "attn.q": ["model.layers.{i}.self_attn.q_proj"],
    "attn.k": ["model.layers.{i}.self_attn.k_proj"],
    "attn.v": ["model.layers.{i}.self_attn.v_proj"],
    "attn.o": ["model.layers.{i}.self_attn.o_proj"],
    "mlp.gate": ["model.layers.{i}.mlp.gate_proj"],
    "mlp.up": ["model.layers.{i}.mlp.up_proj"],
    "mlp.down": ["model.layers.{i}.mlp.down_proj"],
    "head": ["lm_head"],
}
ATTENTION_ONLY = {k: v for k, v in LLAMA_LIKE.items() if not k.startswith("mlp.")}

EXPECTED: dict[str, dict[str, list[str]]] = {
    "qwen2": LLAMA_LIKE,  # q/k/v biases
    "gemma2": LLAMA_LIKE,  # eager softmax with tanh softcap, gelu-tanh gate
    "olmo": LLAMA_LIKE,  # qkv clipping
    "olmo2": LLAMA_LIKE,  # qk-norm over whole projections
    "granite": LLAMA_LIKE,  # attention and residual multipliers
    "cohere": LLAMA_LIKE,  # parallel attention and MLP, qk layer norms off
    # experts are 3D parameters and the router a bare parameter in transformers 5: not layers
    "mixtral": ATTENTION_ONLY,
    # router is an nn.Linear subclass whose logits go through max(dim) (sparsemixer)
    "phimoe": {**ATTENTION_ONLY, "moe.router": ["model.layers.{i}.mlp.router"]},
    "phi3": {
        "embed": ["model.embed_tokens"],
        "attn.qkv": ["model.layers.{i}.self_attn.qkv_proj"],
        "attn.o": ["model.layers.{i}.self_attn.o_proj"],
        "mlp.gate_up": ["model.layers.{i}.mlp.gate_up_proj"],
        "mlp.down": ["model.layers.{i}.mlp.down_proj"],
        "head": ["lm_head"],
    },
    "starcoder2": {
        **ATTENTION_ONLY,
        "mlp.up": ["model.layers.{i}.mlp.c_fc"],
        "mlp.down": ["model.layers.{i}.mlp.c_proj"],
    },
    "persimmon": {
        "embed": ["model.embed_tokens"],
        "attn.qkv": ["model.layers.{i}.self_attn.query_key_value"],  # partial RoPE, qk layernorm
        "attn.o": ["model.layers.{i}.self_attn.dense"],
        "mlp.up": ["model.layers.{i}.mlp.dense_h_to_4h"],  # squared relu
        "mlp.down": ["model.layers.{i}.mlp.dense_4h_to_h"],
        "head": ["lm_head"],
    },
    "whisper": {
        "other": ["model.encoder.conv1", "model.encoder.conv2", "model.encoder.embed_positions",
                  "model.decoder.embed_positions"],
        "embed": ["model.decoder.embed_tokens"],
        "attn.q": ["model.encoder.layers.{i}.self_attn.q_proj", "model.decoder.layers.{i}.self_attn.q_proj"],
        "attn.k": ["model.encoder.layers.{i}.self_attn.k_proj", "model.decoder.layers.{i}.self_attn.k_proj"],
        "attn.v": ["model.encoder.layers.{i}.self_attn.v_proj", "model.decoder.layers.{i}.self_attn.v_proj"],
        "attn.o": ["model.encoder.layers.{i}.self_attn.out_proj",
                   "model.decoder.layers.{i}.self_attn.out_proj"],
        "xattn.q": ["model.decoder.layers.{i}.encoder_attn.q_proj"],
        "xattn.k": ["model.decoder.layers.{i}.encoder_attn.k_proj"],
        "xattn.v": ["model.decoder.layers.{i}.encoder_attn.v_proj"],
        "xattn.o": ["model.decoder.layers.{i}.encoder_attn.out_proj"],
        "mlp.up": ["model.encoder.layers.{i}.fc1", "model.decoder.layers.{i}.fc1"],
        "mlp.down": ["model.encoder.layers.{i}.fc2", "model.decoder.layers.{i}.fc2"],
        "head": ["proj_out"],
    },
    "vit": {
        "other": ["embeddings.patch_embeddings.projection"],
        "attn.q": ["layers.{i}.attention.q_proj"],
        "attn.k": ["layers.{i}.attention.k_proj"],
        "attn.v": ["layers.{i}.attention.v_proj"],
        "attn.o": ["layers.{i}.attention.o_proj"],
        "mlp.up": ["layers.{i}.mlp.fc1"],
        "mlp.down": ["layers.{i}.mlp.fc2"],
        "head": ["pooler.dense"],
    },
    "clip": {
        "embed": ["text_model.embeddings.token_embedding"],
        "other": ["text_model.embeddings.position_embedding", "vision_model.embeddings.patch_embedding",
                  "vision_model.embeddings.position_embedding"],
        **{role: [f"{tower}.encoder.layers.{{i}}.{name}" for tower in ("text_model", "vision_model")]
           for role, name in (("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"),
                              ("attn.v", "self_attn.v_proj"), ("attn.o", "self_attn.out_proj"),
                              ("mlp.up", "mlp.fc1"), ("mlp.down", "mlp.fc2"))},
        "head": ["text_projection", "visual_projection"],
    },
}


def expand(expected: dict[str, list[str]], layers: int = 2) -> dict[str, str]:
    return {pattern.format(i=i): role for role, patterns in expected.items()
            for pattern in patterns for i in range(layers)}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_role_map(arch: str) -> None:
    roles = roles_of(arch)
    assert {path: str(role) for path, role in roles.items()} == expand(EXPECTED[arch])
    assert all(role.evidence for role in roles.values())


def test_cross_attention_evidence_names_the_other_source() -> None:
    role = roles_of("whisper")["model.decoder.layers.0.encoder_attn.k_proj"]
    assert "another source" in role.evidence


def test_embedding_evidence_names_the_input() -> None:
    roles = roles_of("whisper")
    assert "`decoder_input_ids`" in roles["model.decoder.embed_tokens"].evidence
