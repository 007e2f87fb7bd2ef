"""`apply` is a transaction, marks exactly what trains (PEFT's rule), and adds adapters.

A failure injected at any step (planning, building a layer, swapping, adding an adapter to an
existing layer, marking gradients) must leave the model exactly as it was: the same module
objects at every path, the same state_dict, the same requires_grad flags, no hooks, no state.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

import surgeon.api as S
from surgeon.planning.select import PlanError
from surgeon.runtime.adapted import AdaptedLayer
from surgeon.runtime.state import require_state, state_of
from tests.core.test_oracle import quiet
from tests.models import CASES

# the transaction module (the public function `surgeon.apply` lives in surgeon.api)
A = importlib.import_module("surgeon.runtime.transaction")

QV = "adapter default = lora(r=4, alpha=8) { target q_proj, v_proj }"
OTHER = "adapter other = lora(r=2) { target all-linear }"


def snapshot(model: torch.nn.Module):
    return (
        [(n, id(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        (len(model._forward_pre_hooks), len(model._forward_hooks)),
        state_of(model),
    )


def assert_same(model, snap) -> None:
    modules, tensors, grads, hooks, state = snapshot(model)
    assert modules == snap[0]
    assert tensors.keys() == snap[1].keys() and all(torch.equal(tensors[k], snap[1][k]) for k in tensors)
    assert grads == snap[2] and hooks == snap[3] and state == snap[4]


class Boom(RuntimeError):
    pass


def fail_on(n: int, fn):
    """Wrap `fn` so that its n-th call raises Boom."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"injected failure at call {n}")
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def llama():
    return CASES["llama"].build()


# --------------------------------------------------------------------------- transactions


def test_failure_while_swapping_rolls_back(llama, monkeypatch):
    snap = snapshot(llama)
    monkeypatch.setattr(A.Transaction, "swap", fail_on(3, A.Transaction.swap))
    with pytest.raises(Boom):
        S.apply(QV, llama)
    assert_same(llama, snap)


def test_failure_while_building_touches_nothing(llama, monkeypatch):
    snap = snapshot(llama)
    monkeypatch.setattr(AdaptedLayer, "__init__", fail_on(2, AdaptedLayer.__init__))
    with pytest.raises(Boom):
        S.apply(QV, llama)
    assert_same(llama, snap)


def test_bad_site_touches_nothing(llama):
    snap = snapshot(llama)
    with pytest.raises(Exception, match="input_layernorm"):  # a norm is no adaptable layer
        S.apply("adapter default = lora { target q_proj, input_layernorm }", llama)
    assert_same(llama, snap)


def test_failure_after_swaps_restores_grads(llama, monkeypatch):
    snap = snapshot(llama)
    monkeypatch.setattr(A, "install_hooks", fail_on(1, A.install_hooks))
    with pytest.raises(Boom):
        S.apply(QV, llama)
    assert_same(llama, snap)


def test_failure_adding_to_adapted_model_rolls_back(llama, monkeypatch):
    S.apply(QV, llama)
    snap = snapshot(llama)
    monkeypatch.setattr(AdaptedLayer, "add_adapter", fail_on(3, AdaptedLayer.add_adapter))
    with pytest.raises(Boom):
        S.apply(OTHER, llama)
    assert_same(llama, snap)
    assert S.active_adapters(llama) == ("default",)


def test_bad_checkpoint_reports_everything_and_touches_nothing(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    ctx = quiet()
    pm = get_peft_model(copy.deepcopy(llama), LoraConfig(target_modules=["q_proj", "v_proj"], bias="all"))
    pm.save_pretrained(tmp_path)
    ctx.__exit__(None, None, None)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    keys = sorted(tensors)
    del tensors[keys[0]]  # missing
    tensors[keys[1]] = torch.zeros(3, 3)  # wrong shape
    tensors["base_model.model.model.nowhere.weight"] = torch.zeros(1)  # unexpected
    save_file(tensors, file)
    for model in (llama, S.apply(QV.replace("default", "first"), copy.deepcopy(llama))):
        snap = snapshot(model)
        with pytest.raises(ValueError) as err:
            S.load_adapter(model, tmp_path)
        text = str(err.value)
        assert "3 problem(s)" in text and "missing key" in text and "shape mismatch" in text
        assert "unexpected key" in text
        assert_same(model, snap)


# --------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_parameters_equal_peft(bias):
    case = CASES["bert"]
    config = LoraConfig(target_modules=["query", "value"], bias=bias, modules_to_save=["classifier"])
    ctx = quiet()
    pm = get_peft_model(case.build(), config)
    ctx.__exit__(None, None, None)
    expected = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
    ours = S.apply(f"adapter default = lora(bias={bias}) {{ target query, value  save classifier }}",
                   case.build())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == expected
    assert "classifier.modules_to_save.default.weight" in ours.state_dict()


def test_second_apply_adds_an_inactive_frozen_adapter(llama):
    S.apply(QV, llama)
    S.apply(OTHER, llama)
    assert require_state(llama).names == ("default", "other")
    assert S.active_adapters(llama) == ("default",)
    grads = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert grads and all(".default." in n for n in grads)
    q = llama.model.layers[0].self_attn.q_proj
    assert isinstance(q, AdaptedLayer) and set(q.sites) == {"default", "other"}
    assert not isinstance(q.base_layer, AdaptedLayer)  # the planner saw the model unadapted
    with pytest.raises(ValueError, match="already exists"):
        S.apply(OTHER, llama)
    S.apply(OTHER, llama, adapter_name="third")
    assert require_state(llama).names == ("default", "other", "third")


def test_unload_gives_back_the_original_modules(llama):
    q = llama.model.layers[1].self_attn.q_proj
    S.apply(QV, llama)
    plain = S.unload(llama)
    assert plain.model.layers[1].self_attn.q_proj is q
    assert state_of(plain) is None and not plain._forward_pre_hooks
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())


def test_methods_not_lowered_are_refused(llama):
    from tests.methods.parsed_only import parsed_only_method

    snap = snapshot(llama)
    with parsed_only_method(), pytest.raises(PlanError, match="parsedonly` is parsed and converted but not yet"):
        S.apply("adapter default = parsedonly() { target k_proj }", llama)
    assert_same(llama, snap)


def test_apply_to_a_32_layer_llama():
    from tests.models import tiny_llama

    model = tiny_llama(layers=32)
    S.apply(QV, model)
    assert sum(isinstance(m, AdaptedLayer) for m in model.modules()) == 64
