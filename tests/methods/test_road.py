"""RoAd against PEFT 0.21 (the oracle), with the method harness (`tests.methods.harness`).

Both directions, merged vs unmerged vs PEFT merged (unmerge by the inverse rotation), seeded init
and training steps, for the three variants and several group sizes, on PEFT's MLP and tiny Llama
and BERT; two adapters switching and both active at once (rotations in turn); mixed-adapter
batches, which PEFT's RoAd serves, row for row against PEFT. The forward rotates the base output
elementwise and never builds the `out x out` matrix: checked against the math directly too.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import PeftModel, RoadConfig, get_peft_model
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from tests.methods.harness import (
    check_classic_placement,
    check_init,
    check_roundtrip,
    check_training,
    diff,
    output,
    quiet,
    randomize,
)
from tests.models import CASES

ROAD = ("road_theta", "road_alpha")
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}
ROUNDTRIPS = [("mlp", {"group_size": 2}), ("mlp", {"group_size": 2, "variant": "road_2"}),
              ("llama", {"group_size": 8, "variant": "road_4"}), ("bert", {"group_size": 8})]


@contextmanager
def silent() -> Iterator[None]:
    """PEFT's and surgeon's warnings off inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def road(case: str, **options) -> RoadConfig:
    return RoadConfig(target_modules=TARGETS[case], **options)


@pytest.mark.parametrize("case,options", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, options: dict, tmp_path: Path):
    check_roundtrip(CASES[case], road(case, **options), ROAD, tmp_path)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_initialisation_matches_peft(variant: str, init: bool):
    config = RoadConfig(target_modules=["seq.0", "seq.2"], group_size=4, variant=variant, init_weights=init)
    check_init(CASES["mlp"], config)


@pytest.mark.parametrize("case,options", [("mlp", {"group_size": 4, "variant": "road_4"}),
                                          ("llama", {"group_size": 8, "variant": "road_2"})])
def test_training_steps_match_peft(case: str, options: dict):
    targets = TARGETS[case][:2]
    check_training(CASES[case], RoadConfig(target_modules=targets, init_weights=False, **options), ROAD)


def _two_adapters(case: str, tmp_path: Path):
    """PEFT with adapters `default` and `other` (different variants and group sizes) and surgeon
    with both loaded from PEFT's checkpoints."""
    base = CASES[case].build()
    first = RoadConfig(target_modules=TARGETS[case][:2], group_size=4 if case == "mlp" else 8)
    second = RoadConfig(target_modules=TARGETS[case][1:], group_size=2, variant="road_4")
    pm = get_peft_model(copy.deepcopy(base), first)
    pm.add_adapter("other", second)
    randomize(pm, ROAD)
    pm.eval()
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    S.load_adapter(ours, tmp_path)
    S.load_adapter(ours, tmp_path / "other", "other")
    return base, pm, ours


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_two_adapters_switch_and_mix_as_peft(case: str, tmp_path: Path):
    """set_adapter, both active (rotations in turn), disabling, and mixed-adapter batches (a
    local check: the harness's switching check expects mixed batches refused)."""
    ctx = quiet()
    try:
        base, pm, ours = _two_adapters(case, tmp_path)
        model_case = CASES[case]
        assert diff(output(model_case, ours), output(model_case, pm)) <= 1e-5
        for active in ("other", ["default", "other"], ["other", "default"], "default"):
            pm.base_model.set_adapter(active)
            S.set_adapter(ours, active)
            assert diff(output(model_case, ours), output(model_case, pm)) <= 1e-5
        with pm.disable_adapter(), S.disable_adapters(ours):
            assert diff(output(model_case, ours), output(model_case, base)) <= 1e-6
        rows = len(next(iter(model_case.inputs().values())))
        names = (["other", "__base__", "default", "other"] if rows == 4 else ["other", "default"])[:rows]
        with torch.no_grad():
            expected = model_case.output(pm, adapter_names=names)
            got = model_case.output(ours, adapter_names=names)
        assert diff(got, expected) <= 1e-5
        # each row is its adapter's own output (math, not PEFT): row 0 is `other` alone
        S.set_adapter(ours, "other")
        assert diff(got[0], output(model_case, ours)[0]) <= 1e-5
    finally:
        ctx.__exit__(None, None, None)


