"""PEFT is the oracle: generated LoraConfigs and their equivalent Specs select the same modules.

For each generated config (target_modules as a list, a regex or "all-linear"; exclude_modules;
layers_to_transform/layers_pattern; modules_to_save; rank_pattern/alpha_pattern that do not
overlap; rsLoRA, DoRA, lora_bias, bias) PEFT injects into a deepcopy of a tiny model, and the
plan of the equivalent Spec must have PEFT's targeted modules, in order, with PEFT's per-module
r, alpha, scaling and parameter count, and PEFT's trainable parameter total. When PEFT raises,
the plan must raise PlanError.
"""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from surgeon.lang.spec import (
    Adapter,
    AllLinear,
    Alpha,
    Exclude,
    Layers,
    Name,
    Option,
    Rank,
    Regex,
    Save,
    Selection,
    Spec,
    Target,
)
from surgeon.planning.planner import PlanError, plan
from tests.core.test_layers import PEFT_LAYERS_PATTERN, tiny_models

ADAPTABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the attribute name of each plain model's block stack (its PEFT layers_pattern)
PLAIN_LAYERS_PATTERN = {"nested": "blocks", "shared": "layers", "conv": "stages"}
MODELS = tuple(PEFT_LAYERS_PATTERN) + tuple(PLAIN_LAYERS_PATTERN)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, ADAPTABLE) or type(module).__name__ == "Conv1D"


def _vocabulary(model: nn.Module) -> dict[str, list[str]]:
    """Names to draw selectors from: adaptable leaf names, 2-segment suffixes, containers."""
    named = [(p, m) for p, m in model.named_modules() if p]
    leaf = sorted({p.rsplit(".", 1)[-1] for p, m in named if _adaptable(m)})
    pair = sorted({".".join(p.split(".")[-2:]) for p, m in named if _adaptable(m) and "." in p})
    other = sorted({p.rsplit(".", 1)[-1] for p, m in named if not _adaptable(m)})
    return {"leaf": leaf, "pair": pair, "other": other, "paths": [p for p, m in named if _adaptable(m)]}


@st.composite
def configs(draw, name: str):
    """A PEFT LoraConfig's keyword arguments for model `name`."""
    model = tiny_models()[name]
    vocab = _vocabulary(model)
    names = st.sampled_from(vocab["leaf"]) | st.sampled_from(vocab["pair"])
    rare = st.sampled_from(vocab["other"])  # containers and non-adaptable leaves: PEFT raises
    kw: dict = {
        "r": draw(st.integers(1, 8)), "lora_alpha": draw(st.integers(1, 32)),
        "use_rslora": draw(st.booleans()), "use_dora": draw(st.booleans()),
        "bias": draw(st.sampled_from(["none", "all", "lora_only"])),
    }
    # LoraConfig itself refuses lora_bias with DoRA (the spec checker's business, not selection)
    kw["lora_bias"] = not kw["use_dora"] and draw(st.booleans())
    kind = draw(st.sampled_from(["list", "list", "list", "regex", "all-linear"]))
    if kind == "list":
        kw["target_modules"] = draw(st.lists(names | rare if draw(st.integers(0, 9)) == 0 else names,
                                             min_size=1, max_size=4, unique=True))
        if draw(st.booleans()):
            _draw_layers(draw, name, model, kw)
    elif kind == "regex":
        if draw(st.booleans()):
            picked = draw(st.lists(st.sampled_from(vocab["leaf"]), min_size=1, max_size=3, unique=True))
            kw["target_modules"] = rf".*\.({'|'.join(map(re.escape, picked))})"
        else:
            picked = draw(st.lists(st.sampled_from(vocab["paths"]), min_size=1, max_size=3, unique=True))
            kw["target_modules"] = "|".join(map(re.escape, picked))
    else:
        kw["target_modules"] = "all-linear"
        kw["task_type"] = draw(st.sampled_from([None, "SEQ_CLS"]))
    exclude = draw(st.sampled_from(["none", "list", "regex"]))
    if exclude == "list":
        kw["exclude_modules"] = draw(st.lists(names, min_size=1, max_size=2, unique=True))
    elif exclude == "regex":
        kw["exclude_modules"] = rf".*\.{re.escape(draw(st.sampled_from(vocab['leaf'])))}"
    if draw(st.integers(0, 3)) == 0:
        heads = ["lm_head", "classifier", "head", "fc", "score"] + vocab["leaf"]
        kw["modules_to_save"] = [draw(st.sampled_from(heads))]
    for key in ("rank_pattern", "alpha_pattern"):  # distinct leaf names never overlap
        keys = draw(st.lists(st.sampled_from(vocab["leaf"]), max_size=2, unique=True))
        kw[key] = {k: draw(st.integers(1, 16)) for k in keys}
    return kw


