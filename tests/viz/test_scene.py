"""What the picture says, checked against the plan and the model (not against itself)."""

import pytest
import torch
from torch import nn

import surgeon
from tests.viz.conftest import SPEC


def test_every_planned_site_is_drawn_once_with_its_rank(llama, picture):
    plan = surgeon.plan(SPEC, llama)
    drawn = {p: n for n in picture.scene.nodes if n.adapted for p in n.paths}
    assert sorted(drawn) == sorted(plan.paths())
    for site in plan.sites:
        (view,) = drawn[site.path].sites
        assert (view.r, view.alpha, view.params, view.rule) == (site.r, site.alpha, site.params, site.rule)
        assert view.rule_text.startswith(("target", "rank"))


def test_blocks_with_another_rank_are_drawn_apart_and_roles_are_labelled(picture):
    groups = picture.scene.groups
    assert [g.blocks for g in groups] == [("model.layers.0",), ("model.layers.1",)]  # rank 4 on layer 1
    q = [n for n in picture.scene.nodes if n.label == "q_proj"]
    assert {n.role for n in q} == {"attn.q"} and {n.sites[0].r for n in q} == {8, 4}
    assert "query" in q[0].evidence  # the dataflow fact roles found, shown with the label


def test_identical_blocks_collapse_into_one_group():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    scene = surgeon.viz(model, "adapter a = lora(r=2) { target @attn.v in layers[0:4] }").scene
    assert [g.label for g in scene.groups] == ["model.layers[0:4]  ×4", "model.layers[4:6]  ×2"]
    v = next(n for n in scene.nodes if n.group == "g0" and n.label == "v_proj")
    assert v.paths == tuple(f"model.layers.{i}.self_attn.v_proj" for i in range(4))
    inside = {(scene.node(a).label, scene.node(b).label) for a, b in scene.edges
              if a.startswith("g0/") and b.startswith("g0/")}
    assert ("v_proj", "attention\nsoftmax(QKᵀ)·V") in inside and ("attention\nsoftmax(QKᵀ)·V", "o_proj") in inside
    assert scene.chain == (("g0", "g1"),)


def test_expansion_shows_the_branch_before_merge_and_only_the_base_after(picture):
    (expansion, *_) = picture.scene.expansions
    before = {label.split("\n")[0]: tag for _, _, label, tag in expansion.before}
    assert {"lora_dropout.default", "lora_A.default.weight", "lora_B.default.weight"} <= set(before)
    # the branch's last node adds it to the base output: `add`, or the fused expand + add
    (result,) = [label for label, tag in before.items() if tag.get("role") == "result"]
    assert result in ("add", "expand_add")
    assert before[result] == {"rule": before[result]["rule"], "pass": "insert-adapters",
                              "adapter": "default", "role": "result"}
    assert not any(tag.get("adapter") for _, _, _, tag in expansion.after)
    assert any("ΔW(default)" in label for _, _, label, _ in expansion.after)


def test_an_adapted_model_shows_the_adapters_it_holds_and_merge_state(llama):
    import copy

    model = copy.deepcopy(llama)
    surgeon.apply("adapter default = lora(r=2) { target @attn.k }", model)
    surgeon.merge(model)
    nodes = [n for n in surgeon.viz(model).scene.nodes if n.adapted]
    assert {n.label for n in nodes} == {"k_proj"} and all(n.sites[0].merged for n in nodes)


class _Branchy(nn.Module):
    """A forward that leaves torch (a NumPy round trip): no export, on meta or on a real copy,
    and no symbolic_trace can capture it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.blocks:
            x = torch.from_numpy(block(x).detach().numpy().copy())
        return self.head(x)


def test_uncapturable_model_falls_back_to_the_module_tree_and_says_why():
    scene = surgeon.viz(_Branchy(), "adapter default = lora(r=2) { target head }",
                        example_inputs=torch.randn(2, 4)).scene
    assert scene.mode == "tree" and "could not be captured" in scene.notes[0]
    assert [g.label for g in scene.groups] == ["blocks[0:3]  ×3"]
    assert [n.paths for n in scene.nodes if n.adapted] == [("head",)]


def test_public_name_is_callable_after_importing_submodules():
    import surgeon.pictures.dot

    assert callable(surgeon.viz)


def test_unknown_layer_to_expand_is_a_user_error(llama):
    from surgeon.errors import UserError

    with pytest.raises(UserError, match="no adapted layer"):
        surgeon.viz(llama, SPEC, expand="nothing_like_this")


def test_jupyter_gets_the_page_in_a_sandboxed_iframe(picture):
    shown = picture._repr_html_()
    assert shown.startswith("<iframe srcdoc=\"&lt;!DOCTYPE html&gt;") and 'sandbox="allow-scripts"' in shown


def test_two_adapters_get_two_colours_and_both_expand(llama):
    from surgeon.pictures.dot import PALETTE

    spec = "adapter a = lora(r=2) { target @attn.q }\nadapter b = lora(r=4) { target @attn.q, @attn.k }"
    picture = surgeon.viz(llama, spec)
    dot = picture.dot()
    assert f'fillcolor="{PALETTE[0][0]}"' in dot and f'fillcolor="{PALETTE[1][0]}"' in dot
    q = next(n for n in picture.scene.nodes if n.label == "q_proj")
    assert [s.adapter for s in q.sites] == ["a", "b"]
    adapters = {tag.get("adapter") for e in picture.scene.expansions for _, _, _, tag in e.before}
    assert {"a", "b"} <= adapters
