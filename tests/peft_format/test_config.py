"""PEFT config -> Adapter -> PEFT config, over generated configs built with peft's own classes.

The round trip must give a config peft loads and whose `to_dict()` equals the original in every
field peft uses (sets compared as sets, `layers_to_transform=3` as `[3]`, and so on: the
normalisations below are exactly the ones peft's matching code makes). With the language's
printer, the same holds through `.peft` text.
"""

from __future__ import annotations

import copy
import enum
import json
import os
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig

from surgeon.lang.spec import (
    Adapter,
    AllLinear,
    Layers,
    LayerSlice,
    ModuleType,
    Name,
    Option,
    Rank,
    Regex,
    RoleRef,
    Selection,
    Span,
    Target,
    Tokens,
)
from surgeon.peft_format.config import (
    ConversionError,
    NeedsModelError,
    peft_config_from_adapter,
    spec_from_peft_config,
)

CI = bool(os.environ.get("CI")) or os.environ.get("HYPOTHESIS_PROFILE") == "ci"
SETTINGS = settings(derandomize=CI, max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --------------------------------------------------------------------------- strategies

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "self_attn.q_proj", "mlp.fc1", "fc2", "down_proj",
         "up_proj", "lm-head", "layers.0.q_proj", "proj", "c_attn"]
REGEXES = [r".*\.(q|v)_proj", r"model\.layers\.\d+\.mlp\..*", "q_proj|v_proj", ".*attn.*",
           r"^(?!.*lm_head).*proj$"]
KEYS = NAMES + ["^model.layers.0.self_attn.q_proj", r"^model\.layers\.1\.mlp\.fc1", r".*\.q_proj",
                "q_proj|v_proj", r"layers\.\d+\.self_attn\.v_proj", "fc2$"]

names = st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True)
regexes = st.sampled_from(REGEXES)
def optional(strategy):
    return st.one_of(st.none(), strategy)


common = {
    "task_type": optional(st.sampled_from(["CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS"])),
    "inference_mode": st.booleans(),
    "base_model_name_or_path": optional(st.sampled_from(["gpt2", "org/model-1b"])),
    "revision": optional(st.just("main")),
    "modules_to_save": optional(st.lists(st.sampled_from(["score", "classifier", "lm_head"]),
                                         min_size=1, max_size=2, unique=True)),
    "exclude_modules": optional(st.one_of(names, regexes)),
}


@st.composite
def targets_and_layers(draw, *, layers: bool = True) -> dict:
    targets = draw(st.one_of(names, regexes, st.just("all-linear")))
    out = {"target_modules": targets}
    if layers and isinstance(targets, list) and draw(st.booleans()):
        out["layers_to_transform"] = draw(st.one_of(
            st.integers(0, 40), st.lists(st.integers(0, 40), min_size=1, max_size=8)))
        out["layers_pattern"] = draw(optional(st.one_of(
            st.sampled_from(["layers", "h"]),
            st.lists(st.sampled_from(["layers", "h", "blocks"]), min_size=1, max_size=2, unique=True))))
    return out


def pattern(values):
    return st.dictionaries(st.sampled_from(KEYS), values, max_size=5)


@st.composite
def lora_kwargs(draw) -> dict:
    kw = draw(st.fixed_dictionaries({
        **common,
        "r": st.integers(1, 64),
        "lora_alpha": st.one_of(st.integers(1, 128), st.floats(0.5, 64)),
        "lora_dropout": st.floats(0, 0.5),
        "fan_in_fan_out": st.booleans(),
        "bias": st.sampled_from(["none", "all", "lora_only"]),
        "use_rslora": st.booleans(),
        "use_dora": st.booleans(),
        "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "pissa_niter_4",
                                              "olora", "orthogonal"]),
        "rank_pattern": pattern(st.integers(1, 64)),
        "alpha_pattern": pattern(st.one_of(st.integers(1, 64), st.floats(0.5, 64))),
        "trainable_token_indices": optional(st.one_of(
            st.lists(st.integers(0, 999), min_size=1, max_size=4),
            st.dictionaries(st.sampled_from(["embed_tokens", "lm_head.emb"]),
                            st.lists(st.integers(0, 999), min_size=1, max_size=3), min_size=1))),
        "use_qalora": st.booleans(),
        "qalora_group_size": st.integers(1, 64),
        "layer_replication": optional(st.lists(st.tuples(st.integers(0, 4), st.integers(5, 9)),
                                               min_size=1, max_size=2)),
        "alora_invocation_tokens": optional(st.lists(st.integers(0, 99), min_size=1, max_size=3)),
        "target_parameters": optional(st.just(["experts.gate_up_proj"])),
        "ensure_weight_tying": st.booleans(),
        "megatron_core": st.sampled_from(["megatron.core", "my.megatron"]),
    }))
    kw.update(draw(targets_and_layers()))
    if draw(st.booleans()):
        kw["lora_bias"], kw["use_dora"] = True, False
        kw["init_lora_weights"] = draw(st.booleans())
    elif draw(st.booleans()):  # a nested sub-config
        kw["init_lora_weights"], kw["eva_config"] = "eva", {"rho": draw(st.floats(1, 4)), "tau": 0.9}
    return kw


