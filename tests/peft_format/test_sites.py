"""The configs we write select in peft (the oracle) exactly what we mean.

- `peft_config_for_sites`: peft, loading the written config, adapts exactly the planned module
  paths, each with the planned rank and alpha (LoRA, LoHa, LoKr), feedforward flag (IA3).
- `peft_config_from_adapter`: peft adapts exactly what the Spec's selectors select
  (`surgeon.planning.select`), for names, regexes, globs, exclusions and a layer restriction.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftConfig, inject_adapter_in_model
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from torch import nn

from surgeon.lang.spec import (
    Adapter,
    Alpha,
    Exclude,
    Feedforward,
    Glob,
    Layers,
    LayerSlice,
    Name,
    Option,
    Rank,
    Regex,
    Selection,
    Target,
)
from surgeon.peft_format.config import (
    ConversionError,
    paths_regex,
    peft_config_for_sites,
    peft_config_from_adapter,
)
from surgeon.planning.select import Resolver
from surgeon.planning.site import Site

CI = bool(os.environ.get("CI")) or os.environ.get("HYPOTHESIS_PROFILE") == "ci"
SETTINGS = settings(derandomize=CI, max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(4, 4) for _ in range(4))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(4, 8), "fc2": nn.Linear(8, 4)})


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(12))
        self.q_proj = nn.Linear(4, 4)  # a root-level name twin of the attention projections


class Tiny(nn.Module):
    """Twelve blocks (so `1` is a prefix of `10` and `11`) and a look-alike outside them."""

    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.head = nn.Linear(4, 2)


LINEARS = [n for n, m in Tiny().named_modules() if isinstance(m, nn.Linear)]
ALPHA = {"lora": "lora_alpha", "loha": "alpha", "lokr": "alpha"}


def adapted(config: dict) -> dict[str, nn.Module]:
    """Inject the config, loaded the way peft loads adapter_config.json, into a fresh model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_config = PeftConfig.from_peft_type(**json.loads(json.dumps(config)))
        model = inject_adapter_in_model(peft_config, Tiny())
    layer = (LoraLayer, LycorisLayer, IA3Layer)
    return {n: m for n, m in model.named_modules() if isinstance(m, layer)}


def site(path: str, method: str, r: int = 8, alpha: float = 8.0, **options) -> Site:
    scaling = alpha / r if r else 1.0
    return Site(path, "Linear", method, "default", r, alpha, scaling, tuple(sorted(options.items())))


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_sites_get_exactly_their_rank_and_alpha(method):
    adapter = Adapter("default", method, (Option("r", 8), Option(ALPHA[method], 16)))

    @SETTINGS
    @given(st.lists(st.tuples(st.sampled_from(LINEARS), st.sampled_from([2, 8, 16]),
                              st.sampled_from([16.0, 4.0, 32.0, 2.5])),
                    min_size=1, max_size=30, unique_by=lambda t: t[0]))
    def check(chosen):
        sites = [site(p, method, r, a) for p, r, a in chosen]
        found = adapted(peft_config_for_sites(adapter, sites))
        assert sorted(found) == sorted(p for p, _, _ in chosen)
        for path, r, alpha in chosen:
            assert found[path].r["default"] == r
            got = (found[path].lora_alpha if method == "lora" else found[path].alpha)["default"]
            assert got == alpha

    check()


def test_ia3_sites_keep_their_feedforward_flag():
    adapter = Adapter("default", "ia3")
    ff = ["model.layers.0.mlp.fc2", "model.layers.11.mlp.fc2"]
    paths = [*ff, "model.layers.1.self_attn.k_proj"]
    sites = [site(p, "ia3", 0, 0.0, is_feedforward=p in ff) for p in paths]
    found = adapted(peft_config_for_sites(adapter, sites))
    assert {p: m.is_feedforward for p, m in found.items()} == {s.path: s.path in ff for s in sites}
    only_outputs = [site("model.layers.1.self_attn.k_proj", "ia3", 0, 0.0)]
    config = peft_config_for_sites(adapter, only_outputs)
    assert config["feedforward_modules"] == []  # null would make peft use its own table
    assert not adapted(config)["model.layers.1.self_attn.k_proj"].is_feedforward


def test_sites_config_copies_options_and_writes_the_base_model():
    options = (Option("r", 4), Option("use_dora", True), Option("task_type", "CAUSAL_LM"))
    adapter = Adapter("default", "lora", options)
    config = peft_config_for_sites(adapter, [site("head", "lora", 4)], base_model_name_or_path="org/m")
    assert (config["use_dora"], config["task_type"], config["base_model_name_or_path"]) == (
        True, "CAUSAL_LM", "org/m")
    assert config["target_modules"] == r"^(?:head)$"
    assert (config["rank_pattern"], config["alpha_pattern"], config["layers_to_transform"]) == ({}, {}, None)


