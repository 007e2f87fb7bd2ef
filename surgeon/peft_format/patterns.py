"""PEFT pattern strings <-> selector atoms, and PEFT's first-match order <-> our precedence.

PEFT resolves a `rank_pattern` / `alpha_pattern` key `k` against a module path `p` with
`re.match(rf"(.*\\.)?({k})$", p)` (`peft.utils.other.get_pattern_key`) and takes the *first*
matching key in dict order. The Spec instead lets the *most specific* rule win. The two agree on
every model when no two rules with different values can match one module; so

- decompiling, each key becomes a rule whose selection excepts the earlier keys (with another
  value) that may overlap it: `rank 16 on b except a` says "b, where PEFT did not stop at a";
- compiling, rules are ordered so that every `except` names atoms of earlier rules, which is
  PEFT's decision list again. Overlapping rules with different values and no `except` between
  them depend on how many modules each selects, so they need the model (`NeedsModelError`).

`may_overlap` decides, without a model, whether two atoms can select one path (conservatively
True when it cannot tell).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from surgeon.errors import UserError
from surgeon.lang.spec import Alpha, Atom, Glob, Name, Rank, Regex, Selection

# A PEFT name that means itself: word characters and dashes, in dot-separated segments.
_PLAIN = re.compile(r"[\w-]+(?:\.[\w-]+)*")
# The prefix PEFT puts before every pattern key: any leading segments.
_ANY_PREFIX = r"(?:.*\.)?"
_BACKREF = re.compile(r"\\[1-9]|\(\?P=")


class UnorderedRulesError(UserError, ValueError):
    """Rank/alpha rules PEFT's first-match order cannot reproduce; `atoms` are the culprits."""

    def __init__(self, message: str, atom: Atom):
        super().__init__(message)
        self.atom = atom


# --------------------------------------------------------------------------- regex text