@st.composite
def ia3_kwargs(draw) -> dict:
    kw = draw(st.fixed_dictionaries({
        **common, "fan_in_fan_out": st.booleans(), "init_ia3_weights": st.booleans()}))
    kw.update(draw(targets_and_layers(layers=False)))
    targets = kw["target_modules"]
    if isinstance(targets, list):
        feedforward = st.lists(st.sampled_from(targets), max_size=len(targets), unique=True)
    else:
        feedforward = st.lists(st.sampled_from(NAMES), max_size=3, unique=True)
    kw["feedforward_modules"] = draw(st.one_of(feedforward, st.just(r"(.*\.)?(fc2|down_proj)")))
    return kw


@st.composite
def adalora_kwargs(draw, masks: bool = True) -> dict:
    kw = draw(st.fixed_dictionaries({
        **common,
        "init_r": st.integers(1, 32), "target_r": st.integers(1, 16), "tinit": st.integers(0, 50),
        "tfinal": st.integers(0, 50), "deltaT": st.integers(1, 10), "beta1": st.floats(0, 1),
        "beta2": st.floats(0, 1), "orth_reg_weight": st.floats(0, 2),
        "lora_alpha": st.integers(1, 64), "lora_dropout": st.floats(0, 0.5),
        "bias": st.sampled_from(["none", "all", "lora_only"]), "init_lora_weights": st.booleans(),
        # AdaLoRA's saved rank_pattern: {parameter: [bool mask over the initial rank]}
        "rank_pattern": optional(st.dictionaries(st.sampled_from(["model.layers.0.q_proj.lora_E"]),
                                                 st.lists(st.booleans(), min_size=1, max_size=4)))
        if masks else st.none(),
    }))
    kw["total_step"] = kw["tinit"] + kw["tfinal"] + draw(st.integers(1, 1000))
    kw.update(draw(targets_and_layers()))
    return kw


@st.composite
def lycoris_kwargs(draw, lokr: bool) -> dict:
    kw = draw(st.fixed_dictionaries({
        **common,
        "r": st.integers(1, 64), "alpha": st.one_of(st.integers(1, 64), st.floats(0.5, 64)),
        "rank_dropout": st.floats(0, 0.5), "module_dropout": st.floats(0, 0.5),
        "use_effective_conv2d": st.booleans(),
        "rank_pattern": pattern(st.integers(1, 64)), "alpha_pattern": pattern(st.integers(1, 64)),
        "init_weights": st.sampled_from([True, False, "lycoris"] if lokr else [True, False]),
    }))
    if lokr:
        kw.update(draw(st.fixed_dictionaries({
            "decompose_both": st.booleans(), "decompose_factor": st.sampled_from([-1, 2, 4]),
            "rank_dropout_scale": st.booleans()})))
    kw.update(draw(targets_and_layers()))
    return kw


CASES = {
    "lora": (LoraConfig, lora_kwargs()),
    "ia3": (IA3Config, ia3_kwargs()),
    "adalora": (AdaLoraConfig, adalora_kwargs()),
    "loha": (LoHaConfig, lycoris_kwargs(lokr=False)),
    "lokr": (LoKrConfig, lycoris_kwargs(lokr=True)),
}

# --------------------------------------------------------------------------- normalisation


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(value)


