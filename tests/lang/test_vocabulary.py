"""The vocabulary against the oracle: every option name and default equals peft 0.21's config
dataclasses, and every peft field is accounted for (an option, a rule, or knowingly unmodeled)."""

from __future__ import annotations

import dataclasses

import pytest

from surgeon.lang import vocabulary as vocab
from surgeon.lang.spec import to_python
from surgeon.methods import config_of
from surgeon.methods.base import BOOKKEEPING

peft = pytest.importorskip("peft")

CONFIGS = {
    "lora": peft.LoraConfig, "ia3": peft.IA3Config, "adalora": peft.AdaLoraConfig,
    "loha": peft.LoHaConfig, "lokr": peft.LoKrConfig,
    "vera": peft.VeraConfig, "oft": peft.OFTConfig, "hra": peft.HRAConfig,
    "road": peft.RoadConfig, "delora": peft.DeloraConfig,
    "boft": peft.BOFTConfig,
    "c3a": peft.C3AConfig, "waveft": peft.WaveFTConfig,
    "ln_tuning": peft.LNTuningConfig, "fourierft": peft.FourierFTConfig,
    "randlora": peft.RandLoraConfig, "vblora": peft.VBLoRAConfig,
    "miss": peft.MissConfig, "shira": peft.ShiraConfig,
    "gralora": peft.GraloraConfig, "osf": peft.OSFConfig,
}


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_methods_are_peft_types():
    assert set(vocab.methods()) <= {t.value.lower() for t in peft.PeftType}


@pytest.mark.parametrize("method", vocab.methods())
def test_options_match_peft_fields_and_defaults(method):
    peft_defaults = _defaults(CONFIGS[method])
    for field in vocab.fields_of(method):
        assert field.name in peft_defaults, f"{method}.{field.name} is not a peft field"
        assert to_python(vocab.default_of(method, field.name)) == peft_defaults[field.name], field.name


@pytest.mark.parametrize("method", vocab.methods())
def test_every_peft_field_is_accounted_for(method):
    peft_fields = {f.name for f in dataclasses.fields(CONFIGS[method]) if f.init}
    options = set(vocab.canonical_order(method))
    rules = set(vocab.RULE_FIELDS) & peft_fields
    if method in ("adalora", "osf"):  # AdaLoRA's rank_pattern is training state, OSF's matched
        # by re.search: both options (tables), not `rank` rules
        rules.discard("rank_pattern")
    missing = peft_fields - options - rules - (BOOKKEEPING | {f.name for f in config_of(method).unmodeled})
    assert not missing, f"peft {method} fields not in the vocabulary: {sorted(missing)}"
    assert not options & rules


@pytest.mark.parametrize("method", vocab.methods())
def test_defaults_pass_their_own_validators(method):
    for field in vocab.fields_of(method):
        assert field.problem(field.default) is None, field.name


def test_enum_choices_match_peft():
    lora = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    assert set(vocab.field_of("lora", "bias").kind.choices) == {"none", "all", "lora_only"}
    assert set(vocab.field_of("lora", "task_type").kind.choices) == {t.value for t in peft.TaskType}
    for choice in ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica"):
        assert choice in str(lora["init_lora_weights"].type)
        assert vocab.field_of("lora", "init").problem(choice) is None
    assert vocab.field_of("lora", "init").problem("pissa_niter_16") is None
    assert vocab.field_of("lora", "init").problem("pisa") is not None


def test_team_aliases():
    assert vocab.aliases("lora") == {
        "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora", "dora": "use_dora",
        "init": "init_lora_weights",
    }
    assert vocab.aliases("ia3") == {"init": "init_ia3_weights"}
    assert vocab.aliases("loha") == {"init": "init_weights"}
    assert vocab.aliases("lokr") == {"init": "init_weights"}
    assert vocab.alias_of("lora", "lora_alpha") == "alpha"
    assert vocab.alias_of("loha", "alpha") == "alpha"


def test_validators():
    r = vocab.field_of("lora", "r")
    assert r.problem(8) is None and r.problem(0) and r.problem(-1) and r.problem(2.0) and r.problem(True)
    dropout = vocab.field_of("lora", "dropout")
    assert dropout.problem(0) is None and dropout.problem(0.99) is None
    assert dropout.problem(1.0) and dropout.problem(-0.1) and dropout.problem(float("nan"))
    assert vocab.field_of("lora", "base_model_name_or_path").problem(None) is None
    assert vocab.field_of("lora", "r").problem(None)


def test_default_of_unknown_field_raises_key_error():
    with pytest.raises(KeyError):
        vocab.default_of("ia3", "r")
