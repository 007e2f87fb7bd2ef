"""Hypothesis strategies for valid Specs (by construction, from the vocabulary's own kinds)."""

from __future__ import annotations

from hypothesis import strategies as st

from surgeon.capture.names import selector_names
from surgeon.lang import vocabulary as vocab
from surgeon.lang.check_selection import slice_is_empty
from surgeon.lang.kinds import Bool, Dict, Enum, Int, List, Number, Str
from surgeon.lang.spec import (
    Adapter,
    AllLinear,
    Alpha,
    Exclude,
    Feedforward,
    Glob,
    Layers,
    LayerSlice,
    ModuleType,
    Name,
    Option,
    Rank,
    Regex,
    RoleRef,
    Save,
    Selection,
    Spec,
    Table,
    Target,
    Tokens,
)

ident = st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True)
dotted = st.lists(ident, min_size=1, max_size=3).map(".".join)
# Quoted names may hold nearly anything but dots-as-separators, glob characters and whitespace.
odd_segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), blacklist_characters=".*?["),
    min_size=1, max_size=5,
)
names = st.one_of(dotted, st.lists(odd_segment, min_size=1, max_size=3).map(".".join))
globs = st.tuples(dotted, st.sampled_from("*?"), st.integers(0, 8)).map(
    lambda t: t[0][: t[2]] + t[1] + t[0][t[2]:]
) | st.just("h.[0-3].attn")
REGEXES = (r".*\.q_proj", r"model\.layers\.\d+\.(q|v)_proj", "a/b", r"x\\y", "[/]+", r"(?i)Q", r"\w+")

atoms = st.one_of(
    names.map(Name), globs.map(Glob), st.sampled_from(REGEXES).map(Regex),
    st.sampled_from(vocab.MODULE_TYPES).map(ModuleType), st.sampled_from(selector_names()).map(RoleRef),
    st.just(AllLinear()),
)
small = st.integers(-12, 12)
slices = st.builds(LayerSlice, st.none() | small, st.none() | small, st.none() | small.filter(bool)).filter(
    lambda s: not slice_is_empty(s)
)
layers = st.builds(
    Layers, st.lists(small | slices, min_size=1, max_size=3).map(tuple),
    st.lists(dotted, max_size=2).map(tuple),
)


@st.composite
def selections(draw, only_layers: bool = False) -> Selection:
    if only_layers and draw(st.booleans()):
        include, restrict = (), draw(layers)
    else:
        include, restrict = tuple(draw(st.lists(atoms, min_size=1, max_size=3))), draw(st.none() | layers)
    within = draw(st.none() | dotted)
    exclude = tuple(draw(st.lists(atoms, max_size=2)))
    return Selection(include, restrict, within, exclude)


def _plain_values():
    return st.none() | st.booleans() | st.integers(-99, 99) | st.text(max_size=6)


def values_of(kind):
    """Valid values of one option kind."""
    if isinstance(kind, Int):
        lo = -5 if kind.lo is None else kind.lo
        return st.integers(lo, lo + 200)
    if isinstance(kind, Number):
        lo = 0.0 if kind.lo is None else kind.lo
        if kind.positive:
            return st.integers(1, 64) | st.floats(0.001, 100.0)
        if kind.below is not None:
            return st.floats(lo, kind.below, exclude_max=True)
        return st.floats(lo, kind.hi if kind.hi is not None else lo + 100.0)
    if isinstance(kind, Bool):
        return st.booleans()
    if isinstance(kind, Enum):
        words = st.sampled_from([c for c in kind.choices if c != "loftq"])
        return words | st.booleans() if kind.bools else words
    if isinstance(kind, Str):
        return st.text(max_size=8)
    if isinstance(kind, Dict):
        inner = values_of(kind.values) if kind.values is not None else _plain_values()
        return st.dictionaries(st.text(max_size=5), inner, max_size=3).map(lambda d: Table(tuple(d.items())))
    if isinstance(kind, List):
        size = {} if kind.length is None else {"min_size": kind.length, "max_size": kind.length}
        return st.lists(values_of(kind.item), **({"max_size": 3} | size)).map(tuple)
    raise AssertionError(kind)


# Fields left out: their valid values depend on other fields (checked in check_options.py).
_DEPENDENT = {"lora_bias", "loftq_config", "megatron_config", "tinit", "tfinal", "total_step"}


@st.composite
def options(draw, method: str) -> tuple[Option, ...]:
    fields = [f for f in vocab.fields_of(method) if f.name not in _DEPENDENT]
    chosen = draw(st.lists(st.sampled_from(fields), unique_by=lambda f: f.name, max_size=5))
    found = {f.name: draw(values_of(f.kind) | (st.none() if f.nullable else st.nothing())) for f in chosen}
    if method == "adalora":
        found["total_step"] = draw(st.integers(1, 10_000))
    if method == "oft":  # PEFT's rule: exactly one of r / oft_block_size is non-zero
        found.update(zip(("r", "oft_block_size"), draw(st.sampled_from(((0, 8), (4, 0))))))
    if method == "boft":  # PEFT's rule: exactly one of boft_block_size / boft_block_num is non-zero
        found.update(zip(("boft_block_size", "boft_block_num"), draw(st.sampled_from(((0, 4), (8, 0))))))
    if method == "road" and "group_size" in found:  # PEFT's rule: a positive even group size
        found["group_size"] = 2 * found["group_size"]
    if method == "gralora":  # PEFT's rule: gralora_k divides r
        found["r"] = found.get("gralora_k", 2) * draw(st.integers(1, 8))
    return tuple(Option(n, found[n]) for n in vocab.canonical_order(method) if n in found)


@st.composite
def rules(draw, method: str):
    allowed = sorted(vocab.rules_of(method) - {"tokens"})
    out = [Target(draw(selections()))]
    for kind in draw(st.lists(st.sampled_from(allowed), max_size=4)):
        if kind == "target":
            out.append(Target(draw(selections())))
        elif kind == "exclude":
            out.append(Exclude(draw(selections(only_layers=True))))
        elif kind == "feedforward":
            out.append(Feedforward(draw(selections())))
        elif kind == "rank":
            out.append(Rank(draw(st.integers(1, 256)), draw(selections(only_layers=True))))
        elif kind == "alpha":
            value = draw(st.integers(1, 256) | st.floats(0.01, 512.0))
            out.append(Alpha(value, draw(selections(only_layers=True))))
        else:
            out.append(Save(tuple(draw(st.lists(names, min_size=1, max_size=3)))))
    if "tokens" in vocab.rules_of(method):
        modules = draw(st.lists(st.none() | dotted, unique=True, max_size=2))
        indices = st.lists(st.integers(0, 50_000), min_size=1, max_size=4).map(tuple)
        out += [Tokens(m, draw(indices)) for m in modules]
    return tuple(draw(st.permutations(out)))


adapter_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,8}", fullmatch=True)


@st.composite
def adapters(draw, name: str) -> Adapter:
    method = draw(st.sampled_from(vocab.methods()))
    return Adapter(name, method, draw(options(method)), draw(rules(method)))


@st.composite
def specs(draw) -> Spec:
    adapter_list = draw(st.lists(adapter_names, min_size=1, max_size=3, unique=True))
    return Spec(tuple(draw(adapters(n)) for n in adapter_list))