def top_level_bar(pattern: str) -> bool:
    """Whether `pattern` has a `|` outside every group and class (it then needs parentheses)."""
    depth, i, in_class = 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]" or pattern[i - 1] == "["
        elif c == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "^":
                i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return True
        i += 1
    return False


def group(pattern: str) -> str:
    """`pattern` safe to concatenate: wrapped in `(?:...)` only when it has a top-level `|`."""
    return f"(?:{pattern})" if top_level_bar(pattern) else pattern


def name_regex(name: str) -> str:
    """A full-match regex with Name semantics (path == name or ends with "." + name)."""
    return _ANY_PREFIX + re.escape(name)


def glob_regex(pattern: str) -> str:
    """A full-match regex equal to `surgeon.planning.select.glob_matches` (fnmatch per dot segment)."""
    return _ANY_PREFIX + r"\.".join(_segment_regex(s) for s in pattern.split("."))


def _segment_regex(segment: str) -> str:
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        close = segment.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and close > 0:
            body = segment[i + 1 : close]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(r"(?!\.)[" + body.replace("\\", "\\\\") + "]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def atom_regex(atom: Atom) -> str:
    """The full-match regex of a model-free atom (Name, Glob or Regex)."""
    if isinstance(atom, Name):
        return name_regex(atom.pattern)
    if isinstance(atom, Glob):
        return glob_regex(atom.pattern)
    assert isinstance(atom, Regex), atom
    return atom.pattern


# --------------------------------------------------------------------------- pattern keys


def atom_from_key(key: str) -> Name | Regex:
    """The atom selecting exactly what PEFT's pattern key `key` selects, in its shortest form.

    `q_proj` -> Name; `^model.layers.0.q_proj` -> Regex (full match, `^` dropped);
    `.*attn.(q|k)` -> Regex `(?:.*\\.)?.*attn.(q|k)`. A dotted plain key such as `mlp.fc1`
    becomes a Name, whose dots are literal where PEFT's match any character (the one place the
    two may differ: a model with both `mlp.fc1` and a module named like `mlpXfc1`).
    """
    if _PLAIN.fullmatch(key):
        return Name(key)
    if _BACKREF.search(key):  # keep PEFT's own group numbering for back-references
        return Regex(rf"(.*\.)?({key})")
    if key.startswith("^") and not top_level_bar(key) and not key.startswith(("^(?:.*\\.)?", "^(.*\\.)?")):
        return Regex(key[1:])
    return Regex(_ANY_PREFIX + group(key))


def key_from_atom(atom: Atom) -> str:
    """The PEFT pattern key for a model-free atom; `atom_from_key(key_from_atom(a)) == a`
    whenever `a` came from `atom_from_key`."""
    if isinstance(atom, Name):
        return atom.pattern if _PLAIN.fullmatch(atom.pattern) else re.escape(atom.pattern)
    pattern = atom_regex(atom)
    for key in _key_candidates(pattern):
        if atom_from_key(key) == Regex(pattern):
            return key
    return "^" + group(pattern)


def _key_candidates(pattern: str) -> list[str]:
    out = []
    if pattern.startswith("(.*\\.)?(") and pattern.endswith(")"):
        out.append(pattern[len("(.*\\.)?(") : -1])
    if pattern.startswith(_ANY_PREFIX):
        rest = pattern[len(_ANY_PREFIX) :]
        if rest.startswith("(?:") and rest.endswith(")"):
            out.append(rest[3:-1])  # the simplest key first: `q|v`, not `(?:q|v)`
        out.append(rest)
    out.append("^" + pattern)
    return out


def suffix_is_segment(entry: str, targets: list[str]) -> bool:
    """Whether IA3's feedforward test `path.endswith(entry)` equals Name(entry)'s dot-segment
    match on every path that Name(t) selects for some t in `targets`."""
    for t in targets:
        if len(entry) <= len(t):
            if t.endswith(entry) and not (t == entry or t.endswith("." + entry)):
                return False
        elif entry.endswith("." + t):  # a path `X.t` ends with the entry mid-segment for some X
            return False
    return True


# --------------------------------------------------------------------------- overlap


@dataclass(frozen=True, slots=True)
class _Shape:
    """A path set as a sequence of character sets: a whole path, or any path ending with it
    at a segment boundary. Each item is one literal character or None (any character)."""

    chars: tuple[str | None, ...]
    anchored: bool


_SIMPLE = re.compile(r"(?:\\.|[\w-]|\.)*")


def _shape(atom: Atom) -> _Shape | None:
    if isinstance(atom, Name):
        return _Shape(tuple(atom.pattern), anchored=False)
    if not isinstance(atom, Regex):
        return None
    text, anchored = atom.pattern, True
    if text.startswith(_ANY_PREFIX):
        text, anchored = text[len(_ANY_PREFIX) :], False
    if not _SIMPLE.fullmatch(text):
        return None
    chars, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            if text[i + 1].isalnum():  # \d, \w ... are classes, not literals
                return None
            chars.append(text[i + 1])
            i += 2
        else:
            chars.append(None if text[i] == "." else text[i])
            i += 1
    return _Shape(tuple(chars), anchored)


def _fits(a: tuple[str | None, ...], b: tuple[str | None, ...]) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def may_overlap(a: Atom, b: Atom) -> bool:
    """Whether some module path could be selected by both atoms (True when unsure)."""
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None:
        return True
    if sa.anchored and sb.anchored:
        return _fits(sa.chars, sb.chars)
    short, long = sorted((sa, sb), key=lambda s: len(s.chars))
    n = len(short.chars)
    if len(long.chars) == n:
        return _fits(long.chars, short.chars)
    # the path ends with `long`; `short` must be its tail, starting after a dot
    return not short.anchored and _fits(long.chars[-n - 1 :], (".", *short.chars))


# --------------------------------------------------------------------------- rules <-> keys

PatternRule = Rank | Alpha


def rules_from_pattern(pattern: dict, kind: type[PatternRule]) -> tuple[PatternRule, ...]:
    """PEFT's ordered `{key: value}` as rules that give every module the same value.

    Consecutive keys with one value share a rule; each rule excepts earlier atoms that have a
    different value and may overlap it, so at most one value applies to any module.
    """
    runs: list[tuple[object, list[Atom]]] = []
    for key, value in pattern.items():
        atom = atom_from_key(key)
        if runs and runs[-1][0] == value and type(runs[-1][0]) is type(value):
            runs[-1][1].append(atom)
        else:
            runs.append((value, [atom]))
    rules = []
    for i, (value, atoms) in enumerate(runs):
        earlier = [a for v, run in runs[:i] if v != value for a in run]
        exclude = tuple(e for e in earlier if any(may_overlap(e, a) for a in atoms))
        rules.append(kind(value, Selection(tuple(atoms), exclude=exclude)))  # type: ignore[arg-type]
    return tuple(rules)


def pattern_from_rules(rules: tuple[PatternRule, ...]) -> dict:
    """The ordered PEFT pattern dict equivalent to `rules`, or `UnorderedRulesError`.

    Selections must be model-free (names, globs, regexes; no layers or `within`) — the caller
    checks that. Rule order: file order, moved only where an `except` requires it.
    """
    after: dict[int, set[int]] = {i: set() for i in range(len(rules))}  # j -> rules before j
    for j, rule in enumerate(rules):
        for atom in rule.selection.exclude:
            owners = [i for i, r in enumerate(rules) if i != j and atom in r.selection.include]
            if not owners:
                raise UnorderedRulesError(
                    f"`except` in a {_word(rule)} rule can only remove modules another "
                    f"{_word(rule)} rule selects; PEFT's {_word(rule)}_pattern has no negation",
                    atom)
            after[j].update(owners)
    for j, later in enumerate(rules):
        for i, first in enumerate(rules[:j]):
            if first.value != later.value:
                _order_pair(i, j, rules, after)
    out: dict = {}
    for rule in _toposort(rules, after):
        for atom in rule.selection.include:
            # a key already present came from an earlier rule, which PEFT's first match obeys
            out.setdefault(key_from_atom(atom), rule.value)
    return out


def _order_pair(i: int, j: int, rules, after: dict[int, set[int]]) -> None:
    a, b = rules[i].selection, rules[j].selection
    pairs = [(x, y) for x in a.include for y in b.include if may_overlap(x, y)]
    if not pairs:
        return
    if all(x in b.exclude for x, _ in pairs):
        after[j].add(i)
    elif all(y in a.exclude for _, y in pairs):
        after[i].add(j)
    else:
        word = _word(rules[j])
        raise UnorderedRulesError(
            f"this {word} rule and the one at {rules[i].span.location()} may both select a module; "
            f"which wins depends on how many modules each selects, which needs the model "
            f"(add `except` to one of them to say which wins)", pairs[0][1])


def _toposort(rules, after: dict[int, set[int]]) -> list[PatternRule]:
    done: list[int] = []
    while len(done) < len(rules):
        ready = [j for j in range(len(rules)) if j not in done and after[j] <= set(done)]
        if not ready:
            stuck = next(j for j in range(len(rules)) if j not in done)
            raise UnorderedRulesError(
                f"the `except` clauses of these {_word(rules[stuck])} rules form a cycle",
                rules[stuck].selection.include[0])
        done.append(ready[0])
    return [rules[j] for j in done]


def _word(rule: PatternRule) -> str:
    return "rank" if isinstance(rule, Rank) else "alpha"
