"""The `param` selector (bare parameters, LoRA's target_parameters) and `@moe.up`/`@moe.down`:
parsing, printing, located errors, and the PEFT config written without a model (checked by
constructing peft's LoraConfig from it and by PEFT's own matching on a model)."""

from __future__ import annotations

import pytest
from peft import LoraConfig

from surgeon.lang import SpecError, parse
from surgeon.lang.printer import print_spec
from surgeon.lang.spec import Name, Param, RoleRef, Target
from surgeon.peft_format.config import peft_config_from_adapter

TEXT = ('adapter default = lora(r=4) {\n'
        '    target @moe.down, param experts.gate_up_proj, param "mix-1.proj", q_proj\n'
        '    rank 8 on param gate_up_proj\n'
        '}\n')


def test_param_atoms_parse_with_spans():
    spec = parse(TEXT, file="x.peft")
    (target,) = spec.adapters[0].rules_of(Target)
    atoms = target.selection.include
    assert atoms == (RoleRef("moe.down"), Param("experts.gate_up_proj"), Param("mix-1.proj"), Name("q_proj"))
    assert [TEXT[a.span.start:a.span.end] for a in atoms[1:3]] == [
        "param experts.gate_up_proj", 'param "mix-1.proj"']


def test_printing_reads_back_to_the_same_spec():
    spec = parse(TEXT)
    printed = print_spec(spec)
    assert "param experts.gate_up_proj" in printed and 'param "mix-1.proj"' in printed
    assert parse(printed) == spec
    module_named_param = parse('adapter a = lora() { target "param" }')
    assert parse(print_spec(module_named_param)) == module_named_param


@pytest.mark.parametrize("text, line, column, message", [
    ("adapter a = lora() {\n  exclude param x\n}", 2, 11, "a 'exclude' rule selects modules, not parameters"),
    ("adapter a = lora() { target q except param x }", 1, 38, "`except` removes modules"),
    ("adapter a = ia3() { target q feedforward param x }", 1, 42, "a 'feedforward' rule selects modules"),
    ("adapter a = lora() { target param \"a..b\" }", 1, 29, "the parameter name 'a..b' has an empty dot segment"),
    ("adapter a = lora() { target param }", 1, 35, "unexpected"),
])
def test_errors_are_located(text, line, column, message):
    with pytest.raises(SpecError) as info:
        parse(text, file="x.peft")
    first = info.value.errors[0]
    assert (first.span.line, first.span.column) == (line, column)
    assert str(info.value).startswith(f"x.peft:{line}:{column}: error: {message}")
    assert "^" in str(info.value)


def test_model_free_config_is_peft_target_parameters():
    config = peft_config_from_adapter(parse(TEXT.replace("@moe.down, ", "")).adapters[0])
    assert config["target_modules"] == ["q_proj"]
    assert config["target_parameters"] == ["experts.gate_up_proj", "mix-1.proj"]
    assert config["rank_pattern"] == {"gate_up_proj": 8}
    peft = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    assert peft.target_parameters == ["experts.gate_up_proj", "mix-1.proj"]
    only = peft_config_from_adapter(parse("adapter a = lora() { target param w }").adapters[0])
    assert only["target_modules"] == [] and only["target_parameters"] == ["w"]
