"""What each construct parses to, where its spans point, and load_spec's inputs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from surgeon.lang import SpecError, diagnose, load_spec, parse
from surgeon.lang.spec import (
    AllLinear,
    Alpha,
    Exclude,
    Feedforward,
    Glob,
    Layers,
    LayerSlice,
    ModuleType,
    Name,
    Rank,
    Regex,
    RoleRef,
    Save,
    Selection,
    Table,
    Target,
    Tokens,
)

TEAM = (Path(__file__).resolve().parents[1] / "golden" / "spec" / "team_example.peft").read_text()


def _text(source: str, node) -> str:
    return source[node.span.start:node.span.end]


def test_team_example_structure():
    spec = parse(TEAM)
    default, other = spec.adapters
    assert (default.name, default.method, other.name, other.method) == ("default", "lora", "other", "ia3")
    assert [(o.name, o.value) for o in default.options] == [
        ("r", 16), ("lora_alpha", 32), ("lora_dropout", 0.05), ("bias", "none"), ("use_dora", False),
        ("task_type", "CAUSAL_LM"),
    ]
    rules = default.rules
    assert rules[0] == Target(Selection((RoleRef("attn.q"), RoleRef("attn.v")), Layers((LayerSlice(0, 16),))))
    assert rules[1] == Target(Selection((AllLinear(),), Layers((LayerSlice(16, None),)), None, (RoleRef("mlp.gate"),)))
    assert rules[2] == Target(Selection((Regex(r".*\.mlp\.fc\d"),)))
    assert rules[3] == Target(Selection((Name("q_proj"), Name("mlp.fc1"), Name("out_proj"))))
    assert rules[4] == Target(Selection((Glob("layers.*.q_proj"),)))
    assert rules[5] == Target(Selection((ModuleType("Conv2d"),)))
    assert rules[6] == Target(Selection((RoleRef("attn.q"),), within="language_model"))
    assert rules[7] == Target(Selection((Name("q_proj"),), Layers((LayerSlice(0, 4), 7, -1), ("h",))))
    assert rules[8] == Exclude(Selection((Name("lm_head"),)))
    assert rules[9] == Rank(64, Selection((RoleRef("mlp.down"),)))
    assert rules[10] == Alpha(8, Selection((), Layers((LayerSlice(-2, None),))))
    assert rules[11] == Save(("score", "classifier"))
    assert rules[12] == Tokens("embed_tokens", (0, 1, 2))
    assert other.rules == (
        Target(Selection((Name("k_proj"), Name("v_proj"), Name("down_proj")))),
        Feedforward(Selection((Name("down_proj"),))),
    )
    assert other.option("init_ia3_weights") is True and other.option("fan_in_fan_out") is False


def test_spans_point_at_what_they_describe():
    spec = parse(TEAM, file="team.peft")
    rules = spec.adapters[0].rules
    assert [_text(TEAM, a) for a in rules[0].selection.include] == ["@attn.q", "@attn.v"]
    assert _text(TEAM, rules[0].selection.layers) == "layers[0:16]"
    assert _text(TEAM, rules[0].selection) == "@attn.q, @attn.v in layers[0:16]"
    assert _text(TEAM, rules[0]) == "target @attn.q, @attn.v in layers[0:16]"
    assert _text(TEAM, rules[2].selection.include[0]) == r"/.*\.mlp\.fc\d/"
    assert _text(TEAM, rules[3].selection.include[2]) == '"out_proj"'
    assert _text(TEAM, spec.adapters[0].options[2]) == "dropout=0.05"
    assert rules[0].selection.include[0].span.location() == "team.peft:3:12"
    assert spec.file == "team.peft" and spec.source == TEAM


def test_values():
    spec = parse('adapter a = lora(megatron_config={x: [1, 2.5, "s", null, true], "k.y": {}}) { target q }')
    value = spec.adapters[0].option("megatron_config")
    assert value == Table((("x", (1, 2.5, "s", None, True)), ("k.y", Table(()))))
    assert value.to_dict() == {"x": [1, 2.5, "s", None, True], "k.y": {}}


def test_defaults_come_from_the_vocabulary():
    adapter = parse("adapter a = lora() { target q }").adapters[0]
    assert adapter.options == ()
    assert (adapter.option("r"), adapter.option("lora_alpha"), adapter.option("bias")) == (8, 8, "none")


def test_keywords_are_names_where_a_name_is_expected():
    spec = parse("adapter target = lora(alpha=4) { target rank, on, alpha.in save tokens }")
    assert spec.adapters[0].name == "target"
    assert spec.adapters[0].rules[0].selection.include == (Name("rank"), Name("on"), Name("alpha.in"))
    assert spec.adapters[0].rules[1] == Save(("tokens",))


@pytest.mark.parametrize("text, line, column, message", [
    ("adapter a = lora() {\n    target @attn.qq\n}", 2, 12, "unknown role '@attn.qq'"),
    ("adapter a = lroa() { target q }", 1, 13, "unknown method 'lroa'"),
    ("adapter a = lora(\n  alpah=8) { target q }", 2, 3, "unknown option 'alpah' for lora"),
    ("adapter a = ia3(dora=true) { target q }", 1, 17, "ia3 adapters have no option 'dora'"),
    ("adapter a = lora(bias=nonee) { target q }", 1, 23, "the option 'bias' must be one of"),
    ("adapter a = lora() {\n  target q in layers[0:2, 3:3]\n}", 2, 27, "the layer range '3:3' selects no layers"),
    ("adapter a = lora() { target q }\n\nadapter a = lora() { target v }", 3, 9, "the adapter 'a' is defined twice"),
    ("adapter a = lora() { target q\n  feedforward q }", 2, 3, "'feedforward' rules apply only to ia3"),
    ("adapter a = lora() { target layers[1] }", 1, 29, "a 'target' rule must name modules"),
    ("adapter a = lora() { target Dense }", 1, 29, "unknown module type 'Dense'"),
    ("adapter a = lora() {\n\ttarget q v }", 2, 11, "unexpected name 'v'"),
    ("adapter a = lora() { target q", 1, 30, "unexpected end of file"),
    ("adapter a = lora() { target ü }", 1, 29, "unexpected character 'ü'"),
])
def test_error_positions(text, line, column, message):
    with pytest.raises(SpecError) as info:
        parse(text, file="x.peft")
    first = info.value.errors[0]
    assert (first.span.line, first.span.column) == (line, column)
    assert first.message.startswith(message)
    assert str(info.value).startswith(f"x.peft:{line}:{column}: error: {message}")


def test_every_semantic_error_is_collected():
    text = "adapter a = lora(r=0) { target @x, Dense in layers[2:1] }\nadapter a = ia3(dora=true) { target q }"
    with pytest.raises(SpecError) as info:
        parse(text)
    assert len(info.value.errors) == 6
    starts = [d.span.start for d in info.value.diagnostics]
    assert starts == sorted(starts)


def test_warnings_do_not_raise():
    spec, diags = diagnose("adapter a = adalora(r=4, total_step=10) { target q }")
    assert spec is not None
    assert [(d.severity, d.message) for d in diags] == [("warning", "adalora ignores 'r'")]


def test_spec_error_pickles():
    with pytest.raises(SpecError) as info:
        parse("adapter a = lroa() { target q }")
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.diagnostics == info.value.diagnostics


def test_load_spec_from_text_path_and_str_path(tmp_path):
    text = "adapter a = lora(r=4) { target q }\n"
    file = tmp_path / "a.peft"
    file.write_text(text)
    assert load_spec(text) == load_spec(file) == load_spec(str(file))
    assert load_spec(file).file == str(file)
    with pytest.raises(SpecError) as info:
        file.write_text("adapter a = lroa() { target q }\n")
        load_spec(file)
    assert str(info.value).startswith(f"{file}:1:13: error:")
    with pytest.raises(FileNotFoundError):
        load_spec(tmp_path / "missing.peft")
    with pytest.raises(FileNotFoundError):
        load_spec("missing.peft")


def test_load_spec_rejects_invalid_utf8(tmp_path):
    file = tmp_path / "bad.peft"
    file.write_bytes(b"adapter a = lora() {\n  target q\xff\n}\n")
    with pytest.raises(SpecError) as info:
        load_spec(file)
    assert (info.value.errors[0].span.line, info.value.errors[0].span.column) == (2, 11)
    assert "not valid UTF-8" in str(info.value)
