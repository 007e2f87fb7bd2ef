"""A 32-layer 7B-shape Llama on the meta device draws in seconds and stays readable: two groups
of 16 blocks for a spec that adapts the halves differently, one drawn node per module per group."""

import time

import torch

import surgeon

SPEC = """adapter default = lora(r=16, alpha=32) {
    target @attn.q, @attn.v in layers[0:16]
    target all-linear in layers[16:] except @mlp.gate
}
"""


def test_meta_7b_shape_llama_draws_in_seconds(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    start = time.perf_counter()
    picture = surgeon.viz(model, SPEC)
    picture.save(tmp_path / "m.html")
    picture.save(tmp_path / "m.dot")
    seconds = time.perf_counter() - start
    scene = picture.scene
    assert [g.label for g in scene.groups] == ["model.layers[0:16]  ×16", "model.layers[16:32]  ×16"]
    assert len(scene.nodes) < 60  # 2 x one block, plus embedding, norm, head, I/O
    assert len(scene.adapted_paths) == len(surgeon.plan(SPEC, model).paths()) == 16 * 2 + 16 * 6
    assert seconds < 60, scene.stats  # about 5 s on two busy cores; 60 s says "not seconds"
