"""task_type heads: PEFT's task models (PeftModelForSequenceClassification, ...ForTokenClassification,
...ForQuestionAnswering) add `classifier`/`score` (`qa_outputs`) to modules_to_save. A spec with
that task_type and no `save` rule must plan, apply and write what PEFT does, so the checkpoint
loads in PEFT with the same outputs, and PEFT's checkpoint loads in surgeon the same way.

PEFT is the oracle: its task model (get_peft_model) for the same LoraConfig.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

from surgeon.planning.planner import plan
from surgeon.runtime.saved import SavedModule
from surgeon.runtime.wrappers import wrappers_of
from tests.models import _DECODER, VOCAB, ModelCase, _hf, token_inputs

S = importlib.import_module("surgeon.api")  # `surgeon.api` the attribute may be a function
ATOL = 1e-5
_BERT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, vocab_size=VOCAB, pad_token_id=0)

# (case, task_type, target names, extra spec rules, the head PEFT saves)
CASES = [
    pytest.param(ModelCase("bert", _hf("BertConfig", "BertForSequenceClassification", num_labels=3, **_BERT),
                           token_inputs, ("query", "value")), "SEQ_CLS", "", "classifier", id="bert-seq"),
    pytest.param(ModelCase("llama", _hf("LlamaConfig", "LlamaForSequenceClassification", num_labels=3,
                                        num_key_value_heads=2, **_DECODER),
                           token_inputs, ("q_proj", "v_proj")),
                 "SEQ_CLS", "", "score", id="llama-seq"),
    pytest.param(ModelCase("bert", _hf("BertConfig", "BertForTokenClassification", num_labels=5, **_BERT),
                           token_inputs, ("query", "value")), "TOKEN_CLS", "", "classifier", id="bert-token"),
    pytest.param(ModelCase("bert", _hf("BertConfig", "BertForQuestionAnswering", **_BERT),
                           token_inputs, ("query", "value")), "QUESTION_ANS", "", "qa_outputs", id="bert-qa"),
    # a user `save` naming the head too, and another module: the head is saved once
    pytest.param(ModelCase("bert", _hf("BertConfig", "BertForSequenceClassification", num_labels=3, **_BERT),
                           token_inputs, ("query", "value")), "SEQ_CLS", "classifier, pooler.dense",
                 "classifier", id="bert-seq-save"),
]


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


def _kw(case: ModelCase, task_type: str, save: str) -> dict:
    extra = {"modules_to_save": [n.strip() for n in save.split(",")]} if save else {}
    return dict(r=4, lora_alpha=8, target_modules=list(case.qv), task_type=task_type, **extra)


def _spec(case: ModelCase, task_type: str, save: str) -> str:
    rules = f"target {', '.join(case.qv)}" + (f"  save {save}" if save else "")
    return f"adapter default = lora(r=4, alpha=8, task_type={task_type}) {{ {rules} }}"


def _peft(case: ModelCase, task_type: str, save: str):
    ctx = _quiet()
    try:
        return get_peft_model(case.build(), LoraConfig(**_kw(case, task_type, save)))
    finally:
        ctx.__exit__(None, None, None)


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 7) -> int:
    """Non-zero lora_B and a changed saved head copy, so a missing tensor shows in the outputs."""
    g, touched = torch.Generator().manual_seed(seed), 0
    for name, p in model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
            touched += "modules_to_save" in name
    return touched


@torch.no_grad()
def _out(case: ModelCase, model) -> torch.Tensor:
    return case.output(model).detach().clone()


def _wrapped(pm) -> set[str]:
    base = pm.base_model.model
    return {p for p, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper)}


@pytest.mark.parametrize("case,task_type,save,head", CASES)
def test_plan_saves_what_peft_task_model_saves(case, task_type, save, head):
    pm = _peft(case, task_type, save)
    got = plan(_spec(case, task_type, save), case.build())
    assert set(got.adapter("default").save) == _wrapped(pm)
    assert got.adapter("default").heads == (head,)
    assert list(got.paths()) == [n.removeprefix("base_model.model.") for n in pm.targeted_module_names]
    assert got.trainable_params == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert any(line.startswith("save (default):") and f"{head} (task head)" in line
               for line in str(got).splitlines())


def test_heads_inside_saved_head_are_not_targets():
    """RoBERTa's `classifier` is a block: PEFT's modules_to_save guard keeps all-linear out of it."""
    case = ModelCase("roberta", _hf("RobertaConfig", "RobertaForSequenceClassification", num_labels=3,
                                    **{**_BERT, "pad_token_id": 1}), token_inputs, ("all-linear",))
    ctx = _quiet()
    pm = get_peft_model(case.build(), LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    ctx.__exit__(None, None, None)
    got = plan("adapter default = lora(r=4, task_type=SEQ_CLS) { target all-linear }", case.build())
    assert list(got.paths()) == [n.removeprefix("base_model.model.") for n in pm.targeted_module_names]
    assert not any(p.startswith("classifier") for p in got.paths())
    assert got.adapter("default").save == ("classifier",)
    assert got.trainable_params == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_no_heads_without_a_task_type_that_saves_them():
    case = CASES[0].values[0]
    for task_type in ("CAUSAL_LM", "FEATURE_EXTRACTION"):
        got = plan(_spec(case, task_type, ""), case.build())
        assert got.adapter("default").save == () and "save (" not in str(got)


@pytest.mark.parametrize("case,task_type,save,head", CASES)
def test_surgeon_checkpoint_loads_in_peft(tmp_path: Path, case, task_type, save, head):
    model = S.apply(_spec(case, task_type, save), case.build())
    assert _perturb(model) > 0
    S.save_pretrained(model, tmp_path / "surgeon")
    pm = _peft(case, task_type, save)  # what PEFT itself writes for the same config
    pm.save_pretrained(tmp_path / "peft")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                    for d in ("surgeon", "peft"))
    assert ours["modules_to_save"] == list(dict.fromkeys(theirs["modules_to_save"]))
    assert ours["task_type"] == theirs["task_type"] == task_type
    keys = [set(load_file(tmp_path / d / "adapter_model.safetensors")) for d in ("surgeon", "peft")]
    assert keys[0] == keys[1] and any(f"{head}." in k for k in keys[0])
    ctx = _quiet()
    loaded = PeftModel.from_pretrained(case.build(), tmp_path / "surgeon")
    ctx.__exit__(None, None, None)
    want = _out(case, model)
    assert (want - _out(case, case.build())).abs().max().item() > 1e-3  # the adapter matters
    assert (_out(case, loaded) - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("case,task_type,save,head", CASES[:4])
def test_peft_checkpoint_loads_in_surgeon(tmp_path: Path, case, task_type, save, head):
    pm = _peft(case, task_type, save)
    assert _perturb(pm) > 0
    pm.save_pretrained(tmp_path)
    model = S.load_adapter(case.build(), tmp_path)
    assert head in dict(wrappers_of(model, SavedModule))
    assert (_out(case, model) - _out(case, pm)).abs().max().item() <= ATOL
    S.save_pretrained(model, tmp_path / "back")  # and surgeon writes it back as PEFT did
    ours = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert ours["modules_to_save"] == list(dict.fromkeys(pm.peft_config["default"].modules_to_save))