def test_two_active_adapters_merge_and_unmerge_as_peft(tmp_path: Path):
    """Both merged (R_other R_default W), as PEFT's merged weights; unmerge undoes both."""
    with silent():
        _, pm, ours = _two_adapters("mlp", tmp_path)
        pm.base_model.set_adapter(["default", "other"])
        S.set_adapter(ours, ["default", "other"])
        expected = output(CASES["mlp"], pm)
        before = ours.seq[2].base_layer.weight.detach().clone()
        pm.merge_adapter()
        S.merge(ours)
        for i in (0, 2, 4):
            assert diff(ours.seq[i].base_layer.weight, pm.base_model.model.seq[i].base_layer.weight) <= 1e-6
            assert diff(ours.seq[i].base_layer.bias, pm.base_model.model.seq[i].base_layer.bias) <= 1e-6
        assert diff(output(CASES["mlp"], ours), expected) <= 1e-5
        S.unmerge(ours)
    assert diff(ours.seq[2].base_layer.weight, before) <= 1e-5
    assert diff(output(CASES["mlp"], ours), expected) <= 1e-5


def test_mixed_batch_is_refused_in_training_and_when_merged(tmp_path: Path):
    with silent():
        _, _, ours = _two_adapters("mlp", tmp_path)
    x = CASES["mlp"].inputs()
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        ours(**x, adapter_names=["default"] * 4)
    ours.eval()
    S.merge(ours)
    with pytest.raises(ValueError, match="merged adapters"):
        ours(**x, adapter_names=["default"] * 4)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_forward_rotates_the_output_elementwise(variant: str):
    """`y = W x + b`, then each pair (y_i, y_{i+g/2}) of a group rotated and scaled by hand; no
    matmul beyond the base call, and R (PEFT's merge matrix) agrees with it."""
    from surgeon.methods.road.layer import matrix, rotate

    model = nn.Sequential(nn.Linear(6, 8))
    surgeon.apply(f"adapter a = road(variant={variant}, group_size=4, init=false) {{ target \"0\" }}", model)
    layer = model[0]
    calls = [n.target for n in layer.graph_module.graph.nodes if n.op == "call_function"]
    assert rotate in calls and not {torch.mm, torch.matmul, torch.nn.functional.linear} & set(calls[1:])
    theta, alpha = layer.road_theta["a"].detach(), layer.road_alpha["a"].detach()
    x = torch.randn(3, 6)
    y = layer.base_layer(x)
    expected = torch.empty_like(y)
    for i in range(8):
        group, j = divmod(i, 4)
        first = j < 2
        partner = i + 2 if first else i - 2
        if variant == "road_1":
            k = group * 2 + j % 2
            c, s = alpha[k] * theta[k].cos(), alpha[k] * theta[k].sin()
        elif variant == "road_2":
            c, s = alpha[i] * theta[i].cos(), alpha[i] * theta[i].sin()
        else:
            c = alpha[group * 8 + j] * theta[group * 8 + j].cos()
            s = alpha[group * 8 + 4 + j] * theta[group * 8 + 4 + j].sin()
        expected[:, i] = y[:, i] * c + (-y[:, partner] if first else y[:, partner]) * s
    torch.testing.assert_close(model(x), expected)
    r = matrix(variant, 4, theta, alpha)
    torch.testing.assert_close(y @ r.T, expected)


