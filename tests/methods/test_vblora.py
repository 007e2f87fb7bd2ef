"""VB-LoRA against PEFT 0.21 (the oracle), with the method harness (`tests.methods.harness`).

Both directions (PEFT checkpoint -> surgeon, surgeon -> PEFT, same outputs and key sets), merged
vs unmerged vs PEFT merged, seeded init and training steps (the shared bank trains too), two
adapters switching, classic placement (PEFT's VB-LoRA table, which is not its LoRA table for
OPT), on PEFT's MLP and tiny Llama, BERT and GPT-2 (transformers' Conv1D). VB-LoRA's own points:
the vector bank is one Parameter for the whole model (one storage in every layer), saved once as
`base_model.vblora_vector_bank`; `save_only_topk_weights` checkpoints are written as PEFT writes
them and load for inference and merging, not training.

Local helpers (the harness's init/training checks load PEFT's whole state_dict, whose
model-level `base_model.vblora_vector_bank` has no counterpart in a plain model):
`_peft_and_ours`, `_layer_state`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel, VBLoRAConfig, get_peft_model
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

TRAINED = ("vblora_logits", "vblora_vector_bank")
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "gpt2": ["c_attn", "c_proj"],
}
ROUNDTRIPS = [("mlp", {"vector_length": 2}), ("llama", {"topk": 3, "num_vectors": 12}),
              ("bert", {}), ("gpt2", {})]


def vblora(case: str, **extra) -> VBLoRAConfig:
    return VBLoRAConfig(target_modules=TARGETS[case],
                        **{"r": 2, "num_vectors": 8, "vector_length": 8, "init_vector_bank_bound": 0.5, **extra})


def _layer_state(pm) -> dict[str, torch.Tensor]:
    """PEFT's state_dict below its model (the layers), in the host model's key space."""
    return {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()
            if k.startswith("base_model.model.")}


def _peft_and_ours(case: str, config: VBLoRAConfig, seed: int = 3):
    """PEFT's model and surgeon's, each applied after seeding torch's RNG with `seed`."""
    base = CASES[case].build()
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), config)
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    S.apply(spec_of(config), ours)
    return base, pm, ours


@pytest.mark.parametrize("case,extra", ROUNDTRIPS, ids=lambda v: str(v))
def test_roundtrip_and_merge(case: str, extra: dict, tmp_path: Path):
    check_roundtrip(CASES[case], vblora(case, **extra), TRAINED, tmp_path)


@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_initialisation_matches_peft_and_bank_is_one_parameter(case: str, tmp_path: Path):
    ctx = quiet()
    try:
        _, pm, ours = _peft_and_ours(case, vblora(case, vector_length=2, init_logits_std=0.3))
        theirs, mine = _layer_state(pm), ours.state_dict()
        keys = [k for k in mine if ".vblora_" in k]
        assert keys and sorted(keys) == sorted(k for k in theirs if ".vblora_" in k)
        for k in keys:
            assert torch.equal(mine[k], theirs[k]), k
        layers = [layer for _, layer in adapted_layers(ours)]
        bank = layers[0].vblora_vector_bank["default"]
        assert len(layers) > 1 and isinstance(bank, torch.nn.Parameter) and bank.requires_grad
        assert all(x.vblora_vector_bank["default"] is bank for x in layers)
        assert sum(p is bank for p in ours.parameters()) == 1  # one tensor, listed once
        S.save_pretrained(ours, tmp_path)
        saved = load_file(tmp_path / "adapter_model.safetensors")
        assert [k for k in saved if "vector_bank" in k] == ["base_model.vblora_vector_bank"]
        assert torch.equal(saved["base_model.vblora_vector_bank"], pm.base_model.vblora_vector_bank["default"])
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_training_steps_match_peft(case: str):
    """Seeded SGD steps with dropout: PEFT's losses, logits and bank after each step."""
    check_training(CASES[case], vblora(case, vblora_dropout=0.3, vector_length=2), TRAINED)


