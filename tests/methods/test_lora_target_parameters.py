"""LoRA on bare parameters (`target_parameters`, PEFT's `lora.ParamWrapper`), against PEFT 0.21.

The host holds a 3D expert stack `(experts, in, out)` read with `bmm` (transformers 5's MoE
layout), a transposed one `(experts, out, in)` flagged `is_transposed`, and a 2D `(out, in)`
matrix, each on its own module. Cases: both checkpoint directions with equal outputs, PEFT's
keys and config, the seeded initialisation, merge/unmerge against PEFT's merge and the math,
PEFT's refusals.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import surgeon.api as S
from surgeon.errors import UserError
from surgeon.planning.planner import plan
from surgeon.runtime.wrappers import adapted_layers

ATOL = 1e-5
TARGETS = ["experts.gate_up_proj", "flipped.down_proj", "mix.proj"]


class Experts(nn.Module):
    """`x (experts, tokens, 6) @ gate_up_proj (experts, 6, 8)`."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 6, 8) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.gate_up_proj)


class Flipped(nn.Module):
    """An expert stack stored `(experts, out, in)`: PEFT reads `is_transposed`."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.down_proj = nn.Parameter(torch.randn(3, 8, 5) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.down_proj)


class Mix(nn.Module):
    """A 2D `(out, in)` parameter read by the module's own code."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(4, 5) / 3)

    def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return x @ self.proj.T + shift


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.experts, self.flipped, self.mix = Experts(), Flipped(), Mix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.flipped(torch.relu(self.experts(self.lin(x)))), shift=0.5)


def host() -> nn.Module:
    torch.manual_seed(0)
    return Host().eval()


def inputs() -> torch.Tensor:
    return torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs())


def peft_model(base: nn.Module, seed: int = 7, **config) -> nn.Module:
    config = {"r": 2, "lora_alpha": 4, "target_modules": [], "target_parameters": TARGETS, **config}
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return pm


SPEC = ('adapter default = lora(r=2, alpha=4, target_parameters=["experts.gate_up_proj", '
        '"flipped.down_proj", "mix.proj"]) { }')


def test_checkpoints_cross_both_ways(tmp_path: Path):
    base = host()
    pm = peft_model(base)
    pm.save_pretrained(tmp_path / "peft")
    expected = run(pm)
    assert (expected - run(base)).abs().max() > 100 * ATOL
    ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (run(ours) - expected).abs().max() <= ATOL
    S.save_pretrained(ours, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(written) == sorted(theirs)
    assert "base_model.model.experts.lora_A.weight" in written
    assert all(torch.equal(written[k], theirs[k]) for k in theirs)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(TARGETS)
    assert config["target_modules"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (run(back) - expected).abs().max() <= ATOL


def test_forward_is_the_math():
    """Each expert's delta `scaling * B_e @ A_e` (A's rows e*r.., B's columns e::E) in the stack."""
    base = host()
    pm = peft_model(base)
    ref = copy.deepcopy(base)
    model = pm.base_model.model
    with torch.no_grad():
        for name, transposed in (("experts", False), ("flipped", True)):
            layer = getattr(model, name)
            wa, wb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            param = getattr(ref, name)._parameters
            key = next(iter(param))
            for e in range(3):
                d = 2.0 * wb[:, e::3] @ wa[2 * e:2 * e + 2]
                param[key][e] += d.T if transposed else d
        ref.mix.proj += 2.0 * model.mix.lora_B["default"].weight @ model.mix.lora_A["default"].weight
    assert (run(pm) - run(ref)).abs().max() <= ATOL


def test_language_form_plans_keys_and_seeded_init_as_peft():
    base = host()
    planned = plan(SPEC, base)
    assert [(s.path, s.kind) for s in planned.sites] == [
        ("experts", "Parameter"), ("flipped", "Parameter"), ("mix", "Parameter")]
    twin_base = peft_model(base)
    assert planned.trainable_params == sum(
        p.numel() for n, p in twin_base.named_parameters() if "lora_" in n)
    torch.manual_seed(3)
    ours = S.apply(SPEC, copy.deepcopy(base))
    torch.manual_seed(3)
    twin = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS))
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    theirs = {k.removeprefix("base_model.model."): v for k, v in twin.state_dict().items()
              if "lora_" in k}
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert torch.equal(run(ours), run(base))  # B starts at zero


