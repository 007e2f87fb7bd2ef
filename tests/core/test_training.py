"""The adapted host model trains, generates, compiles and checkpoints like PEFT's.

PEFT is the oracle: it loads surgeon's initial checkpoint (`is_trainable=True`), so both start
from identical weights and every step can be compared.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import surgeon.api as S
from tests.core.test_oracle import max_diff, quiet, randomize
from tests.models import CASES, tiny_llama

QV = "adapter default = lora(r=4, alpha=8) { target q_proj, v_proj }"


def _twins(case_model, spec: str, tmp_path: Path, *, trainable: bool = True):
    """Surgeon's adapted model and PEFT's model loaded from its checkpoint, same weights."""
    base = case_model()
    ours = S.apply(spec, copy.deepcopy(base))
    randomize(ours)
    S.save_pretrained(ours, tmp_path)
    ctx = quiet()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=trainable)
    ctx.__exit__(None, None, None)
    return ours, peft


def _loss(model, x, y) -> torch.Tensor:
    return torch.nn.functional.nll_loss(model(X=x), y)


def test_training_lowers_the_loss_like_peft(tmp_path: Path):
    case = CASES["mlp"]
    ours, peft = _twins(case.build, "adapter default = lora(r=4) { target seq.0, seq.2 }", tmp_path)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    theirs = {n.removeprefix("base_model.model.") for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable == theirs
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 20, generator=g), torch.randint(0, 2, (16,), generator=g)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, peft)]
    ours.train(), peft.train()
    losses = []
    for _ in range(15):
        step = []
        for model, opt in zip((ours, peft), opts):
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            opt.step()
            step.append(loss.item())
        losses.append(step)
    assert all(abs(a - b) <= 1e-5 for a, b in losses)
    assert losses[-1][0] < 0.8 * losses[0][0]
    frozen = {n: p for n, p in ours.named_parameters() if not p.requires_grad}
    assert all(p.grad is None for p in frozen.values())


def test_generate_matches_peft(tmp_path: Path):
    case = CASES["llama"]
    ours, peft = _twins(case.build, QV, tmp_path, trainable=False)
    ids = case.inputs()["input_ids"]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mine = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        theirs = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(mine, theirs)
    with S.disable_adapters(ours), torch.no_grad():
        plain = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert plain.shape == mine.shape


def test_generate_with_mixed_adapter_rows_matches_peft(tmp_path: Path):
    case = CASES["llama"]
    base = case.build()
    ours = S.apply(QV + "adapter other = lora(r=2, alpha=8) { target q_proj, k_proj }", copy.deepcopy(base))
    randomize(ours)
    S.save_pretrained(ours, tmp_path)
    ctx = quiet()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    peft.load_adapter(tmp_path / "other", adapter_name="other")
    ctx.__exit__(None, None, None)
    ids = case.inputs()["input_ids"][:1].repeat(3, 1)
    rows = ["default", "other", "__base__"]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours.eval()
    with torch.no_grad(), S.adapter_rows(ours, rows):
        mine = ours.generate(input_ids=ids, **kw)
    with torch.no_grad():
        theirs = peft.generate(input_ids=ids, adapter_names=rows, **kw)
        logits = ours(input_ids=ids, adapter_names=rows).logits
    assert torch.equal(mine, theirs)
    assert not torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], logits[2])
    with pytest.raises(ValueError, match="unknown adapter"):
        with S.adapter_rows(ours, ["nope", "default", "default"]):
            pass


def test_gradient_checkpointing_gives_the_same_grads():
    case = CASES["llama"]

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = S.apply(QV, tiny_llama())
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        ids = case.inputs()["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    assert all(max_diff(plain[k], checkpointed[k]) <= 1e-6 for k in plain)


def test_compiled_model_agrees_without_graph_breaks():
    case = CASES["llama"]
    model = S.apply(QV, case.build())
    S.apply(QV.replace("default", "other"), model)
    randomize(model)
    x = case.inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert max_diff(compiled(**x).logits, model(**x).logits) <= 1e-6
        S.set_adapter(compiled, "other")  # the API accepts the compiled wrapper
        assert max_diff(compiled(**x).logits, model(**x).logits) <= 1e-6


def test_compiled_model_routes_mixed_rows():
    case = CASES["mlp"]
    spec = "adapter default = lora(r=4) { target seq.0, seq.2 }"
    model = S.apply(spec.replace("default", "other"), S.apply(spec, case.build()))
    randomize(model)
    x, rows = case.inputs(), ["other", "default", "__base__", "other"]
    torch._dynamo.reset()
    # the first mixed call lowers its graph inside forward (a graph break), so no fullgraph
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert max_diff(compiled(**x, adapter_names=rows), model(**x, adapter_names=rows)) <= 1e-6
        assert max_diff(compiled(**x), model(**x)) <= 1e-6


@pytest.mark.slow
def test_inductor_compiles_an_adapted_mlp():
    case = CASES["mlp"]
    model = S.apply("adapter default = lora(r=4) { target seq.0, seq.2 }", case.build())
    randomize(model)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        assert max_diff(compiled(**case.inputs()), model(**case.inputs())) <= 1e-5


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loaded_adapter_trains_only_when_asked_like_peft(tmp_path: Path, is_trainable: bool):
    case = CASES["llama"]
    ours, peft = _twins(case.build, QV, tmp_path, trainable=is_trainable)
    loaded = S.load_adapter(case.build(), tmp_path, is_trainable=is_trainable)
    mine = {n for n, p in loaded.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model.") for n, p in peft.named_parameters() if p.requires_grad}
    assert mine == theirs
    assert bool(mine) == is_trainable