def normalise(config: dict) -> dict:
    """What peft's matching code sees: sets as sets, scalars as one-element lists, empty as
    none; pattern dicts keep their order (first match)."""
    d = json.loads(json.dumps(config, default=_plain))
    d.pop("peft_version", None)
    for key in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"):
        if isinstance(d.get(key), list):
            d[key] = sorted(set(d[key])) or None
    layers = d.get("layers_to_transform")
    if layers is not None:
        layers = sorted(set([layers] if isinstance(layers, int) else layers)) or None
        d["layers_to_transform"] = layers
    pattern = d.get("layers_pattern")
    pattern = [pattern] if isinstance(pattern, str) else pattern
    d["layers_pattern"] = sorted(pattern) if pattern and layers is not None else None
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(d.get(key), dict):
            d[key] = list(d[key].items())
    return d


def build(cls, kw: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**copy.deepcopy(kw)).to_dict()


def load(config: dict) -> dict:
    """peft's own loading path for a saved adapter_config.json."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftConfig.from_peft_type(**json.loads(json.dumps(config))).to_dict()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("method", list(CASES))
def test_round_trip(method):
    cls, strategy = CASES[method]

    @SETTINGS
    @given(strategy)
    def check(kw):
        original = build(cls, kw)
        adapter = spec_from_peft_config(original)
        assert adapter.method == method
        written = peft_config_from_adapter(adapter)
        assert list(written) == list(original)
        assert normalise(written) == normalise(original)
        assert normalise(load(written)) == normalise(original)

    check()


def through_text(original: dict) -> dict:
    printer = pytest.importorskip("surgeon.lang.printer", reason="the language's printer is not there yet")
    parse = pytest.importorskip("surgeon.lang.parser", reason="the language's parser is not there yet")
    from surgeon.lang.spec import Spec

    text = printer.print_spec(Spec((spec_from_peft_config(original, name="conv"),)))
    return peft_config_from_adapter(parse.parse(text).adapter("conv"))


@pytest.mark.parametrize("method", list(CASES))
def test_round_trip_through_text(method):
    cls, strategy = CASES[method]
    if method == "adalora":
        strategy = adalora_kwargs(masks=False)  # see the test below

    @SETTINGS
    @given(strategy)
    def check(kw):
        original = build(cls, kw)
        assert normalise(load(through_text(original))) == normalise(original)

    check()


def test_adalora_saved_rank_pattern_through_text():
    original = build(AdaLoraConfig, {"target_modules": ["q"], "total_step": 10,
                                     "rank_pattern": {"model.q.lora_E": [True, False]}})
    assert normalise(load(through_text(original))) == normalise(original)


def test_default_config_states_only_its_targets():
    only = {"target_modules": ["q"]}
    for cls, kw in ((LoraConfig, only), (IA3Config, {**only, "feedforward_modules": []}),
                    (LoHaConfig, only), (LoKrConfig, only), (AdaLoraConfig, {**only, "total_step": 1})):
        adapter = spec_from_peft_config(build(cls, kw))
        assert adapter.rules == (Target(Selection((Name("q"),))),)
        assert adapter.options == ((Option("total_step", 1),) if cls is AdaLoraConfig else ())


def test_a_typical_lora_reads_as_written():
    config = build(LoraConfig, dict(
        r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1, 2, 3, 7], layers_pattern="layers",
        rank_pattern={"v_proj": 32}, modules_to_save=["score"], trainable_token_indices=[0, 5]))
    adapter = spec_from_peft_config(config)
    assert {o.name: o.value for o in adapter.options} == {
        "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "task_type": "CAUSAL_LM"}
    assert adapter.rules[0] == Target(Selection(
        (Name("q_proj"), Name("v_proj")), layers=Layers((LayerSlice(0, 4), 7), ("layers",))))
    assert adapter.rules[1] == Rank(32, Selection((Name("v_proj"),)))
    assert adapter.rules[-1] == Tokens(None, (0, 5))


def test_str_targets_are_regexes_and_all_linear_is_all_linear():
    assert spec_from_peft_config(build(LoraConfig, {"target_modules": r".*\.q"})).rules == (
        Target(Selection((Regex(r".*\.q"),))),)
    assert spec_from_peft_config(build(LoraConfig, {"target_modules": "all-linear"})).rules == (
        Target(Selection((AllLinear(),))),)


# --------------------------------------------------------------------------- errors


def test_unknown_fields_and_methods_are_named():
    with pytest.raises(ConversionError, match="`lora_alpah` is not a field .* did you mean `lora_alpha`"):
        spec_from_peft_config({"peft_type": "LORA", "lora_alpah": 8})
    with pytest.raises(ConversionError, match="'PROMPT_TUNING' is not supported"):
        spec_from_peft_config({"peft_type": "PROMPT_TUNING"})
    with pytest.raises(ConversionError, match="no `peft_type`"):
        spec_from_peft_config({"r": 8})


def test_what_a_spec_cannot_say_is_an_error():
    with pytest.raises(ConversionError, match="per-architecture table"):
        spec_from_peft_config(build(LoraConfig, {"layers_to_transform": [0]}))
    with pytest.raises(ConversionError, match="`feedforward_modules` is null"):
        spec_from_peft_config(build(IA3Config, {"target_modules": ["q"]}))
    with pytest.raises(ConversionError, match="`target_modules` is empty"):
        spec_from_peft_config(build(LoraConfig, {"target_modules": []}))
    only = spec_from_peft_config(build(LoraConfig, {"target_modules": [], "target_parameters": ["e.w"]}))
    assert not tuple(only.rules_of(Target)) and tuple(only.option("target_parameters")) == ("e.w",)
    with pytest.raises(ConversionError, match="`use_rslora`"):
        spec_from_peft_config(build(AdaLoraConfig, {"total_step": 10, "use_rslora": True}))


SPAN = Span("x.peft", 10, 15, 3, 12)


def lora(*rules, options=()) -> Adapter:
    return Adapter("default", "lora", tuple(options), tuple(rules))


@pytest.mark.parametrize("adapter, message", [
    (lora(Target(Selection((RoleRef("attn.q", SPAN),)))), "a role"),
    (lora(Target(Selection((ModuleType("Linear", SPAN),)))), "a module type"),
    (lora(Target(Selection((Name("q"),), within="lm", span=SPAN))), "`within`"),
    (lora(Target(Selection((Name("q"),), exclude=(Name("k", SPAN),)))), "`except`"),
    (lora(Target(Selection((Name("q"),), layers=Layers((0,)))),
          Target(Selection((Name("v"),), span=SPAN))), "different layer restrictions"),
    (lora(Target(Selection((Name("q"),), layers=Layers((LayerSlice(4, None),), span=SPAN)))), "open-ended"),
    (lora(Target(Selection((Name("q"),), layers=Layers((-1,), span=SPAN)))), "negative"),
    (lora(Target(Selection((AllLinear(SPAN), Name("q"))))), "all-linear"),
    (lora(Target(Selection((Regex("a.*", SPAN),), layers=Layers((0,))))), "regex"),
    (lora(Target(Selection((Name("q"),))), Rank(4, Selection((Name("q"),))),
          Rank(8, Selection((Regex("a.q", SPAN),)))), "depends on how many modules"),
])
def test_needs_the_model(adapter, message):
    with pytest.raises(NeedsModelError, match=message) as caught:
        peft_config_from_adapter(adapter)
    assert str(caught.value).startswith("x.peft:3:12: ")


def test_expressible_selectors_compile():
    adapter = lora(
        Target(Selection((Name("q"), Regex(r"a\.\d+\.v")))),
        Rank(4, Selection((Name("q"),))), Rank(8, Selection((Regex("a.q"),), exclude=(Name("q"),))),
        options=(Option("r", 16), Option("lora_alpha", 32.0)))
    config = peft_config_from_adapter(adapter)
    assert config["target_modules"] == r"(?:.*\.)?q|a\.\d+\.v"
    assert config["rank_pattern"] == {"q": 4, "^a.q": 8}
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (16, 32.0, "LORA")
    assert load(config)["r"] == 16


def test_rules_the_method_lacks_are_refused():
    adapter = Adapter("default", "loha", (), (Target(Selection((Name("q"),))), Tokens(None, (1,))))
    with pytest.raises(ConversionError, match="no field for `tokens` rules"):
        peft_config_from_adapter(adapter)


def test_unknown_option_is_refused():
    with pytest.raises(ConversionError, match="`feedforward_modules`"):
        peft_config_from_adapter(lora(options=(Option("feedforward_modules", ("a",)),)))