def test_merge_and_unmerge_match_peft(tmp_path: Path):
    base = host()
    pm = peft_model(base)
    pm.save_pretrained(tmp_path / "peft")
    unmerged = run(pm)
    pm.merge_adapter()
    peft_merged = run(pm)
    ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    layers = [layer for _, layer in adapted_layers(ours)]
    assert len(layers) == 3
    for layer in layers:
        layer.merge()
        assert layer.merged
    merged = run(ours)
    assert (merged - peft_merged).abs().max() <= ATOL
    assert (merged - unmerged).abs().max() <= 10 * ATOL
    for layer in layers:
        layer.unmerge()
    after = ours.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6
    assert (run(ours) - unmerged).abs().max() <= ATOL
    plain = S.merge_and_unload(ours)
    assert (run(plain) - peft_merged).abs().max() <= ATOL
    assert set(plain.state_dict()) == set(base.state_dict())


def test_modules_and_parameters_together_and_disabled(tmp_path: Path):
    base = host()
    pm = peft_model(base, target_modules=["lin"])
    pm.save_pretrained(tmp_path / "peft")
    ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (run(ours) - run(pm)).abs().max() <= ATOL
    with S.disable_adapters(ours):
        assert torch.equal(run(ours), run(base))


def test_refusals():
    base = host()
    with pytest.raises(UserError, match="no parameter was matched"):
        plan('adapter default = lora(target_parameters=["nothing"]) { }', base)
    with pytest.raises(UserError, match="1 dimensional Parameter, but only 2d and 3d"):
        plan('adapter default = lora(target_parameters=["lin.weight", "lin.bias"]) { }',
             Host())
    with pytest.raises(ValueError, match="1 dimensional Parameter, but only 2d and 3d"):
        get_peft_model(Host(), LoraConfig(target_modules=[], target_parameters=["lin.weight", "lin.bias"]))
    for option, text in (("dropout=0.1", "lora_dropout"), ("dora=true", "use_dora")):
        with pytest.raises(ValueError, match=text):
            S.apply(f'adapter default = lora({option}, target_parameters=["mix.proj"]) {{ }}',
                    copy.deepcopy(base))
        with pytest.raises(ValueError, match=text):
            get_peft_model(copy.deepcopy(base), LoraConfig(
                target_modules=[], target_parameters=["mix.proj"],
                **{"lora_dropout" if option.startswith("dropout") else "use_dora": True
                   if option.startswith("dora") else 0.1}))


def test_gradients_match_peft_and_a_second_adapter_runs(tmp_path: Path):
    base = host()
    pm = peft_model(base)
    pm.save_pretrained(tmp_path / "peft")
    ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    pm(inputs()).square().sum().backward()
    ours(inputs()).square().sum().backward()
    mine = dict(ours.named_parameters())
    grads = [(name.removeprefix("base_model.model."), p.grad) for name, p in pm.named_parameters()
             if "lora_" in name]
    assert len(grads) == 6
    for name, grad in grads:
        assert torch.allclose(mine[name].grad, grad, atol=1e-4), name
    other = peft_model(base, seed=11)
    other.save_pretrained(tmp_path / "two")
    S.load_adapter(ours, tmp_path / "two", adapter_name="two")
    S.set_adapter(ours, "two")
    assert (run(ours) - run(other)).abs().max() <= ATOL


