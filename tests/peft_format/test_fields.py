"""The field tables in `surgeon.peft_format.fields` against peft's config classes (the oracle)."""

from __future__ import annotations

import json
import warnings

import pytest
from peft import AdaLoraConfig, HRAConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, VeraConfig

from surgeon.lang.spec import Adapter
from surgeon.peft_format.config import peft_config_from_adapter
from surgeon.peft_format.fields import default_of, peft_fields, role_of, same_value, selectors

CLASSES = {"lora": LoraConfig, "ia3": IA3Config, "adalora": AdaLoraConfig, "loha": LoHaConfig,
           "lokr": LoKrConfig, "vera": VeraConfig,
           "oft": OFTConfig, "hra": HRAConfig}
REQUIRED = {"adalora": {"total_step": 1}}


def peft_defaults(method: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = CLASSES[method](**REQUIRED.get(method, {})).to_dict()
    return json.loads(json.dumps(config, default=str))


@pytest.mark.parametrize("method", list(CLASSES))
def test_fields_are_peft_fields_in_to_dict_order(method):
    assert list(peft_fields(method)) == list(peft_defaults(method))


@pytest.mark.parametrize("method", list(CLASSES))
def test_defaults_are_peft_defaults(method):
    expected = peft_defaults(method)
    for field in peft_fields(method):
        if field in ("peft_version",) or field in REQUIRED.get(method, {}):
            continue
        assert default_of(method, field) == expected[field], field


@pytest.mark.parametrize("method", list(CLASSES))
def test_every_field_has_a_role(method):
    roles = {f: role_of(method, f) for f in peft_fields(method)}
    assert {f for f, r in roles.items() if r == "selector"} == selectors(method)
    assert set(roles.values()) <= {"option", "selector", "bookkeeping", "ignored", "unsupported"}
    # everything PEFT's tuner reads for these methods is an option or a selector
    unsupported = {f for f, r in roles.items() if r == "unsupported"}
    assert not unsupported or method == "adalora", unsupported


@pytest.mark.parametrize("method", list(CLASSES))
def test_an_empty_adapter_writes_peft_defaults(method):
    written = peft_config_from_adapter(Adapter("default", method))
    expected = peft_defaults(method)
    expected.pop("peft_version")
    written.pop("peft_version")
    # no target rule (and, for IA3, no feedforward rule): PEFT's per-architecture default, i.e. null
    assert written["target_modules"] is None
    for key, value in REQUIRED.get(method, {}).items():
        written[key] = value
    assert written == expected


def test_same_value_tells_bools_from_ints():
    assert not same_value(True, 1) and same_value(8, 8.0) and same_value((1, True), (1, True))
    assert not same_value((1,), (True,)) and not same_value("8", 8)


def test_ia3_targets_without_feedforward_write_none_not_the_table():
    from surgeon.lang.spec import Name, Selection, Target

    adapter = Adapter("default", "ia3", rules=(Target(Selection((Name("k"),))),))
    assert peft_config_from_adapter(adapter)["feedforward_modules"] == []