def _draw_layers(draw, name: str, model: nn.Module, kw: dict) -> None:
    # PEFT matches a target equal to a whole path without looking at layers (`key in
    # target_modules`); keep such names out so a layer restriction means the same on both sides.
    paths = {p for p, _ in model.named_modules()}
    kw["target_modules"] = [t for t in kw["target_modules"] if t not in paths]
    assume(kw["target_modules"])
    kw["layers_to_transform"] = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    pattern = PEFT_LAYERS_PATTERN.get(name) or PLAIN_LAYERS_PATTERN[name]
    # without a pattern PEFT takes the first numbered segment; on these transformers models that
    # equals the structural index, which is what a pattern-less `layers[...]` means in a spec
    options = [pattern] if name in PLAIN_LAYERS_PATTERN else [pattern, None]
    kw["layers_pattern"] = draw(st.sampled_from(options))


def spec_of(kw: dict) -> Spec:
    """The Spec that says what the LoraConfig `kw` says."""
    stated = ("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "bias")
    options = tuple(Option(k, kw[k]) for k in stated)
    options += (Option("lora_dropout", 0.0), Option("init_lora_weights", True),
                Option("task_type", kw.get("task_type")))
    targets = kw["target_modules"]
    if targets == "all-linear":
        include = (AllLinear(),)
    elif isinstance(targets, str):
        include = (Regex(targets),)
    else:
        include = tuple(Name(t) for t in targets)
    layers = None
    if kw.get("layers_to_transform"):
        pattern = kw.get("layers_pattern")
        layers = Layers(tuple(kw["layers_to_transform"]), (pattern,) if pattern else ())
    rules: list = [Target(Selection(include, layers=layers))]
    excluded = kw.get("exclude_modules")
    if excluded:
        atoms = (Regex(excluded),) if isinstance(excluded, str) else tuple(Name(e) for e in excluded)
        rules.append(Exclude(Selection(atoms)))
    if kw.get("modules_to_save"):
        rules.append(Save(tuple(kw["modules_to_save"])))
    for key, value in kw["rank_pattern"].items():
        rules.append(Rank(value, Selection((Name(key),))))
    for key, value in kw["alpha_pattern"].items():  # PEFT's pattern key as a regex
        rules.append(Alpha(value, Selection((Regex(rf"(.*\.)?({key})"),))))
    return Spec((Adapter("default", "lora", options, tuple(rules)),))


def peft_inject(model: nn.Module, kw: dict):
    """PEFT's LoraModel on a deepcopy: the tuner, or the exception PEFT raised."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if kw.get("task_type"):  # the task model adds its heads to modules_to_save
                return get_peft_model(copy.deepcopy(model), LoraConfig(**kw)).base_model
            return LoraModel(copy.deepcopy(model), LoraConfig(**kw), "default")
        except (ValueError, TypeError) as error:
            return error


def _lora_numel(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)


def _saves_an_adapted_module(model: nn.Module, tuner, kw: dict) -> bool:
    saved = [m for p, m in model.named_modules(remove_duplicate=False)
             if any(p.endswith(n) for n in tuner.peft_config["default"].modules_to_save or ())]
    adapted = {id(model.get_submodule(p)) for p in tuner.targeted_module_names}
    return any(id(m) in adapted for s in saved for m in s.modules())


def _saves_nested_modules(model: nn.Module, tuner) -> bool:
    names = tuner.peft_config["default"].modules_to_save or ()
    saved = [p for p, _ in model.named_modules(remove_duplicate=False) if p and any(p.endswith(n) for n in names)]
    return any(i.startswith(o + ".") for o in saved for i in saved)


def check_against_peft(name: str | nn.Module, kw: dict) -> None:
    model = tiny_models()[name] if isinstance(name, str) else name
    expected = peft_inject(model, kw)
    spec = spec_of(kw)
    if (isinstance(expected, Exception) or _saves_an_adapted_module(model, expected, kw)
            or _saves_nested_modules(model, expected)):
        # stricter than PEFT: a saved module containing an adapted one (PEFT copies the adapter
        # layers into the saved copy) is an error too, and so is a saved module inside another
        # (PEFT wraps the inner one twice, inside the copy and the original)
        with pytest.raises(PlanError):
            plan(spec, model)
        return
    got = plan(spec, model)
    assert list(got.paths()) == expected.targeted_module_names
    for site in got.sites:
        layer = expected.model.get_submodule(site.path)
        assert (site.r, site.alpha) == (layer.r["default"], layer.lora_alpha["default"]), site.path
        assert site.scaling == pytest.approx(layer.scaling["default"]), site.path
        assert site.params == _lora_numel(layer), site.path
    trainable = sum(p.numel() for p in expected.model.parameters() if p.requires_grad)
    assert got.trainable_params == trainable


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=int(os.environ.get("SURGEON_EXAMPLES", 30)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_plan_selects_what_peft_targets(name, data):
    check_against_peft(name, data.draw(configs(name)))


@pytest.mark.parametrize("name,kw", [
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 2],
               "layers_pattern": "layers"}),
    ("gpt2", {"target_modules": ["c_attn"], "layers_to_transform": [1]}),
    ("t5", {"target_modules": ["q", "v"], "layers_to_transform": [1], "layers_pattern": "block"}),
    ("bert", {"target_modules": "all-linear", "task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}),
    ("t5", {"target_modules": ["shared", "wo"],
            "exclude_modules": ["decoder.block.0.layer.2.DenseReluDense.wo"]}),
    ("shared", {"target_modules": ["q", "proj", "alias"]}),
    ("nested", {"target_modules": ["towers.left.proj", "fc", "q"], "modules_to_save": ["blocks.1"]}),
    ("nested", {"target_modules": ["proj"], "modules_to_save": ["blocks"]}),  # a ModuleList: raises
    ("conv", {"target_modules": ["conv", "seq", "vol", "emb"], "use_dora": True}),
    ("llama", {"target_modules": ["mlp"]}),  # a container: PEFT raises
    ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["q_proj"]}),  # all saved: raises
])
def test_known_cases(name, kw):
    kw = {"r": 4, "lora_alpha": 8, "use_rslora": False, "use_dora": False, "lora_bias": False,
          "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, **kw}
    check_against_peft(name, kw)


def _zoo():
    from tests.models import CASES

    return [pytest.param(case, id=case.name) for case in CASES.values()]


@pytest.mark.parametrize("case", _zoo())
def test_zoo_cases(case):
    """The shared tiny zoo: q/v in the last layer, then all-linear (or every linear) with a save."""
    model = case.build()
    base = {"r": 4, "lora_alpha": 8, "use_rslora": True, "use_dora": False, "lora_bias": False,
            "bias": "lora_only", "rank_pattern": {}, "alpha_pattern": {}}
    layers = {"layers_to_transform": [1], "layers_pattern": case.layers} if case.layers else {}
    check_against_peft(model, {**base, "target_modules": list(case.qv), **layers})
    linear = "all-linear" if case.hf else list(case.linear)
    save = {"modules_to_save": [case.save]} if case.save else {}
    check_against_peft(model, {**base, "target_modules": linear, "task_type": "SEQ_CLS", **save})
