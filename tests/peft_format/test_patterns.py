"""PEFT pattern keys <-> atoms, checked against peft's own matching (the oracle).

- `atom_from_key`: the atom selects exactly the paths PEFT's `get_pattern_key` matches.
- `rules_from_pattern`: the Spec's most-specific-wins precedence over the decompiled rules gives
  every module the value PEFT's first match gives it.
- `pattern_from_rules` is its inverse, and rejects rules whose winner needs the model.
- `may_overlap` never says False for atoms that share a path.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

from surgeon.lang.spec import Alpha, Glob, Name, Rank, Regex, Selection
from surgeon.peft_format.patterns import (
    UnorderedRulesError,
    atom_from_key,
    atom_regex,
    glob_regex,
    key_from_atom,
    may_overlap,
    pattern_from_rules,
    rules_from_pattern,
    suffix_is_segment,
)
from surgeon.planning.select import glob_matches

CI = bool(os.environ.get("CI")) or os.environ.get("HYPOTHESIS_PROFILE") == "ci"
SETTINGS = settings(derandomize=CI, max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

SEGMENTS = ["model", "layers", "h", "0", "1", "12", "self_attn", "attn", "q_proj", "v_proj", "mlp",
            "fc1", "mlp_fc1", "xq_proj", "q", "down_proj", "proj"]
paths = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map(".".join)
path_sets = st.lists(paths, min_size=1, max_size=25, unique=True)

# Keys as people write them: names, dotted names, anchored paths, regexes with classes,
# alternations (top-level and grouped), `$`, and dots that are regex wildcards.
name_keys = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(".".join)
regex_keys = st.one_of(
    name_keys.map(lambda k: "^" + k),
    name_keys.map(lambda k: "^" + re.escape(k)),
    name_keys.map(lambda k: ".*" + re.escape("." + k)),
    name_keys.map(lambda k: k + "$"),
    st.tuples(name_keys, name_keys).map("|".join),
    st.tuples(name_keys, name_keys).map(lambda t: f"(?:{t[0]}|{t[1]})"),
    st.tuples(name_keys, name_keys).map(lambda t: f"^{t[0]}|{t[1]}"),
    st.sampled_from([r"model\.layers\.\d+\.self_attn\.q_proj", r".*\.(q|v)_proj", r"layers\.1\d*\..*",
                     r"h\.[01]\.attn\.q", r".*attn.(q|v)_proj", "(.*_)?proj"]),
)
keys = st.one_of(name_keys, regex_keys)


def peft_matches(key: str, path: str) -> bool:
    return get_pattern_key([key], path) == key and bool(re.match(rf"(.*\.)?({key})$", path))


def ours_matches(atom, path: str) -> bool:
    return re.fullmatch(atom_regex(atom), path) is not None


@SETTINGS
@given(keys, paths)
def test_atom_selects_what_peft_matches(key, path):
    atom = atom_from_key(key)
    if isinstance(atom, Name) and "." in key:
        # a dotted plain key: PEFT's dots also match any character, ours only a dot
        assert not ours_matches(atom, path) or peft_matches(key, path), (key, path)
    else:
        assert ours_matches(atom, path) == peft_matches(key, path), (key, atom, path)


@SETTINGS
@given(keys)
def test_key_round_trip(key):
    atom = atom_from_key(key)
    back = key_from_atom(atom)
    assert atom_from_key(back) == atom
    if not key.startswith("(?:"):  # `(?:q|v)` and `q|v` are one atom; the simpler key returns
        assert back == key


@SETTINGS
@given(st.lists(st.sampled_from(["*", "?", "q", "_", "proj", "[qv]", "[!q]", "0", "."]),
                min_size=1, max_size=6).map("".join), paths)
def test_glob_regex_is_select_glob(pattern, path):
    if ".." in pattern or pattern.startswith(".") or pattern.endswith("."):
        return
    assert (re.fullmatch(glob_regex(pattern), path) is not None) == glob_matches(pattern, path)


atoms = st.one_of(keys.map(atom_from_key), name_keys.map(Name))


@SETTINGS
@given(atoms, atoms, paths)
def test_may_overlap_is_sound(a, b, path):
    if ours_matches(a, path) and ours_matches(b, path):
        assert may_overlap(a, b), (a, b, path)


def test_may_overlap_tells_names_and_paths_apart():
    assert not may_overlap(Name("q_proj"), Name("v_proj"))
    assert may_overlap(Name("q_proj"), Name("self_attn.q_proj"))
    assert not may_overlap(Name("q_proj"), Name("xq_proj"))
    assert not may_overlap(Regex("model.layers.0.q_proj"), Regex("model.layers.1.q_proj"))
    assert may_overlap(Regex("model.layers.0.q_proj"), Name("q_proj"))
    assert not may_overlap(Regex("model.layers.0.q_proj"), Name("v_proj"))
    assert may_overlap(Regex(r"(?:.*\.)?.*attn.(q|k)"), Name("k"))


# --------------------------------------------------------------------------- precedence


def spec_values(rules, sites: list[str]) -> dict[str, object]:
    """The Spec's precedence, from its definition: the rule matching the fewest sites wins, and
    among equally specific rules the later one."""

    def selects(selection: Selection, path: str) -> bool:
        return (any(ours_matches(a, path) for a in selection.include)
                and not any(ours_matches(a, path) for a in selection.exclude))

    counts = [sum(selects(r.selection, p) for p in sites) for r in rules]
    out = {}
    for path in sites:
        hits = [i for i, r in enumerate(rules) if selects(r.selection, path)]
        if hits:
            best = min(hits, key=lambda i: (counts[i], -i))
            out[path] = rules[best].value
    return out


def peft_values(pattern: dict, sites: list[str]) -> dict[str, object]:
    out = {}
    for path in sites:
        key = get_pattern_key(pattern.keys(), path)
        if key in pattern:
            out[path] = pattern[key]
    return out


patterns = st.dictionaries(keys, st.integers(1, 4), min_size=1, max_size=6)


@SETTINGS
@given(patterns, path_sets)
def test_decompiled_rules_reproduce_first_match(pattern, sites):
    rules = rules_from_pattern(pattern, Rank)
    # dotted plain keys are Names (literal dots): compare only where PEFT's wildcard agrees
    sites = [s for s in sites if all(
        not isinstance(atom_from_key(k), Name) or ours_matches(atom_from_key(k), s)
        == peft_matches(k, s) for k in pattern)]
    assert spec_values(rules, sites) == peft_values(pattern, sites)


@SETTINGS
@given(patterns)
def test_pattern_round_trip(pattern):
    rules = rules_from_pattern(pattern, Alpha)
    back = pattern_from_rules(rules)
    assert list(back) == [key_from_atom(atom_from_key(k)) for k in pattern]
    assert list(back.values()) == list(pattern.values())


def test_decompiled_rules_read_well():
    rules = rules_from_pattern({"q_proj": 8, "v_proj": 8, "^model.layers.0.self_attn.q_proj": 16}, Rank)
    assert rules == (
        Rank(8, Selection((Name("q_proj"), Name("v_proj")))),
        Rank(16, Selection((Regex("model.layers.0.self_attn.q_proj"),), exclude=(Name("q_proj"),))),
    )


def test_rules_that_need_the_model_are_refused():
    # both may select layers.0's q_proj; the winner is the rule that selects fewer modules
    rules = (Rank(8, Selection((Name("q_proj"),))), Rank(16, Selection((Glob("layers.0.*"),))))
    with pytest.raises(UnorderedRulesError, match="needs the model"):
        pattern_from_rules(rules)
    # equal values cannot disagree; disjoint names cannot either
    assert pattern_from_rules((Rank(8, Selection((Name("q"),))), Rank(8, Selection((Name("a.q"),)))))
    assert pattern_from_rules((Rank(8, Selection((Name("q"),))), Rank(4, Selection((Name("v"),)))))
    # an `except` that names no other rule's atom is not expressible as an ordering
    with pytest.raises(UnorderedRulesError, match="no negation"):
        pattern_from_rules((Rank(8, Selection((Name("q"),), exclude=(Name("a.q"),))),))


def test_except_orders_the_keys():
    later_wins = (Rank(16, Selection((Name("q_proj"),), exclude=(Name("attn.q_proj"),))),
                  Rank(4, Selection((Name("attn.q_proj"),))))
    assert list(pattern_from_rules(later_wins).items()) == [("attn.q_proj", 4), ("q_proj", 16)]


def test_feedforward_suffix_safety():
    assert suffix_is_segment("down_proj", ["k_proj", "v_proj", "down_proj"])
    assert not suffix_is_segment("proj", ["down_proj", "proj"])  # "x.down_proj".endswith("proj")
    assert not suffix_is_segment("attn.q", ["q"])  # "self_attn.q".endswith("attn.q")