def test_bias_is_rotated_when_merged(tmp_path: Path):
    """merge_and_unload equals PEFT's: weight R W and bias R b."""
    with silent():
        base = CASES["mlp"].build()
        pm = get_peft_model(copy.deepcopy(base), road("mlp", group_size=2, variant="road_4"))
        randomize(pm, ROAD)
        pm.save_pretrained(tmp_path)
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path)
        plain, reference = S.merge_and_unload(ours), pm.merge_and_unload()
    for key, value in reference.state_dict().items():
        assert diff(plain.state_dict()[key], value) <= 1e-6, key
    assert diff(plain.seq[0].bias, base.seq[0].bias) > 1e-3


def test_fp32_adapter_on_a_bf16_base_as_peft(tmp_path: Path):
    """PEFT's autocast keeps RoAd's vectors fp32 on a bf16 base; the output is cast back."""
    with silent():
        base = CASES["mlp"].build().to(torch.bfloat16)
        pm = get_peft_model(copy.deepcopy(base), road("mlp", group_size=2)).eval()
        randomize(pm, ROAD)
        pm.save_pretrained(tmp_path)
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path)
    assert ours.seq[0].road_theta["default"].dtype == torch.float32
    x = CASES["mlp"].inputs()["X"].to(torch.bfloat16)
    with torch.no_grad():
        got, expected = ours(x), pm(X=x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_classic_placement_is_peft_default(tmp_path: Path):
    check_classic_placement(RoadConfig(group_size=8),
                            "adapter default = road(group_size=8, init=false) { }", tmp_path)


def test_checkpoint_written_by_surgeon_loads_into_peft(tmp_path: Path):
    """A spec-made adapter (not from PEFT) saved by surgeon: PEFT loads it, same outputs."""
    with silent():
        base = CASES["llama"].build()
        ours = surgeon.apply("adapter default = road(variant=road_2, group_size=4, init=false) "
                             "{ target @attn.q, @mlp.down in layers[1] }", copy.deepcopy(base))
        S.save_pretrained(ours, tmp_path)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert back.peft_config["default"].variant == "road_2"
    assert sorted(n.removeprefix("base_model.model.") for n in back.targeted_module_names) == \
        ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert diff(output(CASES["llama"], back), output(CASES["llama"], ours)) <= 1e-5


def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear"):
        surgeon.apply("adapter a = road(group_size=2) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="divisible by group_size"):
        surgeon.plan(surgeon.load_spec('adapter a = road(group_size=4) { target "seq.4" }'),
                     CASES["mlp"].build())
    with pytest.raises(UserError, match="group_size"):
        surgeon.load_spec("adapter a = road(group_size=3) { target q }")
    with pytest.raises(UserError, match="variant"):
        surgeon.load_spec("adapter a = road(variant=road_3) { target q }")
    with pytest.raises(UserError, match="exclude"):  # RoadConfig has no exclude_modules
        surgeon.load_spec("adapter a = road(group_size=2) { target q  exclude k }")


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_bitsandbytes_bases_as_peft(quant: str, tmp_path: Path):
    """PEFT's RoAd has bnb layers: the same forward, and the same dequantise-rotate-requantise
    merge (weight and bias), on a quantised tiny Llama."""
    pytest.importorskip("bitsandbytes")
    from tests.models import tiny_llama
    from tests.quantized.common import load, logits

    tiny_llama(hidden=64).save_pretrained(tmp_path / "base")
    with silent():
        pm = get_peft_model(load(str(tmp_path / "base"), quant, keep=True),
                            RoadConfig(target_modules=["q_proj", "v_proj"], group_size=8, variant="road_2"))
        randomize(pm.eval(), ROAD, scale=0.3)
        pm.save_pretrained(tmp_path / "peft")
        ours = load(str(tmp_path / "base"), quant, keep=True)
        S.load_adapter(ours, tmp_path / "peft")
    expected = logits(pm)
    assert diff(expected, logits(load(str(tmp_path / "base"), quant))) > 1e-2
    assert diff(logits(ours), expected) <= 1e-5
    with silent():
        pm.merge_adapter()
        S.merge(ours)
    assert diff(logits(ours), logits(pm)) <= 1e-5
