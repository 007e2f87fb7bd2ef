"""OSF against PEFT 0.21 (the oracle), with the shared harness (`tests.methods.harness`).

Both directions and merged vs PEFT merged (a local helper: PEFT's OSF cannot unmerge, so the
harness's unmerge step becomes "refused by both"), seeded init (the SVD split; random low parts
drawn U, S, V), seeded training steps (the gradient projection: every square / non-square case
of U and V), two adapters (PEFT runs only the first active one), the classic placement (PEFT's
OSF table on Llama), on PEFT's MLP, tiny Llama and BERT. The forward and the projection are
checked against the math as well.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import OSFConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from surgeon.peft_format.config import peft_config_from_adapter
from surgeon.peft_format.fields import default_of, peft_fields
from surgeon.runtime.wrappers import adapted_layers
from tests.methods.harness import (
    ATOL,
    check_classic_placement,
    check_init,
    check_switching,
    check_training,
    diff,
    output,
    quiet,
    randomize,
    spec_of,
)
from tests.models import CASES

PREFIXES = ("osf_svd_params",)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],  # (32, 20): U non-square; (32, 32); (2, 32): V non-square
    "llama": ["q_proj", "v_proj", "down_proj", "up_proj"],
    "bert": ["query", "value", "dense"],
}


def osf(case: str, **options) -> OSFConfig:
    return OSFConfig(**{"target_modules": TARGETS[case], **options})


def check_roundtrip_merge_only(case, config, tmp_path: Path) -> None:
    """The harness's check_roundtrip, with unmerge refused by both libraries (PEFT's OSF has none)."""
    ctx = quiet()
    try:
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), config)
        randomize(pm, PREFIXES, scale=0.2)
        pm.eval()
        pm.save_pretrained(tmp_path / "peft")
        expected = output(case, pm)
        assert diff(expected, output(case, base)) > 1e-3
        ours = copy.deepcopy(base)
        assert surgeon.plan(spec_of(config), base).trainable_params == pm.get_nb_trainable_parameters()[0]
        S.load_adapter(ours, tmp_path / "peft")
        targets = {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}
        assert {n for n, _ in adapted_layers(ours)} == targets
        assert diff(output(case, ours), expected) <= ATOL
        S.save_pretrained(ours, tmp_path / "ours")
        keys = sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
        assert keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "OSF"
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        assert diff(output(case, back), expected) <= ATOL
        S.merge(ours)
        pm.merge_adapter()
        merged = output(case, ours)
        assert diff(merged, expected) <= ATOL and diff(merged, output(case, pm)) <= ATOL
        with pytest.raises(NotImplementedError, match="unmerging"):
            pm.unmerge_adapter()
        for refused in (lambda: S.unmerge(ours), lambda: S.disable_adapters(ours).__enter__()):
            with pytest.raises(UserError, match="cannot be unmerged"):
                refused()
        assert diff(output(case, ours), output(case, pm)) <= ATOL  # still merged, unchanged
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case,options", [
    ("mlp", {}), ("mlp", {"effective_rank": 0.25, "rank_pattern": {r"seq\.[24]": 6}}),
    ("llama", {"effective_rank": 4}), ("bert", {"effective_rank": 20}),
    ("mlp", {"target_modules": ["seq.0", "seq.2"], "modules_to_save": ["seq.4"]}),
], ids=str)
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path):
    check_roundtrip_merge_only(CASES[case], osf(case, **options), tmp_path)


@pytest.mark.parametrize("options", [{}, {"init_weights": False},
                                     {"effective_rank": 3, "rank_pattern": {"0": 0.75, "seq": 5}}])
def test_initialisation_matches_peft(options: dict):
    check_init(CASES["mlp"], osf("mlp", **options))


@pytest.mark.parametrize("case,options", [("mlp", {"init_weights": False}), ("llama", {"effective_rank": 4})])
def test_training_steps_match_peft(case: str, options: dict):
    check_training(CASES[case], osf(case, **options), PREFIXES)


def test_gradients_leave_the_frozen_subspace_alone():
    """U_high^T dU_low = 0 and dV_low V_high^T = 0 (math), for a tall and a wide layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7), nn.Linear(7, 12))
    surgeon.apply('adapter a = osf(effective_rank=3, init=false) { target "0", "1" }', model)
    model(torch.randn(5, 12)).pow(2).sum().backward()
    for layer in model:
        u, _, vt = torch.linalg.svd(layer.base_layer.weight.detach())
        params = layer.osf_svd_params["a"]
        du, dv = params["U_low"].grad, params["V_low"].grad
        assert du.abs().max() > 1e-3 and dv.abs().max() > 1e-3
        assert (u[:, :3].T @ du).abs().max() < 1e-5 * du.abs().max()
        assert (dv @ vt[:3].T).abs().max() < 1e-5 * dv.abs().max()


