"""RandLoRA against PEFT 0.21 (the oracle), with the method harness (`tests.methods.harness`).

Both directions (PEFT checkpoint -> surgeon, surgeon -> PEFT, same outputs and key sets), merged
vs unmerged vs PEFT merged, seeded init (dense, sparse and very sparse bases) and training steps,
two adapters switching, classic placement, on PEFT's MLP and tiny Llama, BERT and GPT-2
(transformers' Conv1D). RandLoRA's own point is checked too: the random bases are one tensor for
the whole model (one storage in every layer), saved as PEFT saves them (under every layer and
once as `base_model.randlora_A` / `_B`), or regenerated from `projection_prng_key`.

Local helpers (the harness's init/training checks load PEFT's whole state_dict, whose
model-level `base_model.randlora_A` has no counterpart in a plain model): `_peft_and_ours`,
`_layer_state`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel, RandLoraConfig, get_peft_model
from safetensors.torch import load_file

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from surgeon.runtime.wrappers import adapted_layers
from tests.methods.harness import (
    check_classic_placement,
    check_roundtrip,
    check_switching,
    check_training,
    diff,
    output,
    quiet,
    randomize,
    spec_of,
)
from tests.models import CASES

TRAINED = ("randlora_lambda", "randlora_gamma")
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value"],
    "gpt2": ["c_attn", "c_proj"],
}
# a small alpha keeps randomised outputs near 1, where ATOL=1e-5 is meaningful
ROUNDTRIPS = [("mlp", {}), ("mlp", {"save_projection": False}), ("mlp", {"sparse": True}),
              ("llama", {"very_sparse": True, "projection_prng_key": 5}), ("bert", {"randlora_alpha": 8}), ("gpt2", {})]


def randlora(case: str, **extra) -> RandLoraConfig:
    return RandLoraConfig(target_modules=TARGETS[case], **{"r": 4, "randlora_alpha": 0.4, **extra})


def _layer_state(pm) -> dict[str, torch.Tensor]:
    """PEFT's state_dict below its model (the layers), in the host model's key space."""
    return {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()
            if k.startswith("base_model.model.")}


def _peft_and_ours(case: str, config: RandLoraConfig, seed: int = 3):
    """PEFT's model and surgeon's, each applied after seeding torch's RNG with `seed`."""
    base = CASES[case].build()
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), config)
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    S.apply(spec_of(config), ours)
    return pm, ours


@pytest.mark.parametrize("case,extra", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, extra: dict, tmp_path: Path):
    check_roundtrip(CASES[case], randlora(case, **extra), TRAINED, tmp_path)


@pytest.mark.parametrize("extra", [{}, {"init_weights": False}, {"sparse": True},
                                   {"very_sparse": True, "projection_prng_key": 11}], ids=str)
@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_initialisation_matches_peft_and_bases_are_one_tensor(case: str, extra: dict):
    ctx = quiet()
    try:
        pm, ours = _peft_and_ours(case, randlora(case, **extra))
        theirs, mine = _layer_state(pm), ours.state_dict()
        keys = [k for k in mine if ".randlora_" in k]
        assert keys and sorted(keys) == sorted(k for k in theirs if ".randlora_" in k)
        for k in keys:
            assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
        layers = [layer for _, layer in adapted_layers(ours)]
        assert len(layers) > 1
        assert all(x.randlora_A is layers[0].randlora_A and x.randlora_B is layers[0].randlora_B for x in layers)
        assert len({x.randlora_B["default"].data_ptr() for x in layers}) == 1
        assert torch.equal(layers[0].randlora_A["default"], pm.base_model.randlora_A["default"])
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("save", [True, False])
def test_checkpoint_holds_the_bases_as_peft(save: bool, tmp_path: Path):
    """Per layer and once at model level, PEFT's keys and values (or none without save_projection)."""
    ctx = quiet()
    try:
        pm, ours = _peft_and_ours("llama", randlora("llama", save_projection=save))
        pm.save_pretrained(tmp_path / "peft")
        S.save_pretrained(ours, tmp_path / "ours")
        mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert sorted(mine) == sorted(theirs)
        bases = {k for k in mine if k.endswith((".randlora_A", ".randlora_B"))}
        assert ({"base_model.randlora_A", "base_model.randlora_B"} <= bases) == save
        assert len(bases) == (2 + 2 * 6 if save else 0)  # 2 layers x (q, v, down)
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_training_steps_match_peft(case: str):
    """Seeded SGD steps with dropout: PEFT's losses and updated lambda/gamma; bases stay fixed."""
    check_training(CASES[case], randlora(case, randlora_dropout=0.3, init_weights=False), TRAINED)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (randlora("mlp"), RandLoraConfig(target_modules=["seq.2"], r=4, randlora_alpha=0.3,
                                               init_weights=False))
    check_switching(CASES["mlp"], configs, TRAINED, tmp_path)