def test_topk_checkpoints_are_peft_and_serve_inference(tmp_path: Path):
    """save_only_topk_weights: surgeon writes PEFT's tensors, reads PEFT's; merged and unmerged
    outputs equal PEFT's loaded model; training such an adapter is refused, as in PEFT."""
    ctx = quiet()
    try:
        case = CASES["llama"]
        base, pm, ours = _peft_and_ours("llama", vblora("llama", save_only_topk_weights=True, topk=3))
        randomize(pm, TRAINED)
        ours.load_state_dict(_layer_state(pm))
        pm.save_pretrained(tmp_path / "peft")
        S.save_pretrained(ours, tmp_path / "ours")
        mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert sorted(mine) == sorted(theirs) and any(k.endswith("_topk_indices") for k in mine)
        for k in mine:
            assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        loaded = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
        expected = output(case, back)
        assert diff(expected, output(case, base)) > 1e-3
        assert diff(output(case, loaded), expected) <= 1e-5
        S.merge(loaded)
        back.merge_adapter()
        assert diff(output(case, loaded), output(case, back)) <= 1e-5
        S.unmerge(loaded)
        loaded.train()
        with pytest.raises(UserError, match="save_only_topk_weights"):
            case.output(loaded)
    finally:
        ctx.__exit__(None, None, None)


def test_two_adapters_switch_as_peft(tmp_path: Path):
    configs = (vblora("mlp", vector_length=2),
               VBLoRAConfig(target_modules=["seq.2"], r=3, num_vectors=6, vector_length=4, topk=1))
    check_switching(CASES["mlp"], configs, TRAINED, tmp_path)


def test_classic_placement_is_peft_default(tmp_path: Path):
    """No target rule: PEFT's VB-LoRA table (Llama: q and v, as LoRA's)."""
    check_classic_placement(VBLoRAConfig(r=2, num_vectors=8, vector_length=8),
                            "adapter default = vblora(r=2, num_vectors=8, vector_length=8) { }", tmp_path)


def test_classic_placement_follows_peft_table_where_it_differs_from_lora():
    """OPT: PEFT's VB-LoRA table adds k, out_proj, fc1 and fc2 to LoRA's q and v."""
    ctx = quiet()
    try:
        base = CASES["opt"].build()
        pm = get_peft_model(copy.deepcopy(base), VBLoRAConfig(r=2, num_vectors=8, vector_length=8))
        ours = copy.deepcopy(base)
        surgeon.apply("adapter default = vblora(r=2, num_vectors=8, vector_length=8) { }", ours)
        targets = {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}
        assert {n for n, _ in adapted_layers(ours)} == targets
        assert any(n.endswith("fc1") for n in targets)
    finally:
        ctx.__exit__(None, None, None)



def test_half_precision_base_matches_peft():
    """A bf16 Llama: PEFT's dtypes (adapter tensors upcast to fp32 by its default autocast) and
    values, its outputs, and its merged outputs."""
    ctx = quiet()
    try:
        base = CASES["llama"].build().to(torch.bfloat16)
        config = vblora("llama")
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

def test_refuses_what_peft_refuses():
    with pytest.raises(UserError, match="adapts only Linear and Conv1D"):
        surgeon.apply("adapter a = vblora(vector_length=1) { target conv1 }", CASES["convnet"].build())
    with pytest.raises(UserError, match="divisible by `vector_length` 8"):  # seq.0 has 20 inputs
        surgeon.apply("adapter a = vblora(num_vectors=8, vector_length=8) { target seq.0 }", CASES["mlp"].build())
    with pytest.raises(UserError, match="topk must not exceed"):
        surgeon.apply("adapter a = vblora(num_vectors=4, topk=5, vector_length=2) { target seq.0 }",
                      CASES["mlp"].build())
    model = CASES["mlp"].build()
    surgeon.apply("adapter a = vblora(num_vectors=8, vector_length=2) { target seq.0 }", model)
    with pytest.raises(UserError, match="adapter_names"):
        CASES["mlp"].output(model, adapter_names=["a"] * 4)
