"""DeLoRA against PEFT 0.21 (the oracle), with the method harness (`tests.methods.harness`).

Both directions (rank_pattern as `rank` rules, lambda_pattern as PEFT's table, trained biases),
merged vs unmerged vs PEFT merged, unmerge restoring the weights, seeded init (the captured
weight norms included) and training steps (input dropout drawing from torch's RNG), two adapters
switching, classic placement, on PEFT's MLP and tiny Llama and BERT. The forward is two thin
matmuls with the per-rank norm scaling: checked against the delta formula directly, and the
graph holds no weight-sized product.
"""

from __future__ import annotations

import copy
import json
import operator
import warnings
from pathlib import Path

import pytest
import torch
from peft import DeloraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_switching,
    check_training,
    diff,
    output,
    randomize,
)
from tests.models import CASES

DELORA = ("delora_A", "delora_B", "delora_lambda")
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}
ROUNDTRIPS = [
    ("mlp", {"r": 2}, DELORA),
    ("mlp", {"r": 3, "delora_lambda": 5, "rank_pattern": {"seq.2": 4}, "lambda_pattern": {"seq.0": 2.5}},
     DELORA),
    ("llama", {"r": 4, "bias": "delora_only"}, DELORA),
    # BERT's logits barely move with a random lambda near 0: keep PEFT's initial lambda (15)
    ("bert", {"r": 2, "bias": "all"}, ("delora_A", "delora_B")),
]


def delora(case: str, **options) -> DeloraConfig:
    return DeloraConfig(target_modules=TARGETS[case], **options)


@pytest.mark.parametrize("case,options,prefixes", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, options: dict, prefixes: tuple, tmp_path: Path):
    check_roundtrip(CASES[case], delora(case, **options), prefixes, tmp_path)


@pytest.mark.parametrize("init", [True, False])
def test_initialisation_matches_peft(init: bool):
    """A, B, lambda (per lambda_pattern) and the captured column norms, value for value."""
    config = DeloraConfig(target_modules=["seq.0", "seq.2"], r=3, init_weights=init,
                          lambda_pattern={"seq.2": 3})
    check_init(CASES["mlp"], config)


@pytest.mark.parametrize("case,options", [("mlp", {"r": 2, "module_dropout": 0.3}),
                                          ("llama", {"r": 2, "bias": "all"})])
def test_training_steps_match_peft(case: str, options: dict):
    config = DeloraConfig(target_modules=TARGETS[case][:2], init_weights=False, **options)
    check_training(CASES[case], config, DELORA)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (delora("mlp", r=2), DeloraConfig(target_modules=["seq.2", "seq.4"], r=3, delora_lambda=4))
    check_switching(CASES["mlp"], configs, DELORA, tmp_path)


def test_forward_is_the_decoupled_delta():
    """`base(x) + x (B diag(lambda / r / (|A_i| |B^i|)) A diag(w_norm))^T`, by hand, with the
    norms of the weight at creation (not the current weight's), and no weight-sized product."""
    model = nn.Sequential(nn.Linear(6, 5))
    surgeon.apply('adapter a = delora(r=3, lambda=2, init=false) { target "0" }', model)
    layer = model[0]
    base = layer.base_layer
    w_norm = base.weight.detach().norm(dim=0)
    torch.testing.assert_close(layer.delora_w_norm["a"], w_norm)
    a, b = layer.delora_A["a"].detach(), layer.delora_B["a"].detach()
    scale = 2.0 / 3 / (a.norm(dim=1) * b.norm(dim=0))
    delta = b @ torch.diag(scale) @ a * w_norm[None, :]
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), base(x) + x @ delta.T)
    assert torch.linalg.matrix_norm(delta / w_norm[None, :]) <= 2.0 + 1e-5  # the bound lambda
    calls = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.nn.functional.linear) == 3  # the base call and the two factors
    assert not {torch.diag_embed, torch.matmul, torch.mm, operator.matmul} & set(calls)
    with torch.no_grad():
        base.weight.mul_(3)  # w_norm stays the creation-time norms, as PEFT's buffer
    layer.relower()
    torch.testing.assert_close(model(x), base(x) + x @ delta.T)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(DeloraConfig(r=2), "adapter default = delora(r=2, init=false) { }", tmp_path)


def test_spec_checkpoint_and_config_load_into_peft(tmp_path: Path):
    """A spec with `rank` rules and a lambda_pattern table: PEFT reads the config (same fields),
    builds the same ranks, and computes the same outputs from surgeon's checkpoint."""
    spec = ('adapter default = delora(r=2, lambda=3, module_dropout=0.1, lambda_pattern={"v_proj": 7}, '
            'init=false) { target q_proj, v_proj  rank 4 on v_proj }')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = CASES["llama"].build()
        ours = surgeon.apply(spec, copy.deepcopy(base))
        S.save_pretrained(ours, tmp_path)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) == set(DeloraConfig().to_dict())
    assert config["lambda_pattern"] == {"v_proj": 7} and config["module_dropout"] == 0.1
    v = ours.model.layers[0].self_attn.v_proj
    assert v.delora_A["default"].shape == (4, 32) and v.delora_lambda["default"].item() == 7
    assert ours.model.layers[0].self_attn.q_proj.delora_lambda["default"].item() == 3
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.v_proj.delora_w_norm" in keys
    assert diff(output(CASES["llama"], back), output(CASES["llama"], ours)) <= 1e-5


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear"):
        surgeon.apply("adapter a = delora(r=2) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="alpha"):  # PEFT has lambda_pattern, not alpha_pattern
        surgeon.load_spec("adapter a = delora(r=2) { target q  alpha 4 on q }")
    with pytest.raises(UserError, match="positive"):
        surgeon.load_spec("adapter a = delora(r=0) { target q }")
    model = surgeon.apply('adapter a = delora(r=2) { target "seq.0" }', CASES["mlp"].build())
    with pytest.raises(UserError, match="adapter_names"):
        CASES["mlp"].output(model, adapter_names=["a"] * 4)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_bases_are_refused_at_plan_time(quant: str):
    """PEFT 0.21's DeLoRA fails on a bitsandbytes base (norms of an integer weight): refused."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False) if quant == "8bit" else \
        bnb.nn.Linear4bit(64, 64)
    with pytest.raises(UserError, match=f"bitsandbytes {quant} layer"):
        surgeon.plan(surgeon.load_spec('adapter a = delora(r=2) { target "0" }'), nn.Sequential(layer))


def test_fp32_factors_on_a_bf16_base_as_peft(tmp_path: Path):
    """PEFT's autocast keeps the factors fp32 on a bf16 base; the delta is added in bf16."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = CASES["mlp"].build().to(torch.bfloat16)
        pm = get_peft_model(copy.deepcopy(base), delora("mlp", r=2)).eval()
        randomize(pm, DELORA)
        pm.save_pretrained(tmp_path)
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path)
    assert ours.seq[0].delora_A["default"].dtype == torch.float32
    x = CASES["mlp"].inputs()["X"].to(torch.bfloat16)
    with torch.no_grad():
        got, expected = ours(x), pm(X=x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert diff(got.float(), base(x).float()) > 1e-2  # the adapter acts
    assert torch.equal(got, expected)