def test_adapters_of_one_module_adapt_one_parameter():
    """A second adapter targeting another parameter of the module: PEFT adds it to the first
    parameter's wrapper (all adapters must target the same set); surgeon refuses."""
    model = nn.Sequential(Mix())
    model[0].other = nn.Parameter(torch.randn(4, 5))
    S.apply('adapter a = lora(target_parameters=["0.proj"], init=false) { }', model)
    x = torch.randn(2, 5)
    before = model(x)
    with pytest.raises(ValueError, match="same parameter"):
        S.apply('adapter b = lora(target_parameters=["0.other"]) { }', model)
    assert torch.equal(model(x), before)


PARAM_FORM = ('adapter default = lora(r=2, alpha=4) {\n'
              '    target param experts.gate_up_proj, param "flipped.down_proj", param mix.proj\n'
              '    rank 3 on param down_proj\n'
              '    alpha 6 on param mix.proj\n'
              '}\n')
PATTERNS = {"rank_pattern": {"down_proj": 3}, "alpha_pattern": {"mix.proj": 6}}


def test_param_form_with_rank_and_alpha_rules_is_peft_exact(tmp_path: Path):
    """`target param ...` and `rank`/`alpha` on parameters equal PEFT's target_parameters with
    rank_pattern/alpha_pattern: seeded init, keys, sizes, outputs of each side's checkpoint."""
    base = host()
    torch.manual_seed(5)
    ours = S.apply(PARAM_FORM, copy.deepcopy(base))
    torch.manual_seed(5)
    twin = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS, **PATTERNS))
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    theirs = {k.removeprefix("base_model.model."): v for k, v in twin.state_dict().items() if "lora_" in k}
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert theirs["flipped.lora_A.default.weight"].shape[0] == 3 * 3  # r=3 per expert
    trained = peft_model(base, **PATTERNS)
    trained.save_pretrained(tmp_path / "peft")
    loaded = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (run(loaded) - run(trained)).abs().max() <= ATOL
    S.save_pretrained(loaded, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (run(back) - run(trained)).abs().max() <= ATOL
    planned = plan(PARAM_FORM, base)
    assert planned.trainable_params == sum(p.numel() for n, p in trained.named_parameters() if "lora_" in n)
    assert [(s.path, s.r, s.alpha) for s in planned.sites] == [
        ("experts", 2, 4.0), ("flipped", 3, 4.0), ("mix", 2, 6.0)]


def test_param_form_errors_are_located():
    with pytest.raises(UserError) as info:
        plan('adapter default = lora() {\n  target param gate_up\n}', host())
    text = str(info.value)
    assert "<spec>:2:3: error: `target param gate_up` matches no parameter of `Host`" in text
    assert "^^^^" in text and "did you mean `param gate_up_proj`?" in text
    with pytest.raises(UserError, match="only LoRA adapts"):
        plan("adapter default = ia3() { target lin, param mix.proj feedforward lin }", host())


def test_expert_roles_select_parameters_as_peft_does(tmp_path: Path):
    """`target @moe.down` on transformers 5 Mixtral is PEFT's target_parameters on down_proj
    (both stacks together: tests/methods/test_lora_two_parameters.py)."""
    from tests.roles.zoo import build

    base = build("mixtral")
    ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.down_proj"])
    twin = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    twin.save_pretrained(tmp_path / "peft")
    spec = "adapter default = lora(r=2, alpha=4) { target @moe.down }"
    planned = plan(spec, base)
    assert [s.path for s in planned.sites] == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    ours = S.apply(spec, copy.deepcopy(base))
    S.load_adapter(ours, tmp_path / "peft", adapter_name="loaded")
    S.set_adapter(ours, "loaded")
    with torch.no_grad():
        assert (ours(ids).logits - twin(ids).logits).abs().max() <= 1e-4
    assert [s.option("parameter_name") for s in plan("adapter default = lora() { target @moe.up, @moe.down }",
                                                      base).sites[:2]] == ["gate_up_proj", "down_proj"]