def test_sites_of_another_adapter_are_refused():
    with pytest.raises(ConversionError, match="adapter `other`"):
        peft_config_for_sites(Adapter("other", "lora"), [site("head", "lora")])


def test_paths_regex_is_factored_and_exact():
    paths = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1, 10) for p in ("q_proj", "v_proj")]
    regex = paths_regex([*paths, "head"])
    assert regex == r"^(?:model\.layers\.(?:0|1|10)\.(?:self_attn\.q_proj|self_attn\.v_proj)|head)$"
    assert {p for p in LINEARS if re.fullmatch(regex, p)} == {*paths, "head"}


# --------------------------------------------------------------------------- without a model

SELECTIONS = [
    Selection((Name("q_proj"), Name("mlp.fc2"))),
    Selection((Name("q_proj"),), layers=Layers((LayerSlice(0, 3), 10))),
    Selection((Name("self_attn.v_proj"),), layers=Layers((1, 11), ("layers",))),
    Selection((Regex(r"model\.layers\.1\d*\.self_attn\.(q|k)_proj"),)),
    Selection((Glob("layers.1?.*.q_proj"), Name("head"))),
    Selection((Glob("mlp.fc[12]"), Regex(r".*\.o_proj"))),
]
EXCLUDES = [None, Selection((Name("layers.10.self_attn.q_proj"),)), Selection((Regex(r".*\.1\..*"),))]


@pytest.mark.parametrize("exclude", EXCLUDES)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_without_a_model_peft_selects_what_the_spec_selects(selection, exclude):
    rules = (Target(selection),) + ((Exclude(exclude),) if exclude else ())
    config = peft_config_from_adapter(Adapter("default", "lora", (), rules))
    resolver = Resolver(Tiny())
    want = set(resolver.select(selection)) - set(resolver.select(exclude) if exclude else ())
    assert set(adapted(config)) == want


def test_without_a_model_ranks_follow_the_spec_precedence():
    rules = (
        Target(Selection((Name("q_proj"), Name("v_proj")))),
        Rank(16, Selection((Name("q_proj"),))),
        Rank(4, Selection((Regex(r"model\.layers\.1\..*"),), exclude=(Name("q_proj"),))),
        Alpha(2, Selection((Name("v_proj"),), exclude=(Regex(r"model\.layers\.1\..*"),))),
        Alpha(32, Selection((Regex(r"model\.layers\.1\..*"),))),
    )
    found = adapted(peft_config_from_adapter(Adapter("default", "lora", (), rules)))
    assert found["model.layers.1.self_attn.q_proj"].r["default"] == 16
    assert found["model.layers.1.self_attn.v_proj"].r["default"] == 4
    assert found["model.layers.2.self_attn.v_proj"].r["default"] == 8
    assert found["model.layers.1.self_attn.v_proj"].lora_alpha["default"] == 32
    assert found["model.layers.2.self_attn.v_proj"].lora_alpha["default"] == 2
    assert found["model.q_proj"].lora_alpha["default"] == 8


@pytest.mark.parametrize("atom, written", [
    (Name("fc2"), ["fc2"]),  # a list entry: peft matches it with str.endswith
    (Name("mlp.fc1"), ["mlp.fc1"]),
    (Regex(r".*\.1\.mlp\.fc.*"), r".*\.1\.mlp\.fc.*"),
])
def test_feedforward_without_a_model(atom, written):
    targets = Target(Selection((Name("k_proj"), Name("fc2"), Name("mlp.fc1"))))
    rules = (targets, Feedforward(Selection((atom,))))
    config = peft_config_from_adapter(Adapter("default", "ia3", (), rules))
    assert config["feedforward_modules"] == written
    found = adapted(config)
    want = set(Resolver(Tiny()).select(Selection((atom,)))) & set(found)
    assert {p for p, m in found.items() if m.is_feedforward} == want


def test_a_written_plan_reads_back_as_the_same_sites():
    """What `load_adapter` does with a checkpoint surgeon wrote: the decompiled spec selects the
    same paths, and its rank rules are disjoint (no `except` needed)."""
    from surgeon.peft_format.config import spec_from_peft_config

    chosen = {"model.layers.1.self_attn.q_proj": 4, "model.layers.10.self_attn.q_proj": 16,
              "model.q_proj": 8, "head": 8}
    adapter = Adapter("default", "lora", (Option("r", 8),))
    config = peft_config_for_sites(adapter, [site(p, "lora", r) for p, r in chosen.items()])
    back = spec_from_peft_config(config)
    resolver = Resolver(Tiny())
    (target,) = back.rules_of(Target)
    assert set(resolver.select(target.selection)) == set(chosen)
    ranks = back.rules_of(Rank)
    assert all(not r.selection.exclude for r in ranks)
    assert {p: r.value for r in ranks for p in resolver.select(r.selection)} == {
        p: r for p, r in chosen.items() if r != 8}
