"""plan(): purity, hyperparameter resolution, errors and warnings, rendering, PEFT totals."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import surgeon.capture.infer
from surgeon.lang import load_spec
from surgeon.lang.spec import (
    Adapter,
    AllLinear,
    Alpha,
    Layers,
    LayerSlice,
    Name,
    Option,
    Rank,
    Save,
    Selection,
    Span,
    Spec,
    Target,
)
from surgeon.planning.planner import Plan, PlanError, plan
from tests.core.test_layers import tiny_models

SPEC = """\
# llama.peft
adapter default = lora(r=8, alpha=16, dropout=0.05, rslora=true) {
    target q_proj, v_proj
    target all-linear in layers[-1:]
    exclude down_proj
    rank 4 on q_proj
    alpha 2 on layers[0]
    save lm_head
}
"""


def _snapshot(model: nn.Module) -> dict:
    """Everything plan() could possibly change: modules, parameters (identity and values), flags."""
    return {
        "modules": [(n, id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
                    for n, m in model.named_modules(remove_duplicate=False)],
        "params": [(n, id(p), p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dict_keys": {n: sorted(vars(m)) for n, m in model.named_modules()},
    }


def _same(a: dict, b: dict) -> bool:
    return (a["modules"] == b["modules"] and a["params"] == b["params"] and a["dict_keys"] == b["dict_keys"]
            and a["state"].keys() == b["state"].keys()
            and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]))


def test_plan_leaves_the_model_untouched():
    model = tiny_models()["llama"]
    before = _snapshot(model)
    spec = SPEC.replace("save lm_head", "save lm_head\n    tokens [0, 1]\n    target @attn.k")
    result = plan(spec, model)
    assert any(s.path.endswith("k_proj") for s in result.sites)  # the role selector did run
    assert _same(before, _snapshot(model))


def test_spec_text_path_and_object_give_the_same_plan(tmp_path):
    from surgeon.lang.parser import load_spec

    file = tmp_path / "llama.peft"
    file.write_text(SPEC)
    model = tiny_models()["llama"]
    from_text, from_path = plan(SPEC, model), plan(file, model)
    assert from_text.sites == plan(load_spec(SPEC), model).sites
    assert plan(str(file), model).to_json() == from_path.to_json()
    assert from_path.sites[0].rule == f"{file}:3:5"
    assert [dataclasses.replace(s, rule="") for s in from_text.sites] == [
        dataclasses.replace(s, rule="") for s in from_path.sites]


def test_resolved_hyperparameters():
    result = plan(SPEC, tiny_models()["llama"])
    by_path = {s.path: s for s in result.sites}
    assert list(by_path) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj",
        "model.layers.2.self_attn.v_proj", "model.layers.2.self_attn.o_proj",
        "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj",
    ]
    q0, v0, k2 = (by_path[f"model.layers.{i}.self_attn.{p}_proj"] for i, p in ((0, "q"), (0, "v"), (2, "k")))
    assert (q0.r, q0.alpha, q0.scaling) == (4, 2.0, 2 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert (v0.r, v0.alpha) == (8, 2.0) and (k2.r, k2.alpha) == (8, 16.0)
    assert k2.rule == "<spec>:4:5" and q0.rule == "<spec>:3:5"
    assert q0.options == (("bias", "none"), ("fan_in_fan_out", False), ("inference_mode", False),
                          ("init_lora_weights", True),
                          ("lora_bias", False), ("lora_dropout", 0.05), ("use_dora", False),
                          ("use_rslora", True))
    assert q0.params == 4 * (32 + 32) and k2.params == 8 * (32 + 16)  # A (r x in) + B (out x r)
    assert result.adapter("default").save == ("lm_head",)


def _adapter(*rules, **options) -> Spec:
    opts = tuple(Option(k, v) for k, v in {"r": 8, "lora_alpha": 8, **options}.items())
    return Spec((Adapter("default", "lora", opts, rules),))


def test_most_specific_rank_wins_then_the_later_rule():
    llama = tiny_models()["llama"]
    q_proj = Selection((Name("q_proj"),))
    linear = Selection((AllLinear(),))
    layer0 = Selection((), layers=Layers((0,)))
    spec = _adapter(Target(linear), Rank(16, q_proj), Rank(2, linear), Rank(32, layer0),
                    Alpha(3, Selection((Name("q_proj"),), layers=Layers((1,)))),
                    Alpha(5, q_proj), Alpha(7, q_proj))
    ranks = {s.path: (s.r, s.alpha) for s in plan(spec, llama).sites}
    assert ranks["model.layers.1.self_attn.q_proj"] == (16, 3)  # 3 q_proj < 7 layer-0 sites < 21 linear
    assert ranks["model.layers.0.self_attn.q_proj"] == (16, 7)  # equal alpha rules: the later wins
    assert ranks["model.layers.0.mlp.up_proj"] == (32, 8)
    assert ranks["model.layers.2.mlp.up_proj"] == (2, 8)


def test_ranks_and_alphas_match_peft_patterns():
    """Non-overlapping rank/alpha rules equal PEFT's rank_pattern/alpha_pattern."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    gpt2 = tiny_models()["gpt2"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"],
                        rank_pattern={"c_fc": 2, r"h\.1\.attn\.c_proj": 6}, alpha_pattern={"c_attn": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = LoraModel(copy.deepcopy(gpt2), config, "default")
    spec = _adapter(Target(Selection((Name("c_attn"), Name("c_fc"), Name("c_proj")))),
                    Rank(2, Selection((Name("c_fc"),))), Rank(6, Selection((Name("h.1.attn.c_proj"),))),
                    Alpha(1, Selection((Name("c_attn"),))), r=4, lora_alpha=8)
    result = plan(spec, gpt2)
    assert list(result.paths()) == peft_model.targeted_module_names
    for site in result.sites:
        layer = peft_model.model.get_submodule(site.path)
        assert (site.r, site.alpha, site.scaling) == (
            layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"])
        assert dict(site.options)["fan_in_fan_out"] is True  # Conv1D stores (in, out)


def test_trainable_tokens_and_totals_match_peft():
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    llama = tiny_models()["llama"]
    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[0, 3, 5],
                        modules_to_save=["model.norm"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = LoraModel(copy.deepcopy(llama), config, "default")
    trainable = sum(p.numel() for p in peft_model.model.parameters() if p.requires_grad)
    source = "adapter default = lora(r=2) {\n target q_proj\n tokens [0, 3, 5]\n save model.norm\n}"
    result = plan(source, llama)
    assert result.adapter("default").tokens == (("model.embed_tokens", (0, 3, 5)),)
    assert result.adapter("default").save == ("model.norm",)
    assert result.trainable_params == trainable
    assert result.model_params == sum(p.numel() for p in llama.parameters())
    assert result.trainable_percent == pytest.approx(100 * trainable / result.model_params)


# --------------------------------------------------------------------------- errors


def test_unmatched_target_names_its_location_and_the_closest_modules():
    source = "adapter default = lora(r=8) {\n    target q_proj\n    target q_prj, k_prj\n}\n"
    with pytest.raises(PlanError) as caught:
        plan(source, tiny_models()["llama"])
    text = str(caught.value)
    assert text.startswith("<spec>:3:5: error: `target q_prj, k_prj` matches no module of `LlamaForCausalLM`")
    assert "\n    target q_prj, k_prj\n    ^^^^^^^^^^^^^^^^^^^\n" in text
    assert "hint: did you mean `q_proj`" in text and "`k_proj`" in text
    assert isinstance(caught.value, ValueError) and caught.value.location == "<spec>:3:5"
    assert caught.value.diagnostic.severity == "error" and caught.value.diagnostic.span.line == 3
    assert str(pickle.loads(pickle.dumps(caught.value))) == text


def test_unmatched_target_built_in_python_carries_its_span():
    source = "...\n  target lm_haed\n"
    span = Span("demo.peft", 6, 20, 2, 3)
    spec = Spec((Adapter("default", "lora", (Option("r", 4),),
                         (Target(Selection((Name("lm_haed"),)), span=span),)),), source=source)
    with pytest.raises(PlanError, match=r"(?s)^demo\.peft:2:3: error: .*lm_haed.*did you mean `lm_head`"):
        plan(spec, tiny_models()["llama"])


def test_layer_restriction_and_within_errors_say_why():
    llama = tiny_models()["llama"]
    with pytest.raises(PlanError, match=r"none inside its restrictions \(layers: `model.layers` has 3\)"):
        plan("adapter default = lora() { target q_proj in layers[5] }", llama)
    with pytest.raises(PlanError, match=r"(?s)`within model.layer`: the model has no module.*`model.layers`"):
        plan("adapter default = lora() { target q_proj within model.layer }", llama)


def test_unsupported_layers_name_the_module_and_the_supported_kinds():
    llama = tiny_models()["llama"]
    with pytest.raises(PlanError) as caught:
        plan("adapter default = lora() {\n  target mlp\n}", llama)
    assert "`model.layers.0.mlp` (LlamaMLP) cannot be adapted; supported kinds: " \
           "Linear, Conv1D, Conv1d, Conv2d, Conv3d, Embedding" in str(caught.value)
    assert str(caught.value).startswith("<spec>:2:3: error:")
    with pytest.raises(PlanError, match=r"`model.norm` \(LlamaRMSNorm\) cannot be adapted"):
        plan("adapter default = lora() { target model.norm }", llama)
    with pytest.raises(PlanError, match=r"`rnn` \(LSTM\) cannot be adapted"):
        model = nn.Sequential()
        model.add_module("rnn", nn.LSTM(8, 8))
        plan(_adapter(Target(Selection((Name("rnn"),)))), model)


def test_methods_without_a_runtime_are_not_applied_yet():
    from tests.methods.parsed_only import parsed_only_method

    with parsed_only_method(), pytest.raises(
            PlanError, match="method `parsedonly` is parsed and converted but not yet applied; supported: lora"):
        plan("adapter default = parsedonly() { target k_proj }", tiny_models()["llama"])


def test_options_the_planner_cannot_honour_are_refused():
    with pytest.raises(PlanError, match="`layer_replication` is converted but not planned"):
        plan('adapter default = lora(layer_replication=[[0, 1]]) { target q_proj }',
             tiny_models()["llama"])


def test_everything_excluded_is_an_error():
    with pytest.raises(PlanError, match="adapts no module"):
        plan("adapter default = lora() { target q_proj  exclude q_proj }", tiny_models()["llama"])
    gpt2 = tiny_models()["gpt2"]
    with pytest.raises(PlanError, match=r"saved module `transformer.h.0.mlp.c_fc` is also adapted"):
        plan('adapter default = lora() { target c_fc  save "fc" }', gpt2)  # PEFT: plain suffix
    contains = r"saved module `transformer.h.0.mlp` contains `transformer.h.0.mlp.c_fc`"
    with pytest.raises(PlanError, match=contains):
        plan('adapter default = lora() { target c_fc  save "lp" }', gpt2)


def test_unmatched_non_target_rules_are_warnings():
    source = ("adapter default = lora() {\n  target q_proj, nope\n  rank 4 on mlp.down_proj\n"
              "  alpha 2 on v_proj\n  exclude lm_hed\n  save missing\n}")
    result = plan(source, tiny_models()["llama"])
    assert [(u.rule, u.text, u.location) for u in result.unmatched] == [
        ("target", "nope", "<spec>:2:18"), ("exclude", "exclude lm_hed", "<spec>:5:3"),
        ("rank", "rank 4 on mlp.down_proj", "<spec>:3:3"), ("alpha", "alpha 2 on v_proj", "<spec>:4:3"),
        ("save", "save missing", "<spec>:6:3"),
    ]
    warning = "<spec>:3:3: warning: `rank 4 on mlp.down_proj` (rank rule of `default`) matched nothing"
    assert warning in str(result)


def test_unmatched_rules_of_a_spec_built_in_python():
    spec = _adapter(Target(Selection((Name("q_proj"),))), Rank(4, Selection((Name("nope"),))),
                    Alpha(0.5, Selection((Name("up_proj"),))), Save(("gone",)))
    result = plan(spec, tiny_models()["llama"])
    assert [(u.text, u.location) for u in result.unmatched] == [
        ("rank 4 on nope", ""), ("alpha 0.5 on up_proj", ""), ("save gone", "")]
    assert "\nwarning: `rank 4 on nope` (rank rule of `default`) matched nothing" in str(result)


# --------------------------------------------------------------------------- default placement


def test_default_placement_is_query_and_value_by_role(monkeypatch):
    roles = {"blocks.0.attn.q": "attn.q", "blocks.0.attn.v": "attn.v", "towers.left.proj": "attn.qkv",
             "blocks.0.mlp.0": "mlp.up"}
    analysis = surgeon.capture.infer.Analysis
    monkeypatch.setattr(surgeon.capture.infer, "analyse",
                        lambda model, example_inputs=None: analysis(roles, {}, {}))
    result = plan(_adapter(), tiny_models()["nested"])
    assert result.paths() == ("towers.left.proj", "blocks.0.attn.q", "blocks.0.attn.v")
    assert {s.rule for s in result.sites} == {"default(@attn.q, @attn.v)"}
    monkeypatch.setattr(surgeon.capture.infer, "analyse",
                        lambda model, example_inputs=None: analysis({}, {}, {}))
    with pytest.raises(PlanError, match=r"no target rule and the default placement \(@attn.q, @attn.v\)"):
        plan(_adapter(), tiny_models()["nested"])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_default_placement_equals_peft_tables(name):
    """PEFT's per-architecture table (target_modules=None) and roles agree on these models."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    model = tiny_models()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = LoraModel(copy.deepcopy(model), LoraConfig(), "default").targeted_module_names
    assert list(plan(_adapter(), model).paths()) == want


# --------------------------------------------------------------------------- output


def test_table_and_json():
    two = SPEC + "adapter extra = lora(r=2) { target o_proj in layers[0] }\n"
    result = plan(two, tiny_models()["llama"])
    assert isinstance(result, Plan)
    assert result.paths("extra") == ("model.layers.0.self_attn.o_proj",)
    assert [s.adapter for s in result.sites].count("extra") == 1
    text = str(result)
    header = text.splitlines()[0].split()
    assert header == ["path", "kind", "adapter", "method", "r", "alpha", "params", "rule"]
    assert "model.layers.0.self_attn.o_proj  Linear  extra" in text
    assert "save (default): lm_head" in text
    assert text.splitlines()[-1].startswith("11 sites; trainable params: ")
    data = json.loads(json.dumps(result.to_json()))
    assert data["sites"][0]["path"] == "model.layers.0.self_attn.q_proj"
    assert [a["name"] for a in data["adapters"]] == ["default", "extra"]
    assert data["adapters"][0]["options"]["lora_alpha"] == 16
    assert data["trainable_params"] == result.trainable_params == sum(a.params for a in result.adapters)


def test_meta_device_and_layer_slices():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    spec = _adapter(Target(Selection((Name("q_proj"), Name("v_proj")),
                                     layers=Layers((0, LayerSlice(-2, None), LayerSlice(2, 6, 2))))))
    result = plan(spec, model)
    assert {int(p.split(".")[2]) for p in result.paths()} == {0, 2, 4, 6, 7}
    assert result.trainable_params == 10 * 8 * (64 + 64) - 5 * 8 * (64 - 32)  # v_proj: 32 out (GQA)


def test_task_type_heads_join_save_and_the_adapter_rules():
    """PEFT's task model appends its head names to modules_to_save; the plan's adapter says so too
    (it is what adapter_config.json is written from), without repeating names a rule states."""
    model = tiny_models()["bert"]
    base = "adapter default = lora(r=2, task_type=SEQ_CLS) { target query %s }"
    bare = plan(base % "", model).adapter("default")
    assert (bare.save, bare.heads) == (("classifier",), ("classifier",))
    assert bare.adapter.rules[-1] == Save(("classifier", "score"))
    assert bare.to_json()["task_heads"] == ["classifier"]
    named = plan(base % " save classifier, pooler", model).adapter("default")
    assert named.save == ("bert.pooler", "classifier") and named.heads == ("classifier",)
    assert [r.names for r in named.adapter.rules_of(Save)] == [("classifier", "pooler"), ("score",)]
    both = plan(base % " save classifier, score", model).adapter("default")
    assert [r.names for r in both.adapter.rules_of(Save)] == [("classifier", "score")]
    causal = plan(base.replace("SEQ_CLS", "CAUSAL_LM") % "", model).adapter("default")
    assert (causal.save, causal.heads, causal.adapter.rules_of(Save)) == ((), (), ())


def test_a_target_inside_a_task_head_is_not_adapted():
    """PEFT's modules_to_save guard: the head is saved, never a target; nothing left is an error."""
    from peft import LoraConfig, get_peft_model

    model = tiny_models()["bert"]
    with pytest.raises(PlanError, match="task_type=SEQ_CLS"):
        plan("adapter default = lora(r=2, task_type=SEQ_CLS) { target classifier }", model)
    with warnings.catch_warnings(), pytest.raises(ValueError):
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["classifier"], task_type="SEQ_CLS"))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_spec_without_targets_is_peft_default_placement_both_ways(name):
    """No `target` rule in the text means the classic placement by roles, and it converts to
    PEFT's `target_modules: null` (its table default) and back."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    from surgeon.peft_format.config import peft_config_from_adapter, spec_from_peft_config

    text = "adapter default = lora(r=8, alpha=16) { }"
    model = tiny_models()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = LoraModel(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16), "default").targeted_module_names
    assert list(plan(text, model).paths()) == want
    config = peft_config_from_adapter(load_spec(text).adapters[0])
    assert config["target_modules"] is None
    assert spec_from_peft_config(config).rules_of(Target) == ()
