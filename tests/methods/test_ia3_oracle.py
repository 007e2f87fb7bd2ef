"""IA3 on whole models against PEFT 0.21 (the oracle), both checkpoint directions.

For custom modules (PEFT's MLP, a conv net) and tiny transformers (GPT-2's Conv1D, Llama, BERT),
one test per case shares the setup of three checks:
1. a PEFT-saved IA3 checkpoint loads into surgeon (`load_adapter`) with the same adapted
   modules, the same feed-forward modules and the same outputs;
2. surgeon's `save_pretrained` writes PEFT's key set and a config PEFT loads
   (`PeftModel.from_pretrained`) with the same modules, feed-forward set and outputs;
3. merged outputs equal PEFT's merged ones and the unmerged ones; unmerge restores the base
   weights as exactly as PEFT's.
Then two adapters switching, and a spec written in the language, each against PEFT.
Scales are random around one, so every vector matters.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from safetensors.torch import load_file

import surgeon.api as S
from surgeon.planning.planner import plan
from surgeon.runtime.wrappers import adapted_layers
from tests.models import CASES, ModelCase

ATOL = 1e-5


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "ia3_l" in name:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif "modules_to_save" in name:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def output(case: ModelCase, model) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model).detach().clone()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def peft_modules(pm) -> tuple[set[str], set[str]]:
    """PEFT's adapted module paths and, among them, the feed-forward ones."""
    root = pm.base_model.model
    targets = {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}
    return targets, {p for p in targets if root.get_submodule(p).is_feedforward}


def our_modules(model) -> tuple[set[str], set[str]]:
    layers = dict(adapted_layers(model))
    forward = {p for p, m in layers.items() if next(iter(m.sites.values())).option("is_feedforward")}
    return set(layers), forward


CONFIGS = {
    "mlp": dict(target_modules=["seq.0", "seq.2", "seq.4"], feedforward_modules=["seq.2"]),
    "convnet": dict(target_modules=["conv1", "conv2", "head"], feedforward_modules=["conv2", "head"]),
    "gpt2": dict(target_modules=["c_attn", "mlp.c_proj", "c_fc"], feedforward_modules=["mlp.c_proj"]),
    "llama": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "bert": dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                 modules_to_save=["classifier"]),
    "llama-regex": dict(target_modules=r".*\.(k_proj|v_proj|down_proj)",
                        feedforward_modules=r".*\.down_proj"),
}


def quiet() -> warnings.catch_warnings:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_roundtrip_and_merge(name: str, tmp_path: Path):
    case = CASES[name.split("-")[0]]
    ctx = quiet()
    try:
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), IA3Config(**CONFIGS[name]))
        randomize(pm)
        expected = output(case, pm)
        assert diff(expected, output(case, base)) > 10 * ATOL  # the adapter changes the function
        pm.save_pretrained(tmp_path / "peft")

        # 1. PEFT's checkpoint into surgeon
        ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
        assert our_modules(ours) == peft_modules(pm)
        assert diff(output(case, ours), expected) <= ATOL

        # 2. surgeon's checkpoint into PEFT
        S.save_pretrained(ours, tmp_path / "ours")
        keys = sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
        assert keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert peft_modules(back) == peft_modules(pm)
        assert diff(output(case, back), expected) <= ATOL
        config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert config["peft_type"] == "IA3" and set(config) == set(pm.peft_config["default"].to_dict())

        # 3. merge / unmerge against PEFT
        paths = sorted(our_modules(ours)[0])
        before = {p: ours.get_submodule(p).base_layer.weight.detach().clone() for p in paths}
        S.merge(ours)
        pm.merge_adapter()
        merged, peft_merged = output(case, ours), output(case, pm)
        assert diff(merged, peft_merged) <= ATOL
        assert diff(merged, expected) <= max(ATOL, 2 * diff(peft_merged, expected))
        S.unmerge(ours)
        pm.unmerge_adapter()
        root = pm.base_model.model
        ours_err = max(diff(ours.get_submodule(p).base_layer.weight, before[p]) for p in paths)
        peft_err = max(diff(root.get_submodule(p).base_layer.weight, before[p]) for p in paths)
        assert ours_err <= max(peft_err, 1e-7)
        assert diff(output(case, ours), expected) <= ATOL
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_two_adapters_switch_as_peft(name: str, tmp_path: Path):
    case = CASES[name]
    ctx = quiet()
    try:
        base = case.build()
        first = CONFIGS[name]
        second = dict(target_modules=first["target_modules"][:2], feedforward_modules=[])
        pm = get_peft_model(copy.deepcopy(base), IA3Config(**first))
        pm.add_adapter("other", IA3Config(**second))
        randomize(pm)
        pm.save_pretrained(tmp_path)
        ours = S.load_adapter(copy.deepcopy(base), tmp_path)
        S.load_adapter(ours, tmp_path / "other", adapter_name="other")
        for adapter in ("other", "default", "other"):
            pm.set_adapter(adapter)
            S.set_adapter(ours, adapter)
            assert diff(output(case, ours), output(case, pm)) <= ATOL
        with S.disable_adapters(ours), pm.disable_adapter():
            assert diff(output(case, ours), output(case, pm)) <= ATOL
            assert diff(output(case, ours), output(case, base)) <= ATOL
    finally:
        ctx.__exit__(None, None, None)


def test_spec_in_the_language_equals_peft(tmp_path: Path):
    """`feedforward` in a spec: the same modules, modes and outputs as PEFT's config."""
    case = CASES["llama"]
    ctx = quiet()
    try:
        base = case.build()
        ours = S.apply("adapter default = ia3(init=false) { target k_proj, v_proj, down_proj "
                       "feedforward down_proj }", copy.deepcopy(base))
        pm = get_peft_model(copy.deepcopy(base), IA3Config(**CONFIGS["llama"]))
        assert our_modules(ours) == peft_modules(pm)
        trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        assert trainable == pm.get_nb_trainable_parameters()[0]
        planned = plan("adapter default = ia3() { target k_proj, v_proj, down_proj "
                       "feedforward down_proj }", base)
        assert planned.trainable_params == trainable
        S.save_pretrained(ours, tmp_path)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert peft_modules(back) == peft_modules(pm)
        assert diff(output(case, back), output(case, ours)) <= ATOL
        assert diff(output(case, ours), output(case, base)) > 10 * ATOL  # init=false: random scales
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_classic_placement_equals_peft_default_config(name: str, tmp_path: Path):
    """No target rule: IA3 on keys, values and the MLP's down projection (scaling its input),
    found by roles, is what PEFT's per-architecture tables give `IA3Config()`."""
    case = CASES[name]
    ctx = quiet()
    try:
        base = case.build()
        ours = S.apply("adapter default = ia3(init=false) { }", copy.deepcopy(base))
        pm = get_peft_model(copy.deepcopy(base), IA3Config())
        assert our_modules(ours) == peft_modules(pm)
        S.save_pretrained(ours, tmp_path)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert peft_modules(back) == peft_modules(pm)
        assert diff(output(case, back), output(case, ours)) <= ATOL
    finally:
        ctx.__exit__(None, None, None)
