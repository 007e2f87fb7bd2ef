"""parse() raises nothing but SpecError, whatever the input; every diagnostic points into the text."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon.lang import SpecError, parse, print_spec

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = [p.read_text(encoding="utf-8") for p in sorted(EXAMPLE_DIR.glob("*.peft"))]
TOKENS = [
    "adapter", "default", "=", "lora", "ia3", "adalora", "loha", "lokr", "(", ")", "{", "}", "[", "]", ",",
    ":", "r", "alpha", "dropout", "dora", "init", "true", "false", "null", "none", "8", "-1", "0.5", "1e-3",
    "target", "exclude", "rank", "on", "save", "feedforward", "tokens", "in", "within", "except", "of",
    "layers", "@attn.q", "@mlp", "@", "all-linear", "q_proj", "Linear", "Dense", '"q_proj"', '"a.*"',
    "/.*q/", "/(/", "#c\n", "\n", "é", "\x00", '"', "/",
]
CHARS = list("adapterlorqv_(){}[]=,:@/\"\\#.-*?0123456789 \n\tLé\x00")


def _check(text: str) -> None:
    """Parse `text`: a Spec that prints back to itself, or a SpecError that points into `text`."""
    try:
        spec = parse(text, file="fuzz.peft")
    except SpecError as e:
        rendered = str(e)
        assert rendered.startswith("fuzz.peft:")
        assert e.errors
        for d in e.diagnostics:
            assert 0 <= d.span.start <= d.span.end <= len(text)
            assert d.span.line >= 1 and d.span.column >= 1
        return
    assert parse(print_spec(spec)) == spec


@settings(max_examples=150)
@given(st.text(max_size=120))
def test_arbitrary_text(text):
    _check(text)


@settings(max_examples=120)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_token_soup(text):
    _check(text)


@settings(max_examples=120)
@given(st.lists(st.sampled_from(CHARS), max_size=80).map("".join))
def test_grammar_characters(text):
    _check(text)


@st.composite
def mutated_examples(draw) -> str:
    """An example with a few random character inserts, deletes and replacements."""
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from(CHARS) | st.characters())
        if op == "insert":
            text = text[:at] + char + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + char + text[at + 1:]
    return text


@settings(max_examples=200)
@given(mutated_examples())
def test_mutated_examples(text):
    _check(text)


def test_pathological_inputs():
    for text in [
        "", " ", "\n" * 50, "#", "adapter", "adapter a = lora(" * 200, "[" * 5000,
        "adapter a = lora(x=" + "[" * 3000 + "1" + "]" * 3000 + ") { target q }",
        "adapter a = lora(x=" + "{a:" * 3000 + "1" + "}" * 3000 + ") { target q }",
        "adapter a = lora(r=" + "9" * 5000 + ") { target q }",
        "adapter a = lora(r=1e999) { target q }",
        "adapter a = lora() { target /" + "(" * 2000 + ")" * 2000 + "/ }",
        "adapter a = lora() { target /a{99999999999}/ }",
        "\ufeffadapter a = lora() { target q }", "\ud800", "\r\n\r\n", "adapter a = lora() { target q }\x1a",
    ]:
        _check(text)
