"""GraLoRA against PEFT 0.21 (the oracle), with the shared harness (`tests.methods.harness`).

Both directions, merged vs unmerged vs PEFT merged (unmerge restores), seeded init (blocks drawn
A_i then B_i; the hybrid Linears' own draws) and training steps (two dropout draws per adapter
with hybrid_r), two adapters switching and both active, the classic placement, on PEFT's MLP,
tiny Llama and BERT (Linear) and GPT-2 (transformers Conv1D). The forward is checked against the
block definition by hand and never builds the dense delta. Alphas are small: the harness
compares absolute outputs, and PEFT's default alpha=64 over r=4 scales random adapters 16x.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import GraloraConfig, get_peft_model
from torch import nn

import surgeon
from surgeon.errors import UserError
from surgeon.peft_format.fields import default_of, peft_fields
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
)
from tests.models import CASES

PREFIXES = ("gralora_",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "gpt2": ["c_attn", "c_proj"],
}
ROUNDTRIPS = [("mlp", {"r": 4, "hybrid_r": 2}), ("mlp", {"r": 2, "gralora_k": 1}),
              ("llama", {"r": 8, "gralora_k": 4}), ("bert", {"r": 4, "hybrid_r": 1}),
              ("gpt2", {"r": 4, "hybrid_r": 2}),
              ("mlp", {"r": 4, "target_modules": ["seq.0", "seq.2"], "modules_to_save": ["seq.4"],
                       "bias": "gralora_only"})]


def gralora(case: str, **options) -> GraloraConfig:
    return GraloraConfig(**{"target_modules": TARGETS[case], "alpha": 4, **options})


@pytest.mark.parametrize("case,options", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path):
    check_roundtrip(CASES[case], gralora(case, **options), PREFIXES, tmp_path)


@pytest.mark.parametrize("options", [{}, {"init_weights": False}, {"hybrid_r": 3},
                                     {"hybrid_r": 2, "init_weights": False, "gralora_k": 1}])
def test_initialisation_matches_peft(options: dict):
    check_init(CASES["mlp"], gralora("mlp", r=4, **options))


@pytest.mark.parametrize("case,options", [
    ("mlp", {"r": 4, "hybrid_r": 2, "gralora_dropout": 0.3}),
    ("llama", {"r": 4, "gralora_k": 4, "gralora_dropout": 0.2}),
    ("gpt2", {"r": 2, "hybrid_r": 1, "bias": "gralora_only"}),
])
def test_training_steps_match_peft(case: str, options: dict):
    check_training(CASES[case], gralora(case, init_weights=False, **options), PREFIXES)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (gralora("mlp", r=4, hybrid_r=2),
               GraloraConfig(target_modules=["seq.2", "seq.4"], r=2, alpha=2, gralora_k=1))
    check_switching(CASES["mlp"], configs, PREFIXES, tmp_path)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(GraloraConfig(r=4, alpha=4, init_weights=False),
                            "adapter default = gralora(r=4, alpha=4, init=false) { }", tmp_path)


def test_forward_is_the_block_definition_without_a_dense_delta():
    """y_j = sum_n (x_n @ A_n[:, chunk j]) @ B_j[chunk n, :] by hand; no (out, in) tensor."""
    from surgeon.methods.gralora.layer import gralora_result

    k, r = 2, 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8))
    surgeon.apply(f"adapter a = gralora(r={r}, gralora_k={k}, alpha=2, init=false) {{ target \"0\" }}",
                  model)
    layer = model[0]
    calls = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert gralora_result in calls and torch.einsum not in calls
    a, b = layer.gralora_A["a"].detach(), layer.gralora_B["a"].detach()  # (k, 3, r), (k, r, 4)
    x = torch.randn(5, 6)
    s = r // k
    blocks = [sum(x[:, 3 * n:3 * n + 3] @ a[n][:, j * s:(j + 1) * s] @ b[j][n * s:(n + 1) * s]
                  for n in range(k)) for j in range(k)]
    expected = layer.base_layer(x) + (2 / r) * torch.cat(blocks, dim=1)
    torch.testing.assert_close(model(x), expected)
    dense = layer.delta_weight("a")  # merge's delta is the same map
    torch.testing.assert_close(layer.base_layer(x) + x @ dense.T, expected)


def test_fields_and_defaults_are_peft_config():
    expected = json.loads(json.dumps(GraloraConfig().to_dict(), default=str))
    assert list(peft_fields("gralora")) == list(expected)
    for field in peft_fields("gralora"):
        if field != "peft_version":
            assert default_of("gralora", field) == expected[field], field


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear and Conv1D"):
        surgeon.apply("adapter a = gralora(r=4) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="divisible by gralora_k"):
        surgeon.load_spec("adapter a = gralora(r=6, gralora_k=4) { target seq.0 }")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="divisible by gralora_k"):
        warnings.simplefilter("ignore")
        get_peft_model(CASES["mlp"].build(), GraloraConfig(target_modules=["seq.0"], r=3, gralora_k=3))
    with pytest.raises(UserError, match="in_features=20, not divisible by gralora_k=3"):
        surgeon.plan("adapter a = gralora(r=3, gralora_k=3) { target seq.0 }", CASES["mlp"].build())
    for rule in ("exclude seq.2", "rank 2 on seq.0"):  # GraloraConfig has no such fields
        with pytest.raises(UserError, match="rules apply only to"):
            surgeon.load_spec(f"adapter a = gralora(r=4) {{ target seq.0  {rule} }}")


def test_bf16_base_matches_peft_bitwise(tmp_path: Path):
    """PEFT keeps the adapter in fp32 and casts each part to bf16 before scaling and adding."""
    from tests.methods.harness import output, randomize

    case = CASES["llama"]
    base = case.build().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, gralora("llama", r=4, hybrid_r=2))
    randomize(pm, PREFIXES, scale=0.1)
    pm.eval().save_pretrained(tmp_path)
    ours = case.build().to(torch.bfloat16)
    surgeon.api.load_adapter(ours, tmp_path)
    assert ours.model.layers[0].self_attn.q_proj.gralora_A["default"].dtype == torch.float32
    assert torch.equal(output(case, ours), output(case, pm))
