"""Class 1: a backtracking regex selector (in a spec or a PEFT config) cannot hang a command;
it fails within its budget, located at the rule."""

from __future__ import annotations

import json
import time

import pytest

from surgeon.errors import UserError
from surgeon.lang.matching import RegexTooSlow, full_matches
from surgeon.planning.planner import plan
from surgeon.planning.select import PlanError
from tests.hostile.common import EVIL_REGEX, assert_exit_2, cli, net


def test_matcher_agrees_with_re_on_ordinary_patterns():
    import re

    paths = ["a.q_proj", "b.k_proj", "model.layers.0.self_attn.q_proj", "x"]
    for pattern in (r".*q_proj", r"(?i).*Q_PROJ", r"model\.layers\.\d+\..*", r"a|x", r".*\.(q|k)_proj"):
        assert full_matches(pattern, paths) == [p for p in paths if re.fullmatch(pattern, p)]


def test_invalid_pattern_raises_re_error():
    import re

    with pytest.raises(re.error):
        full_matches("(", ["a"])


def test_backtracking_pattern_trips_the_budget_fast():
    start = time.monotonic()
    with pytest.raises(RegexTooSlow) as caught:
        full_matches(EVIL_REGEX, ["encoder_layers_with_a_long_name.0.query_projection_matrix"], budget=0.3)
    assert time.monotonic() - start < 5
    assert isinstance(caught.value, UserError) and EVIL_REGEX in str(caught.value)


def test_spec_regex_error_is_located(monkeypatch):
    monkeypatch.setattr("surgeon.lang.matching.BUDGET_S", 0.3)
    text = f"adapter default = lora(r=2) {{\n    target /{EVIL_REGEX}/\n}}\n"
    with pytest.raises(PlanError) as caught:
        plan(text, net())
    message = str(caught.value)
    assert ":2:" in message and "^" in message and "backtracking" in message


def test_peft_config_regex_cannot_hang_load(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import surgeon

    monkeypatch.setattr("surgeon.lang.matching.BUDGET_S", 0.3)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": EVIL_REGEX}))
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="backtracking"):
        surgeon.load_adapter(model, tmp_path)
    assert all((before[k] == v).all() for k, v in model.state_dict().items())


def test_cli_plan_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("surgeon.lang.matching.BUDGET_S", 0.3)
    spec = tmp_path / "evil.peft"
    spec.write_text(f"adapter default = lora(r=2) {{ target /{EVIL_REGEX}/ }}\n")
    outcome = cli(capsys, "plan", spec, "--model", "py:tests/hostile/common.py:net")
    assert_exit_2(outcome, "evil.peft:1:", "backtracking")


def test_layer_stack_names_are_plain_names():
    """PEFT puts layers_pattern into a regex unescaped: only plain names get that far."""
    from surgeon.lang import SpecError, load_spec
    from surgeon.peft_format.config import ConversionError, spec_from_peft_config

    with pytest.raises(SpecError, match="not a plain name"):
        load_spec('adapter default = lora() { target q in layers[0] of "(a+)+" }')
    with pytest.raises(ConversionError, match="layers_pattern"):
        spec_from_peft_config({"peft_type": "LORA", "target_modules": ["q"], "layers_to_transform": [0],
                               "layers_pattern": EVIL_REGEX})
    load_spec('adapter default = lora() { target q in layers[0] of "h", "blocks.0-x" }')
