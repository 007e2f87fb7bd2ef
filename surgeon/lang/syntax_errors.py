"""The one boundary where Lark's exceptions become diagnostics.

Message: what was found and what the grammar expected, in words. Hint: "did you mean" for a
misspelled keyword, else the label of the closest known-bad snippet in PEFT_SYNTAX_ERRORS
(Lark's `match_examples`, as `lark.load_grammar.GRAMMAR_ERRORS` does).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr
from lark.parsers.lalr_parser_state import ParserState

from surgeon.lang.diagnostics import Diagnostic, did_you_mean, error
from surgeon.lang.source import span_at
from surgeon.lang.vocabulary import RULE_KEYWORDS

_HEAD = "adapter a = lora() { "


def _body(*rules: str) -> tuple[str, ...]:
    return tuple(_HEAD + r for r in rules)


_BAD_SNIPPETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a spec is a list of adapters: adapter NAME = METHOD(options) { rules }",
     ("target q_proj", "lora(r=8)", "adapter a = lora() {} }")),
    ("an adapter needs a name: adapter default = lora(r=8) { ... }", ("adapter = lora() {}",)),
    ("write '=' and the method after the adapter name: adapter NAME = METHOD(options) { rules }",
     ("adapter a lora() {}", "adapter a")),
    ("the method takes its options in parentheses; write lora() for none", ("adapter a = lora {}",)),
    ("options are written name=value and separated by commas",
     ("adapter a = lora(r 8) {}", "adapter a = lora(r=8 alpha=16) {}", "adapter a = lora(r: 8) {}")),
    ("a value is a number, true, false, null, a word, a \"string\", a [list] or a {key: value} table",
     ("adapter a = lora(r=) {}", "adapter a = lora(r=,) {}")),
    ("rules go in braces after the method: adapter a = lora(r=8) { target q_proj }",
     ("adapter a = lora() target",)),
    ("restrict a selection to layers with 'in': target q_proj in layers[0:4]", _body("target q layers[0] }")),
    ("separate selectors with ',': target q_proj, v_proj", _body("target q v }")),
    ("close the adapter with '}'", _body("target q", "target q, v", "")),
    ("a selection starts with a selector: a name, @role, \"glob\", /regex/, a Type or all-linear",
     _body("target }", "target in layers[0] }", "target q except }")),
    ("layers take indices and slices in brackets: layers[0:4, 7, -1]",
     _body("target q in layers 0 }", "target q in layers[a] }", "target q in layers[] }")),
    ("'in' takes layers[...]; to scope a rule to a submodule use 'within'", _body("target q in model }")),
    ("'rank' takes a number and a selection: rank 16 on @attn.q", _body("rank on q }", "rank 8 q }")),
    ("'alpha' takes a number and a selection: alpha 16 on @attn.q", _body("alpha on q }", "alpha 8 q }")),
    ("'tokens' takes an optional module and a list of indices: tokens embed_tokens [0, 1]",
     _body("tokens 0 }", "tokens e 0 }")),
    ("'save' takes module names: save classifier, score", _body("save }", "save @head }")),
)
_BEFORE = "adapter z = lora() { target x }\n"


def _variants(snippet: str) -> tuple[str, ...]:
    """The snippet, and the same mistake after an earlier adapter, option or rule.

    Lark matches an example by parser state *and stack depth*, and repetition (`rule*`) adds
    one stack entry after its first item, so each mistake is shown both first and later.
    """
    out = [snippet, _BEFORE + snippet]
    if snippet.startswith(_HEAD):
        out.append(snippet.replace("{ ", "{ target x ", 1))
    if "lora(" in snippet and "lora()" not in snippet:
        out.append(snippet.replace("lora(", "lora(x=1, ", 1))
    return tuple(out)


# Known mistakes, each labelled with the hint it earns (Lark's `match_examples`).
PEFT_SYNTAX_ERRORS = tuple(
    (label, tuple(v for s in snippets for v in _variants(s))) for label, snippets in _BAD_SNIPPETS
)

_WORDS = {
    "NAME": "a name", "STRING": "a string", "INT": "an integer", "FLOAT": "a number",
    "ROLE": "a role such as @attn.q", "REGEX": "a regex such as /.*\\.q_proj/", "$END": "the end of the file",
}
_IGNORED = {"WS", "COMMENT"}
_SELECTOR = {"ROLE", "all-linear", "NAME", "STRING", "REGEX"}
_VALUE = {"INT", "FLOAT", "NAME", "STRING", "true", "false", "null", "[", "{"}


def syntax_error(
    e: UnexpectedInput, text: str, file: str, parser: Lark, reparse: Callable[[str], object]
) -> Diagnostic:
    """The diagnostic for one Lark parse error (`reparse` is used to match known snippets)."""
    if isinstance(e, UnexpectedToken):
        return _unexpected_token(e, text, file, parser, reparse)
    if isinstance(e, UnexpectedCharacters):
        return _unexpected_character(e, text, file, parser)
    return error(span_at(file, text, len(text)), "the spec is not complete")


def _keyword(parser: Lark, name: str) -> str | None:
    try:
        pattern = parser.get_terminal(name).pattern
    except KeyError:
        return None
    return pattern.value if isinstance(pattern, PatternStr) else None


def _describe_expected(names: set[str], parser: Lark) -> str:
    terminals = {t.name for t in parser.terminals} | {"$END"}
    names = {n for n in names if n in terminals and n not in _IGNORED}
    words = {n: _keyword(parser, n) for n in names}
    spelled = {words[n] or n for n in names}
    parts: list[str] = []
    if set(RULE_KEYWORDS) <= spelled:
        parts.append("a rule (" + ", ".join(RULE_KEYWORDS) + ")")
        spelled -= set(RULE_KEYWORDS)
    if _VALUE <= spelled:
        parts.append("a value")
        spelled -= _VALUE
    if _SELECTOR <= spelled:
        parts.append("a selector" + (" or layers[...]" if "layers" in spelled else ""))
        spelled -= _SELECTOR | {"layers"}
    if {"INT", "FLOAT"} <= spelled:
        parts.append("a number")
        spelled -= {"INT", "FLOAT"}
    rest = sorted(spelled, key=lambda s: (s in _WORDS, s))
    parts += [_WORDS.get(s, f"'{s}'") for s in rest]
    if not parts:
        return "nothing more"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _acceptable(e: UnexpectedInput) -> set[str]:
    """Terminal names the parser would have taken; keywords included, which the lexer's own
    `allowed` set folds into NAME."""
    if isinstance(e, UnexpectedToken) and e.accepts:
        return set(e.accepts)
    if isinstance(e.state, ParserState):
        return set(e.state.parse_conf.parse_table.states[e.state.position])
    allowed = e.expected if isinstance(e, UnexpectedToken) else e.allowed
    return set(allowed or ())


def _found(token) -> str:
    value = str(token.value)
    short = value if len(value) <= 40 else value[:37] + "..."
    kind = {"$END": None, "NAME": "name", "STRING": "string", "INT": "number", "FLOAT": "number",
            "ROLE": "role", "REGEX": "regex"}
    if token.type == "$END":
        return "end of file"
    if token.type in ("STRING", "REGEX"):
        return f"{kind[token.type]} {short}"
    if token.type in kind:
        return f"{kind[token.type]} '{short}'"
    return f"'{short}'"


def _hint(e: UnexpectedInput, reparse) -> str | None:
    try:
        return e.match_examples(reparse, PEFT_SYNTAX_ERRORS, token_type_match_fallback=True)
    except AssertionError:  # an exception without parser state (cannot be matched)
        return None


def _unexpected_token(e: UnexpectedToken, text, file, parser, reparse) -> Diagnostic:
    token = e.token
    if token.type == "$END":
        end = token.end_pos if token.end_pos is not None else len(text)
        span = span_at(file, text, end)
    else:
        span = span_at(file, text, token.start_pos, token.end_pos)
    expected = _acceptable(e)
    message = f"unexpected {_found(token)}; expected {_describe_expected(expected, parser)}"
    keywords = [k for k in (_keyword(parser, n) for n in expected) if k and k.isalpha()]
    hint = did_you_mean(str(token.value), keywords) if token.type == "NAME" else None
    return error(span, message, hint=hint or _hint(e, reparse))


def _unexpected_character(e: UnexpectedCharacters, text, file, parser) -> Diagnostic:
    pos = e.pos_in_stream
    char = text[pos] if 0 <= pos < len(text) else ""
    span = span_at(file, text, pos, pos + 1)
    if char == '"':
        return error(span, "this string is not closed on its line", hint='strings are "..." on one line')
    if char == "/":
        hint = "regexes are /.../ on one line; write \\/ for /"
        return error(span, "this regex is not closed on its line", hint=hint)
    if char == "@":
        return error(span, "a role needs a name after '@'", hint="for example @attn.q or @mlp")
    expected = _describe_expected(_acceptable(e), parser)
    if char and not char.isascii():
        message = f"unexpected character {_show_char(char)}; expected {expected}"
        return error(span, message, hint="non-ASCII text may appear only in \"strings\" and # comments")
    return error(span, f"unexpected character {_show_char(char)}; expected {expected}")


def _show_char(char: str) -> str:
    if char.isprintable() and char != "'" and not unicodedata.combining(char):
        return f"'{char}'"
    return f"U+{ord(char):04X}"
