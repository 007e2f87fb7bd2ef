"""Lark parse tree -> syntax tree (syntax.py), with a span on every part.

Decides what each written form *is* (the rest of the compiler relies on this):
    @attn.q          -> RoleRef("attn.q")
    all-linear       -> AllLinear()
    Conv2d           -> ModuleType  (a bare word starting with a capital letter, no dots)
    q_proj, mlp.fc1  -> Name        (any other bare word)
    "out_proj"       -> Name        (a string without * ? [)
    "layers.*.q"     -> Glob        (a string with * ? or [)
    /.*\\.q_proj/     -> Regex       (`\\/` inside stands for `/`)
Malformed literals (a number too long to be one, an out-of-range float) become diagnostics.
"""

from __future__ import annotations

import math

from lark import Token, Transformer, v_args

from surgeon.lang.diagnostics import Diagnostic, error
from surgeon.lang.source import span_of_meta, span_of_token
from surgeon.lang.spec import (
    AllLinear,
    Glob,
    LayerSlice,
    ModuleType,
    Name,
    Param,
    Regex,
    RoleRef,
    Span,
    Table,
)
from surgeon.lang.syntax import (
    Located,
    RawAdapter,
    RawClause,
    RawLayers,
    RawOption,
    RawRule,
    RawSelection,
    RawSpec,
)

_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
_MAX_DIGITS = 40


def unquote(text: str) -> str:
    """The value of a `"..."` literal: `\\"`, `\\\\`, `\\n`, `\\t` decoded, other `\\x` kept."""
    body, out, i = text[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def unslash(text: str) -> str:
    """The pattern of a `/.../` literal: `\\/` becomes `/`, every other escape is kept."""
    body, out, i = text[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append("/" if body[i + 1] == "/" else body[i : i + 2])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


@v_args(meta=True)
class Builder(Transformer):
    """Builds a `RawSpec`; collects literal errors in `self.diagnostics` instead of raising."""

    def __init__(self, file: str):
        super().__init__(visit_tokens=False)
        self.file = file
        self.diagnostics: list[Diagnostic] = []

    # ------------------------------------------------------------------ helpers

    def _span(self, meta):
        return span_of_meta(self.file, meta)

    def _tok(self, token: Token) -> Located:
        span = span_of_token(self.file, token)
        if token.type == "STRING":
            return Located(unquote(token.value), span)
        if token.type == "INT":
            return Located(self._int(token, span), span)
        if token.type == "FLOAT":
            return Located(self._float(token, span), span)
        return Located(token.value, span)

    def _int(self, token: Token, span) -> int:
        if len(token.value.lstrip("-")) > _MAX_DIGITS:
            self.diagnostics.append(error(span, "this number is too long to be a count or an index"))
            return 0
        return int(token.value)

    def _float(self, token: Token, span) -> float:
        value = float(token.value)
        if not math.isfinite(value):
            self.diagnostics.append(error(span, f"the number {token.value} is out of range"))
            return 0.0
        return value

    # ------------------------------------------------------------------ top level

    def start(self, meta, children):
        return RawSpec(tuple(children), self._span(meta))

    def adapter(self, meta, children):
        name, method, *rest = children
        options = tuple(c for c in rest if isinstance(c, RawOption))
        rules = tuple(c for c in rest if isinstance(c, RawRule))
        return RawAdapter(name, self._tok(method), options, rules, self._span(meta))

    def adapter_name(self, meta, children):
        return self._tok(children[0])

    def option(self, meta, children):
        key, value = children
        return RawOption(self._tok(key), value, self._span(meta))

    # ------------------------------------------------------------------ values

    def int(self, meta, children):
        return self._tok(children[0])

    float = word = string = int

    def true(self, meta, children):
        return Located(True, self._span(meta))

    def false(self, meta, children):
        return Located(False, self._span(meta))

    def null(self, meta, children):
        return Located(None, self._span(meta))

    def list(self, meta, children):
        return Located(tuple(c.value for c in children if c is not None), self._span(meta))

    def table(self, meta, children):
        items, seen = [], set()
        for key, value in (c for c in children if c is not None):
            if key.value in seen:
                self.diagnostics.append(error(key.span, f"the key '{key.value}' appears twice in this table"))
            seen.add(key.value)
            items.append((key.value, value.value))
        return Located(Table(tuple(items)), self._span(meta))

    def pair(self, meta, children):
        return self._tok(children[0]), children[1]

    # ------------------------------------------------------------------ rules

    def _rule(self, kind, meta, **parts):
        span = self._span(meta)
        keyword = Span(span.file, span.start, span.start + len(kind), span.line, span.column)
        return RawRule(kind, keyword, span, **parts)

    def target(self, meta, children):
        return self._rule("target", meta, selection=children[0])

    def exclude(self, meta, children):
        return self._rule("exclude", meta, selection=children[0])

    def feedforward(self, meta, children):
        return self._rule("feedforward", meta, selection=children[0])

    def rank(self, meta, children):
        return self._rule("rank", meta, value=self._tok(children[0]), selection=children[1])

    def alpha(self, meta, children):
        return self._rule("alpha", meta, value=self._tok(children[0]), selection=children[1])

    def save(self, meta, children):
        return self._rule("save", meta, names=tuple(self._tok(c) for c in children))

    def tokens(self, meta, children):
        module, *indices = children
        names = () if module is None else (self._tok(module),)
        located = tuple(self._tok(i) for i in indices if i is not None)
        return self._rule("tokens", meta, names=names, indices=located)

    # ------------------------------------------------------------------ selections

    def selection(self, meta, children):
        atoms = tuple(c for c in children if not isinstance(c, RawClause))
        clauses = tuple(c for c in children if isinstance(c, RawClause))
        return RawSelection(atoms, None, clauses, self._span(meta))

    def layer_selection(self, meta, children):
        layers, *clauses = children
        return RawSelection((), layers, tuple(clauses), self._span(meta))

    def in_clause(self, meta, children):
        return RawClause("in", children[0], self._span(meta))

    def within_clause(self, meta, children):
        return RawClause("within", self._tok(children[0]), self._span(meta))

    def except_clause(self, meta, children):
        return RawClause("except", tuple(children), self._span(meta))

    def layers(self, meta, children):
        items = tuple(c for c in children if isinstance(c, Located))
        pattern = tuple(self._tok(c) for c in children if isinstance(c, Token))
        return RawLayers(items, pattern, self._span(meta))

    def layer_index(self, meta, children):
        return self._tok(children[0])

    def layer_slice(self, meta, children):
        start, stop, step = (None if c is None else self._tok(c).value for c in children)
        return Located(LayerSlice(start, stop, step), self._span(meta))

    # ------------------------------------------------------------------ atoms

    def role(self, meta, children):
        return RoleRef(children[0].value[1:], self._span(meta))

    def all_linear(self, meta, children):
        return AllLinear(self._span(meta))

    def bare(self, meta, children):
        word = children[0].value
        if word[0].isupper() and "." not in word:
            return ModuleType(word, self._span(meta))
        return Name(word, self._span(meta))

    def quoted(self, meta, children):
        text = unquote(children[0].value)
        if any(c in text for c in "*?["):
            return Glob(text, self._span(meta))
        return Name(text, self._span(meta))

    def param(self, meta, children):
        return Param(self._tok(children[0]).value, self._span(meta))

    def regex(self, meta, children):
        return Regex(unslash(children[0].value), self._span(meta))
