"""The oracle harness every method's tests share: one setup checks a config three ways against
PEFT 0.21 (a PEFT checkpoint loads into surgeon; surgeon's checkpoint loads into PEFT; merged =
unmerged = PEFT merged, unmerge restores), plus seeded init, seeded training, switching between
two adapters and the classic placement. Custom modules and tiny transformers come from
tests/models.py; TARGETS names each case's modules.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import surgeon
import surgeon.api as S
from surgeon.errors import UserError
from surgeon.lang.spec import Spec
from surgeon.peft_format.config import spec_from_peft_config
from surgeon.runtime.wrappers import adapted_layers
from tests.models import BATCH, CASES, ModelCase, _plain, tensor_input

ATOL = 1e-5


class ConvNet1d(nn.Module):
    """Conv1d layers of kernel 3 and 1, and a grouped one."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 1)
        self.grouped = nn.Conv1d(8, 8, 3, groups=2)
        self.head = nn.Linear(8 * 5, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(self.grouped(h).flatten(1))


CONV1D = ModelCase("conv1d", _plain(ConvNet1d), tensor_input("x", BATCH, 4, 7), ("conv1", "conv2"),
                   hf=False)
# (case, PEFT target_modules)
TARGETS = {
    "mlp": ["seq.0", "seq.2", "seq.4"],
    "convnet": ["conv1", "conv2", "head"],
    "conv1d": ["conv1", "conv2", "grouped", "head"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}


def case_of(name: str) -> ModelCase:
    return CONV1D if name == "conv1d" else CASES[name]


def quiet() -> warnings.catch_warnings:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


@torch.no_grad()
def randomize(model: nn.Module, prefixes: tuple[str, ...], seed: int = 7, scale: float = 0.4) -> None:
    """Seeded non-zero values for every adapter tensor (PEFT's init zeroes one factor)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if any(f".{prefix}" in name for prefix in prefixes):
            p.copy_(scale * torch.randn(p.shape, generator=g))


def output(case: ModelCase, model) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model).detach().clone()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def spec_of(config) -> Spec:
    """The spec surgeon reads from a PEFT config (the same path as `load_adapter`)."""
    return Spec((spec_from_peft_config(config.to_dict(), name="default"),))


def check_roundtrip(case: ModelCase, config, prefixes: tuple[str, ...], tmp_path: Path) -> None:
    """Checks 1-3 of the module docstring for one PEFT config."""
    ctx = quiet()
    try:
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), config)
        randomize(pm, prefixes)
        pm.eval()
        pm.save_pretrained(tmp_path / "peft")
        expected = output(case, pm)
        assert diff(expected, output(case, base)) > 1e-3  # the adapter changes the output

        ours = copy.deepcopy(base)
        planned = surgeon.plan(spec_of(config), base).trainable_params
        assert planned == pm.get_nb_trainable_parameters()[0]
        S.load_adapter(ours, tmp_path / "peft")
        targets = {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}
        assert {n for n, _ in adapted_layers(ours)} == targets
        assert diff(output(case, ours), expected) <= ATOL

        S.save_pretrained(ours, tmp_path / "ours")
        keys = sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
        assert keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert saved["peft_type"] == config.peft_type.value
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        assert diff(output(case, back), expected) <= ATOL

        weights = {p: ours.get_submodule(p).base_layer.weight.detach().clone() for p in targets}
        S.merge(ours)
        pm.merge_adapter()
        merged = output(case, ours)
        assert diff(merged, expected) <= ATOL and diff(merged, output(case, pm)) <= ATOL
        S.unmerge(ours)
        for p, w in weights.items():
            assert diff(ours.get_submodule(p).base_layer.weight, w) <= 1e-6
        assert diff(output(case, ours), expected) <= ATOL
    finally:
        ctx.__exit__(None, None, None)


def check_init(case: ModelCase, config, seed: int = 3) -> None:
    """Seeded `apply` creates PEFT's tensors, value for value (PEFT's init order and RNG use)."""
    ctx = quiet()
    try:
        base = case.build()
        torch.manual_seed(seed)
        pm = get_peft_model(copy.deepcopy(base), config)
        ours = copy.deepcopy(base)
        torch.manual_seed(seed)
        S.apply(spec_of(config), ours)
        theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
        mine = ours.state_dict()
        adapter = [k for k in theirs if ".default" in k]
        assert adapter and sorted(adapter) == sorted(k for k in mine if ".default" in k)
        for k in adapter:
            assert torch.equal(mine[k], theirs[k]), k
    finally:
        ctx.__exit__(None, None, None)


def check_training(case: ModelCase, config, prefixes: tuple[str, ...], steps: int = 3) -> None:
    """Seeded training steps in train mode (dropouts drawing from torch's RNG) match PEFT's
    losses, gradients and updated tensors."""
    ctx = quiet()
    try:
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), config)
        randomize(pm, prefixes, scale=0.2)
        ours = copy.deepcopy(base)
        S.apply(spec_of(config), ours)
        # layer tensors only: PEFT lists shared ones (VeRA's projections) at model level too
        ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()
                              if k.startswith("base_model.model.")})
        pm.train(), ours.train()
        mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        theirs = {n.removeprefix("base_model.model."): p for n, p in pm.named_parameters() if p.requires_grad}
        assert sorted(mine) == sorted(theirs)
        opts = [torch.optim.SGD(list(m.values()), lr=0.01) for m in (mine, theirs)]
        for step in range(steps):
            losses = []
            for model, opt in zip((ours, pm), opts):
                torch.manual_seed(100 + step)
                loss = case.output(model).pow(2).mean()
                loss.backward()
                losses.append(loss.detach())
            torch.testing.assert_close(*losses, rtol=1e-5, atol=ATOL)
            for n, p in mine.items():  # a module dropped in both has no gradient in both
                assert (p.grad is None) == (theirs[n].grad is None), n
                if p.grad is not None:
                    scale = theirs[n].grad.abs().max().item()
                    assert diff(p.grad, theirs[n].grad) <= 1e-5 * max(scale, 1.0), n
            for opt in opts:
                opt.step(), opt.zero_grad()
    finally:
        ctx.__exit__(None, None, None)


def check_switching(case: ModelCase, configs: tuple, prefixes: tuple[str, ...], tmp_path: Path) -> None:
    """Two PEFT checkpoints loaded as two adapters: set_adapter and disabling follow PEFT."""
    ctx = quiet()
    try:
        base = case.build()
        pm = get_peft_model(copy.deepcopy(base), configs[0])
        pm.add_adapter("other", configs[1])
        randomize(pm, prefixes)
        pm.eval()
        pm.save_pretrained(tmp_path)
        ours = copy.deepcopy(base)
        S.load_adapter(ours, tmp_path)
        S.load_adapter(ours, tmp_path / "other", "other")
        plain = output(case, base)
        assert diff(output(case, ours), output(case, pm)) <= ATOL
        for active in ("other", ["default", "other"], "default"):
            pm.base_model.set_adapter(active)
            S.set_adapter(ours, active)
            pm.eval()
            assert diff(output(case, ours), output(case, pm)) <= ATOL
        with pm.disable_adapter(), S.disable_adapters(ours):
            assert diff(output(case, ours), plain) <= ATOL
        with pytest.raises(UserError, match="adapter_names"):
            case.output(ours, adapter_names=["default"] * len(next(iter(case.inputs().values()))))
    finally:
        ctx.__exit__(None, None, None)


def check_classic_placement(config, spec: str, tmp_path: Path) -> None:
    """With no target rule the method goes where PEFT's default table puts it (Llama), and the
    checkpoint loads back into PEFT with the same outputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = CASES["llama"].build()
        pm = get_peft_model(copy.deepcopy(base), config)
        ours = copy.deepcopy(base)
        surgeon.apply(spec, ours)
        targets = {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}
        assert {n for n, _ in adapted_layers(ours)} == targets
        S.save_pretrained(ours, tmp_path)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        assert diff(output(CASES["llama"], back), output(CASES["llama"], ours)) <= 1e-5