def test_second_adapter_reuses_the_bases_or_is_refused():
    """PEFT's rules for later adapters: same key, same save_projection; surgeon also refuses a
    different r (PEFT accepts it and fails in forward). A refusal leaves the model as it was."""
    ctx = quiet()
    try:
        model = CASES["mlp"].build()
        surgeon.apply("adapter a = randlora(r=4) { target seq.0, seq.2 }", model)
        before = sorted(model.state_dict())
        shared = model.seq[0].randlora_A
        for spec, match in (("randlora(r=4, save_projection=false)", "saved for all adapters or none"),
                            ("randlora(r=4, projection_prng_key=1)", "PRNG initialisation key"),
                            ("randlora(r=2)", "r must be equal")):
            with pytest.raises(UserError, match=match):
                surgeon.apply(f"adapter b = {spec} {{ target seq.2, seq.4 }}", model)
            assert model.seq[0].randlora_A is shared and sorted(model.state_dict()) == before
        surgeon.apply("adapter b = randlora(r=4) { target seq.2, seq.4 }", model)
        assert model.seq[4].randlora_A is model.seq[0].randlora_A
        assert model.seq[4].randlora_A["b"] is model.seq[0].randlora_A["a"]
        S.delete_adapter(model, "b")
        assert sorted(model.seq[0].randlora_A) == ["a"]
    finally:
        ctx.__exit__(None, None, None)


def test_classic_placement_is_peft_default(tmp_path: Path):
    """With no target rule RandLoRA goes where PEFT's default table puts it (Llama: q and v)."""
    check_classic_placement(RandLoraConfig(r=4), "adapter default = randlora(r=4, init=false) { }", tmp_path)


def test_forward_is_two_matmuls_on_the_scaled_bases():
    """The math, not PEFT: a wide and a tall layer give `x + s * (x S^T) Bf^T` and its transpose form."""
    ctx = quiet()
    try:
        model = CASES["mlp"].build()
        surgeon.apply("adapter a = randlora(r=4, alpha=2, init=false) { target seq.0, seq.4 }", model)
        x = torch.randn(3, 20)
        for layer, h in ((model.seq[0], x), (model.seq[4], torch.randn(3, 32))):
            lam, gamma = layer.randlora_lambda["a"], layer.randlora_gamma["a"]
            r, n = lam.shape
            lo = gamma.shape[1]
            a, b = layer.randlora_A["a"][:, :n, :lo], layer.randlora_B["a"][:max(h.shape[1], layer.base_layer.out_features), :n]
            scaled = torch.stack([lam[k, j] * a[k, 0] * gamma[j] for k in range(r) for j in range(n)])
            flat = torch.stack([b[:, j, k] for j in range(n) for k in range(r)], dim=1)
            delta = flat @ scaled if lo == h.shape[1] else scaled.T @ flat.T
            with torch.no_grad():
                want = layer.base_layer(h) + 0.5 * h @ delta.T
                assert diff(layer(h), want) <= 1e-5
    finally:
        ctx.__exit__(None, None, None)



def test_half_precision_base_matches_peft():
    """A bf16 Llama: PEFT's dtypes (adapter tensors upcast to fp32 by its default autocast) and
    values, its outputs, and its merged outputs."""
    ctx = quiet()
    try:
        base = CASES["llama"].build().to(torch.bfloat16)
        config = randlora("llama", init_weights=False, randlora_alpha=2)
        torch.manual_seed(3)
        pm = get_peft_model(copy.deepcopy(base), config)
        ours = copy.deepcopy(base)
        torch.manual_seed(3)
        S.apply(spec_of(config), ours)
        theirs, mine = _layer_state(pm), ours.state_dict()
        for k in (k for k in mine if "default" in k):
            assert mine[k].dtype == theirs[k].dtype == torch.float32 and torch.equal(mine[k], theirs[k]), k
        randomize(pm, TRAINED, scale=0.2)
        ours.load_state_dict(_layer_state(pm))
        expected = output(CASES["llama"], pm)
        assert expected.dtype == torch.bfloat16 and diff(output(CASES["llama"], ours), expected) == 0.0
        pm.merge_adapter(), S.merge(ours)
        assert diff(output(CASES["llama"], ours).float(), output(CASES["llama"], pm).float()) <= 1e-2
    finally:
        ctx.__exit__(None, None, None)


def test_exclude_is_written_through_the_sites(tmp_path: Path):
    """PEFT's RandLoraConfig has no exclude_modules: the saved config lists the resolved sites
    (PEFT adapts exactly them), and a model-free conversion refuses instead of dropping it."""
    from surgeon.peft_format.config import NeedsModelError, peft_config_from_adapter

    spec = surgeon.load_spec("adapter default = randlora(r=2, init=false) { target seq.0, seq.2  exclude seq.2 }")
    with pytest.raises(NeedsModelError, match="exclude"):
        peft_config_from_adapter(spec.adapters[0])
    ctx = quiet()
    try:
        model = CASES["mlp"].build()
        surgeon.apply(spec, model)
        S.save_pretrained(model, tmp_path)
        back = PeftModel.from_pretrained(CASES["mlp"].build(), tmp_path)
        assert [n.removeprefix("base_model.model.") for n in back.targeted_module_names] == ["seq.0"]
        assert diff(output(CASES["mlp"], back), output(CASES["mlp"], model)) <= 1e-5
    finally:
        ctx.__exit__(None, None, None)

def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear and Conv1D"):
        surgeon.apply("adapter a = randlora(r=2) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="rank"):
        surgeon.load_spec("adapter a = randlora(r=2) { target seq.0  rank 4 on seq.0 }")
    spec = surgeon.load_spec("adapter a = randlora(r=2, sparse=true, very_sparse=true) { target seq.0 }")
    assert spec.adapters[0].option("very_sparse") is True  # a warning, as PEFT silently prefers it
    model = CASES["mlp"].build()
    surgeon.apply("adapter a = randlora(r=2) { target seq.0 }", model)
    with pytest.raises(UserError, match="adapter_names"):
        CASES["mlp"].output(model, adapter_names=["a"] * 4)