def test_forward_is_the_recombined_svd():
    """Output = x (U_high S_high V_high + U_low S_low V_low)^T + bias, by hand; no dense delta."""
    from surgeon.methods.osf.layer import osf_delta

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6))
    surgeon.apply('adapter a = osf(effective_rank=2, init=false) { target "0" }', model)
    layer = model[0]
    assert osf_delta in [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    u, s, vt = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
    p = {k: v.detach() for k, v in layer.osf_svd_params["a"].items()}
    weight = (u[:, :2] * s[:2]) @ vt[:2] + (p["U_low"] * p["S_low"]) @ p["V_low"]
    x = torch.randn(3, 10)
    torch.testing.assert_close(model(x), x @ weight.T + layer.base_layer.bias, atol=1e-5, rtol=1e-5)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (osf("mlp"), OSFConfig(target_modules=["seq.2", "seq.4"], effective_rank=2))
    check_switching(CASES["mlp"], configs, PREFIXES, tmp_path)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(OSFConfig(init_weights=False), "adapter default = osf(init=false) { }", tmp_path)


def test_fields_and_defaults_are_peft_config():
    expected = json.loads(json.dumps(OSFConfig().to_dict(), default=str))
    assert list(peft_fields("osf")) == list(expected)
    for field in peft_fields("osf"):
        if field != "peft_version":
            assert default_of("osf", field) == expected[field], field


def test_refuses_what_peft_refuses_or_skips():
    with pytest.raises(UserError, match="adapts only torch.nn.Linear"):  # PEFT skips it silently
        surgeon.apply("adapter a = osf() { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="effective_rank 0"):
        surgeon.plan("adapter a = osf(effective_rank=0.01) { target seq.4 }", CASES["mlp"].build())
    with warnings.catch_warnings(), pytest.raises(ValueError, match="effective_rank"):
        warnings.simplefilter("ignore")
        get_peft_model(CASES["mlp"].build(), OSFConfig(target_modules=["seq.4"], effective_rank=0.01))
    with pytest.raises(UserError, match="no classic placement"):  # PEFT: all-linear, not a table
        surgeon.apply("adapter a = osf() { }", CASES["mlp"].build())
    with pytest.raises(UserError, match="rank_pattern="):
        surgeon.load_spec("adapter a = osf() { target seq.0  rank 4 on seq.0 }")
    layered = surgeon.load_spec("adapter a = osf() { target q_proj in layers[0] }").adapters[0]
    with pytest.raises(UserError, match="no layers_to_transform"):  # OSFConfig has no such field
        peft_config_from_adapter(layered)


def test_layer_restriction_is_saved_as_paths(tmp_path: Path):
    """With a model the sites say it: PEFT loads exactly the planned layer, with equal outputs."""
    case = CASES["llama"]
    ours = case.build()
    surgeon.apply("adapter default = osf(effective_rank=3, init=false) { target q_proj in layers[1] }", ours)
    S.save_pretrained(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(case.build(), tmp_path).eval()
    assert [n for n, _ in adapted_layers(ours)] == ["model.layers.1.self_attn.q_proj"]
    assert [n.removeprefix("base_model.model.") for n in back.targeted_module_names] == \
        ["model.layers.1.self_attn.q_proj"]
    assert diff(output(case, back), output(case, ours)) <= ATOL


def test_bf16_base_matches_peft(tmp_path: Path):
    """The SVD in fp32, its parts stored in bf16, the trained ones kept in fp32 (PEFT's autocast)."""
    case = CASES["llama"]
    base = case.build().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, osf("llama", effective_rank=4))
    randomize(pm, PREFIXES, scale=0.1)
    pm.eval().save_pretrained(tmp_path)
    ours = case.build().to(torch.bfloat16)
    S.load_adapter(ours, tmp_path)
    assert ours.model.layers[0].self_attn.q_proj.osf_svd_params["default"]["U_low"].dtype == torch.float32
    assert diff(output(case, ours).float(), output(case, pm).float()) <= 4e-3


def test_merge_and_unload_matches_peft():
    case = CASES["mlp"]
    base = case.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), osf("mlp", effective_rank=0.5))
    randomize(pm, PREFIXES, scale=0.2)
    ours = copy.deepcopy(base)
    S.apply(spec_of(osf("mlp", effective_rank=0.5)), ours)
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
    plain = S.merge_and_unload(ours)
    assert not list(adapted_layers(plain)) and isinstance(plain.seq[0], nn.Linear)
    theirs = pm.merge_and_unload()
    for i in (0, 2, 4):
        assert diff(plain.seq[i].weight, theirs.seq[i].weight) <= 1e-6
