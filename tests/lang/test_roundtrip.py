"""The printer is the parser's inverse: parse(print_spec(s)) == s, for examples and generated Specs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings

from surgeon.lang import load_spec, parse, print_spec
from tests.lang.strategies import specs

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.peft"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 9


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_round_trips(path: Path):
    spec = load_spec(path)
    printed = print_spec(spec)
    assert parse(printed) == spec
    assert print_spec(parse(printed)) == printed  # canonical text is a fixed point


@settings(max_examples=100)
@given(specs())
def test_generated_specs_round_trip(spec):
    printed = print_spec(spec)
    again = parse(printed, file="generated.peft")
    assert again == spec, printed
    assert print_spec(again) == printed


def test_printer_uses_aliases_and_canonical_order():
    spec = parse("adapter a = lora(task_type=CAUSAL_LM, use_dora=true, lora_alpha=32, r=16) { target q }")
    assert [o.name for o in spec.adapters[0].options] == ["r", "lora_alpha", "use_dora", "task_type"]
    head = print_spec(spec).splitlines()[0]
    assert head == "adapter a = lora(r=16, alpha=32, dora=true, task_type=CAUSAL_LM) {"
