"""PEFT is the oracle: checkpoints cross both ways with the same outputs, merging agrees.

For every tiny model x LoRA config, one test shares the setup of three checks:
1. a PEFT-saved checkpoint loads into surgeon (`load_adapter` on a plain model) with the same
   outputs (fp32, max abs diff <= 1e-5) and the same adapted modules;
2. surgeon's `save_pretrained` writes exactly PEFT's key set, and `PeftModel.from_pretrained`
   loads it with the same modules and outputs;
3. merged outputs equal unmerged ones and PEFT's merged ones; unmerge restores the base
   weights at least as exactly as PEFT's unmerge.
Adapter weights are random and non-zero (lora_B, DoRA magnitudes, trained biases, saved copies).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import surgeon.api as S
from surgeon.runtime.wrappers import adapted_layers
from tests.models import CASES, HF_CASES, PLAIN_CASES, ModelCase

ATOL = 1e-5


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 7, *, biases: bool = False) -> None:
    """Give every adapter tensor (and trained biases, saved copies) seeded non-zero values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        adapter = any(k in name for k in ("lora_B", "lora_embedding_B", "modules_to_save"))
        if adapter or "lora_magnitude_vector" in name or (biases and name.endswith(".bias")):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        elif "lora_A" in name or "lora_embedding_A" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def output(case: ModelCase, model, **extra) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model, **extra).detach().clone()


def peft_targets(pm) -> set[str]:
    return {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}


def surgeon_targets(model) -> set[str]:
    return {n for n, _ in adapted_layers(model)}


def base_weights(model, paths) -> dict[str, torch.Tensor]:
    return {p: model.get_submodule(p).base_layer.weight.detach().clone() for p in paths}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


# --------------------------------------------------------------------------- case table


def _configs(case: ModelCase) -> list[tuple[str, dict]]:
    qv = list(case.qv)
    out = [
        ("qv", dict(target_modules=qv)),
        ("all_linear", dict(target_modules="all-linear", r=4, lora_alpha=8)),
        ("patterns", dict(target_modules=qv, r=4, lora_alpha=8, rank_pattern={qv[0]: 6},
                          alpha_pattern={qv[-1]: 3})),
        ("dora", dict(target_modules=qv, use_dora=True)),
        ("rslora", dict(target_modules=qv, r=4, lora_alpha=16, use_rslora=True)),
        ("bias_all", dict(target_modules=qv, bias="all")),
    ]
    if case.layers:
        out.append(("layers", dict(target_modules=qv, layers_to_transform=[1], layers_pattern=case.layers)))
    if case.save:
        out.append(("save", dict(target_modules=qv, modules_to_save=[case.save])))
    if case.name in ("llama", "nested"):
        embed = "embed_tokens" if case.name == "llama" else "embed"
        out.append(("embedding", dict(target_modules=[embed, qv[0]], bias="lora_only")))
    return out


ROUNDTRIP = [pytest.param(c, name, cfg, id=f"{c.name}-{name}")
             for c in HF_CASES + PLAIN_CASES for name, cfg in _configs(c)]


# --------------------------------------------------------------------------- the oracle test


@pytest.mark.parametrize("case,name,config", ROUNDTRIP)
def test_peft_roundtrip_and_merge(case: ModelCase, name: str, config: dict, tmp_path: Path):
    ctx = quiet()
    try:
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
        randomize(pm, biases=name == "bias_all")
        expected = output(case, pm)
        pm.save_pretrained(tmp_path / "peft")

        # 1. PEFT's checkpoint into surgeon
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path / "peft")
        assert surgeon_targets(ours) == peft_targets(pm)
        assert max_diff(output(case, ours), expected) <= ATOL

        # 2. surgeon's checkpoint into PEFT
        S.save_pretrained(ours, tmp_path / "ours")
        ours_keys = sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
        assert ours_keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert peft_targets(back) == peft_targets(pm)
        assert max_diff(output(case, back), expected) <= ATOL

        # 3. merge / unmerge against PEFT
        paths = sorted(surgeon_targets(ours))
        before = base_weights(ours, paths)
        S.merge(ours)
        pm.merge_adapter()
        merged, peft_merged = output(case, ours), output(case, pm)
        assert max_diff(merged, peft_merged) <= ATOL
        # merging rounds differently from the unmerged forward: no worse than PEFT's own merge
        assert max_diff(merged, expected) <= max(ATOL, 2 * max_diff(peft_merged, expected))
        S.unmerge(ours)
        pm.unmerge_adapter()
        ours_err = max(max_diff(w, before[p]) for p, w in base_weights(ours, paths).items())
        peft_base = pm.base_model.model
        peft_err = max(max_diff(peft_base.get_submodule(p).base_layer.weight, before[p]) for p in paths)
        assert ours_err <= max(peft_err, 1e-7)
        assert max_diff(output(case, ours), expected) <= ATOL
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case", [CASES["llama"], CASES["mlp"]], ids=lambda c: c.name)
def test_merge_and_unload_equals_peft(case: ModelCase, tmp_path: Path):
    ctx = quiet()
    try:
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=list(case.qv), use_dora=True))
        randomize(pm)
        pm.save_pretrained(tmp_path)
        ours = S.load_adapter(copy.deepcopy(base), tmp_path)
        plain = S.merge_and_unload(ours)
        assert plain is ours and not list(adapted_layers(plain)) and type(plain) is type(base)
        assert sorted(plain.state_dict()) == sorted(base.state_dict())
        reference = pm.merge_and_unload()
        assert max_diff(output(case, plain), output(case, reference)) <= ATOL
    finally:
        ctx.__exit__(None, None, None)
