"""Selector semantics (surgeon.planning.select) on tiny models, against explicit path lists and PEFT."""

from __future__ import annotations

import copy
import warnings

import pytest
from torch import nn

import surgeon.capture.infer
from surgeon.lang.spec import (
    AllLinear,
    Glob,
    Layers,
    LayerSlice,
    ModuleType,
    Name,
    Regex,
    RoleRef,
    Selection,
)
from surgeon.layer_kinds import kind_of
from surgeon.planning.select import Resolver, glob_matches
from tests.core.test_layers import ConvNet, tiny_models

LLAMA_Q = tuple(f"model.layers.{i}.self_attn.q_proj" for i in range(3))


def _select(model, *atoms, **restrictions) -> tuple[str, ...]:
    return Resolver(model).select(Selection(tuple(atoms), **restrictions))


@pytest.fixture
def no_roles(monkeypatch):
    """Fail loudly if anything captures the model for roles."""
    def boom(*args, **kwargs):
        raise AssertionError("infer_roles was called for a selection that needs no roles")

    monkeypatch.setattr(surgeon.capture.infer, "infer_roles", boom)
    monkeypatch.setattr(surgeon.capture.infer, "analyse", boom)


def test_name_is_suffix_on_whole_segments(no_roles):
    llama = tiny_models()["llama"]
    assert _select(llama, Name("q_proj")) == LLAMA_Q
    assert _select(llama, Name("self_attn.q_proj")) == LLAMA_Q
    assert _select(llama, Name("proj")) == ()  # not a whole segment
    assert _select(llama, Name("model.layers.1.self_attn.q_proj")) == (LLAMA_Q[1],)
    assert _select(llama, Name("lm_head")) == ("lm_head",)


def test_regex_is_full_match(no_roles):
    llama = tiny_models()["llama"]
    assert _select(llama, Regex("q_proj")) == ()
    assert _select(llama, Regex(r".*\.q_proj")) == LLAMA_Q
    assert _select(llama, Regex(r"model\.layers\.[02]\.self_attn\.q_proj")) == (LLAMA_Q[0], LLAMA_Q[2])


def test_glob_matches_per_segment_on_a_suffix(no_roles):
    llama = tiny_models()["llama"]
    assert _select(llama, Glob("layers.*.self_attn.q_proj")) == LLAMA_Q
    assert _select(llama, Glob("[q]_proj")) == LLAMA_Q
    assert _select(llama, Glob("layers.?.*.q_proj")) == LLAMA_Q
    # `*` stays inside one segment, as each segment is matched on its own
    assert _select(llama, Glob("layers.*.q_proj")) == ()
    assert glob_matches("h.*.attn.c_attn", "transformer.h.10.attn.c_attn")
    assert not glob_matches("h.*.c_attn", "transformer.h.10.attn.c_attn")
    assert glob_matches("*", "anything") and not glob_matches("a.b.c", "b.c")


def test_module_type_is_isinstance_by_class_name(no_roles):
    models = tiny_models()
    llama, gpt2, conv = models["llama"], models["gpt2"], models["conv"]
    assert set(_select(llama, ModuleType("Linear"))) == {
        p for p, m in llama.named_modules() if isinstance(m, nn.Linear)}
    assert len(_select(gpt2, ModuleType("Conv1D"))) == 4 * 3  # c_attn, c_proj, c_fc, mlp.c_proj
    assert _select(conv, ModuleType("Conv2d")) == (
        "stem", "stages.0.conv", "stages.0.pointwise", "stages.1.conv", "stages.1.pointwise")
    assert _select(conv, ModuleType("Conv1d")) == ("seq",)
    assert _select(conv, ModuleType("Embedding")) == ("emb",)
    assert len(_select(llama, ModuleType("LlamaDecoderLayer"))) == 3


def test_all_linear_leaves_out_the_output_layer_like_peft(no_roles):
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    for name, model in tiny_models().items():
        for task_type in (None, "SEQ_CLS"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = LoraConfig(target_modules="all-linear", task_type=task_type)
                want = LoraModel(copy.deepcopy(model), config, "default").targeted_module_names
            got = Resolver(model).select(Selection((AllLinear(),)), task_type=task_type)
            assert list(got) == want, (name, task_type)
    assert "classifier" not in Resolver(tiny_models()["bert"]).select(
        Selection((AllLinear(),)), task_type="SEQ_CLS")


def test_within_layers_and_except(no_roles):
    llama = tiny_models()["llama"]
    assert _select(llama, Name("q_proj"), within="model.layers.1") == (LLAMA_Q[1],)
    assert _select(llama, Name("q_proj"), within="model.layers.1.self_attn.q_proj") == (LLAMA_Q[1],)
    assert _select(llama, Name("q_proj"), within="model.layers.1.self") == ()  # whole segments
    last = Layers((LayerSlice(-2, None),))
    assert _select(llama, Name("q_proj"), layers=last) == LLAMA_Q[1:]
    assert _select(llama, Name("q_proj"), layers=Layers((0,), ("layers",))) == LLAMA_Q[:1]
    no_mlp_no_k = (Regex(".*mlp.*"), Name("k_proj"))
    assert _select(llama, ModuleType("Linear"), layers=Layers((1,)), exclude=no_mlp_no_k) == tuple(
        f"model.layers.1.self_attn.{p}_proj" for p in "qvo")
    # a selection that is only a restriction selects every module it allows
    bare = _select(llama, layers=Layers((2,)))
    assert bare[0] == "model.layers.2.self_attn" and "model.layers.2" not in bare


def test_reused_module_is_seen_under_its_first_path(no_roles):
    shared = tiny_models()["shared"]
    assert _select(shared, Name("proj")) == ("proj",)
    assert _select(shared, Name("alias")) == ()  # PEFT's key list drops the second name
    assert _select(shared, Name("q")) == ("first.attn.q", *(f"layers.{i}.attn.q" for i in (1, 2, 3)))


def test_role_selectors_capture_once_and_only_when_used(monkeypatch):
    calls = []
    roles = {"blocks.0.attn.q": "attn.q", "blocks.0.attn.v": "attn.v", "towers.left.proj": "attn.qkv",
             "blocks.1.mlp.0": "mlp.up", "head": "head"}

    def fake(model, *, example_inputs=None):
        calls.append(example_inputs)
        return surgeon.capture.infer.Analysis(roles, {}, {})

    monkeypatch.setattr(surgeon.capture.infer, "analyse", fake)
    resolver = Resolver(tiny_models()["nested"], example_inputs=("x",))
    assert resolver.select(Selection((Name("head"),))) == ("head",) and calls == []
    assert resolver.select(Selection((RoleRef("attn.q"),))) == ("towers.left.proj", "blocks.0.attn.q")
    assert resolver.select(Selection((RoleRef("attn"), RoleRef("mlp")))) == (
        "towers.left.proj", "blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.mlp.0")
    assert calls == [("x",)]


def test_kind_of():
    conv = ConvNet()
    kinds = {p: kind_of(m) for p, m in conv.named_modules()}
    assert kinds["stem"] == "Conv2d" and kinds["seq"] == "Conv1d" and kinds["vol"] == "Conv3d"
    assert kinds["emb"] == "Embedding" and kinds["fc"] == "Linear"
    assert kinds["stages.0.bn"] is None and kinds["stages"] is None
    gpt2 = tiny_models()["gpt2"]
    assert kind_of(gpt2.get_submodule("transformer.h.0.attn.c_attn")) == "Conv1D"
    assert kind_of(nn.MultiheadAttention(8, 2)) == "MultiheadAttention"
