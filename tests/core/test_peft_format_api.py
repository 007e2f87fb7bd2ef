"""Checkpoint I/O through the public API: pickles need opt-in, folders follow PEFT's layout."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import surgeon.api as S
from surgeon.peft_format import files
from tests.core.test_oracle import ATOL, max_diff, output, quiet, randomize
from tests.models import CASES


def test_peft_pickle_loads_only_when_allowed(tmp_path: Path):
    case = CASES["mlp"]
    base = case.build()
    ctx = quiet()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=list(case.qv)))
    randomize(pm)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    ctx.__exit__(None, None, None)
    assert (tmp_path / files.PICKLE_NAME).is_file()
    model = copy.deepcopy(base)
    with pytest.raises(files.CheckpointError, match="allow_pickle"):
        S.load_adapter(model, tmp_path)
    assert not any(".lora_" in k for k in model.state_dict())
    S.load_adapter(model, tmp_path, allow_pickle=True)
    assert max_diff(output(case, model), output(case, pm)) <= ATOL


def test_selected_adapters_and_layout(tmp_path: Path):
    case = CASES["mlp"]
    model = S.apply("adapter default = lora(r=2) { target seq.0 }", case.build())
    S.apply("adapter b = lora(r=3) { target seq.2  save seq.4 }", model)
    S.save_pretrained(model, tmp_path / "both")
    assert (tmp_path / "both" / files.WEIGHTS_NAME).is_file()
    assert (tmp_path / "both" / "b" / files.CONFIG_NAME).is_file()
    assert (tmp_path / "both" / "README.md").read_text().startswith("---\nlibrary_name: peft")
    config = json.loads((tmp_path / "both" / "b" / files.CONFIG_NAME).read_text())
    assert config["r"] == 3 and config["inference_mode"] is True and config["modules_to_save"] == ["seq.4"]
    S.save_pretrained(model, tmp_path / "only_b", selected_adapters=["b"])
    assert not (tmp_path / "only_b" / files.WEIGHTS_NAME).exists()
    assert (tmp_path / "only_b" / "b" / files.WEIGHTS_NAME).is_file()
    with pytest.raises(ValueError, match="not in the model"):
        S.save_pretrained(model, tmp_path / "x", selected_adapters=["nope"])


def test_save_then_load_round_trips_saved_modules(tmp_path: Path):
    case = CASES["bert"]
    spec = "adapter default = lora(r=2, bias=all) { target query, value  save classifier }"
    model = S.apply(spec, case.build())
    randomize(model, biases=True)
    S.save_pretrained(model, tmp_path)
    again = S.load_adapter(case.build(), tmp_path)
    with torch.no_grad():
        assert max_diff(case.output(again), case.output(model)) <= ATOL
