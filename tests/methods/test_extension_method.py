"""The extension point, proven from outside the package: a small method defined here (a trainable
per-output-channel scale, `y = base(x) * (1 + s)`) is registered with `surgeon.methods.register`
and then parses, plans, applies, trains a step, merges, unmerges, saves and reloads, with no
change to surgeon/. Every expectation is checked against plain torch math, not surgeon's output.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import surgeon
from surgeon import methods
from surgeon.lang.kinds import Number
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig

VECTOR = "chanscale_vector"


class ChannelScale:
    """The runtime part: one vector per adapter, multiplying the base output channel-wise."""

    name = "chanscale"
    containers = ((VECTOR, nn.ParameterDict),)

    def add(self, layer, site) -> None:
        weight = layer.base_layer.weight
        init = float(site.option("init_scale", 0.0))
        layer._modules[VECTOR][site.adapter] = nn.Parameter(
            torch.full((weight.shape[0],), init, dtype=weight.dtype, device=weight.device))

    def remove(self, layer, adapter: str) -> None:
        layer._modules[VECTOR].pop(adapter, None)

    def num_params(self, base, site) -> int:
        return base.weight.shape[0]

    def emit(self, b, adapter: str, prev, rows):
        scale = b.attr(f"{VECTOR}.{adapter}")
        if rows is None:
            return b.result(prev, b.call(torch.mul, prev, scale))
        picked = b.call(torch.index_select, prev, 0, rows)
        return b.index_result(prev, rows, b.call(torch.mul, picked, scale), 1.0)

    def check_mixed(self, layer, adapter: str) -> None:
        pass

    def delta_weight(self, layer, adapter: str) -> torch.Tensor:
        return layer.base_layer.weight.detach() * layer._modules[VECTOR][adapter].detach()[:, None]

    def fold(self, layer, adapter: str, weight: torch.Tensor, unmerged: torch.Tensor) -> torch.Tensor:
        return weight * (1 + layer._modules[VECTOR][adapter].detach().to(weight.dtype))[:, None]

    def unfold(self, layer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        return weight / (1 + layer._modules[VECTOR][adapter].detach().to(weight.dtype))[:, None]

    def bias_delta(self, layer, adapter: str) -> torch.Tensor | None:
        bias = layer.base_layer.bias
        return None if bias is None else bias.detach().float() * layer._modules[VECTOR][adapter].detach()

    def clear_caches(self, layer) -> None:
        pass


CONFIG = MethodConfig(
    name="chanscale",
    peft_type="CHANSCALE",
    fields=(Field("init_scale", Number(), 0.0, alias="init", doc="starting scale"),) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("target_modules", "exclude_modules", "modules_to_save", "init_scale"),
    rules=frozenset({"target", "exclude", "save"}),
    site_options=("init_scale", "inference_mode"),
    summary=("init_scale",),
)

SPEC = "adapter default = chanscale(init=0.5) { target fc1, fc2 }"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _expected(model: MLP, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The method's math written out with the original weights."""
    h = torch.tanh(nn.functional.linear(x, model.fc1.weight, model.fc1.bias) * (1 + s1))
    return nn.functional.linear(h, model.fc2.weight, model.fc2.bias) * (1 + s2)


@pytest.fixture
def registered():
    methods.register(CONFIG, ChannelScale())
    yield
    methods.unregister(CONFIG.name)


def _model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def test_parses_checks_and_prints(registered):
    spec = surgeon.load_spec(SPEC)
    assert spec.adapters[0].option("init_scale") == 0.5
    assert surgeon.print_spec(spec).count("chanscale(init=0.5)") == 1
    with pytest.raises(surgeon.SpecError, match="unknown option 'rank'"):
        surgeon.load_spec("adapter a = chanscale(rank=2) { target fc1 }")
    with pytest.raises(surgeon.SpecError, match="'rank' rules apply only to"):
        surgeon.load_spec("adapter a = chanscale() { target fc1  rank 4 on fc1 }")


def test_plans_with_its_own_parameter_count(registered):
    plan = surgeon.plan(SPEC, _model())
    assert [s.path for s in plan.sites] == ["fc1", "fc2"]
    assert plan.trainable_params == 8 + 4
    assert all(s.method == "chanscale" and s.option("init_scale") == 0.5 for s in plan.sites)


def test_applies_trains_merges_saves_and_reloads(registered, tmp_path):
    model, reference = _model(), _model()
    x = torch.randn(5, 6)
    surgeon.apply(SPEC, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"fc1.{VECTOR}.default", f"fc2.{VECTOR}.default"}
    half1, half2 = torch.full((8,), 0.5), torch.full((4,), 0.5)
    torch.testing.assert_close(model(x), _expected(reference, x, half1, half2))

    # one training step moves only the scales, by plain SGD on the analytic loss
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).pow(2).mean().backward()
    optimizer.step()
    s1 = model.fc1._modules[VECTOR]["default"].detach().clone()
    s2 = model.fc2._modules[VECTOR]["default"].detach().clone()
    assert not torch.equal(s1, half1) and not torch.equal(s2, half2)
    torch.testing.assert_close(model.fc1.base_layer.weight, reference.fc1.weight)
    with torch.no_grad():
        trained = model(x)
    torch.testing.assert_close(trained, _expected(reference, x, s1, s2))

    # merge folds diag(1 + s) into the weights; unmerge restores them
    surgeon.merge(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, reference.fc1.weight * (1 + s1)[:, None])
    torch.testing.assert_close(model(x), trained)
    surgeon.unmerge(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, reference.fc1.weight)

    # a PEFT-format folder, and the same outputs after loading it into a fresh model
    surgeon.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "CHANSCALE" and config["init_scale"] == 0.5
    fresh = _model()
    surgeon.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained)


def test_unregistered_method_is_unknown():
    with pytest.raises(surgeon.SpecError, match="unknown method 'chanscale'"):
        surgeon.load_spec(SPEC)
