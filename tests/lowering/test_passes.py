"""The passes and the pipeline: provenance, idempotence, verification, errors, compiled code."""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from surgeon.passes import PASSES, get_pass, insert_adapters, pipeline
from surgeon.passes.insert_adapters import InsertAdaptersPass
from surgeon.passes.merge import MergePass
from surgeon.passes.pipeline import PassResult, empty_graph_module, run_passes
from surgeon.passes.unmerge import UnmergePass
from surgeon.passes.verify import verify_graph
from torch import nn

from surgeon.runtime import fold, forwards
from surgeon.runtime.adapted import AdaptedLayer
from surgeon.runtime.graph import node_summary, source_of, tag
from tests.lowering.peft_oracle import KINDS, Variant, make_base, make_input, max_diff

TOL = 1e-5


def layer_with_two(kind: str = "Linear", dora: bool = False) -> AdaptedLayer:
    layer = AdaptedLayer(make_base(kind), Variant(init_lora_weights=False).site(kind))
    layer.add_adapter(Variant(r=3, init_lora_weights=False, use_dora=dora).site(kind, "other"))
    layer.set_adapter(["default", "other"])
    return layer.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_inserted_nodes_carry_provenance(kind: str) -> None:
    layer = layer_with_two(kind, dora=kind != "Conv1d")
    verify_graph(layer.graph_module, layer)
    branch = [t for _, op, t in node_summary(layer.graph_module) if t.get("adapter") == "other"]
    assert branch
    assert all(t["rule"] == "test.peft:3:5" and t["pass"] == "insert-adapters" for t in branch)
    roles = [t["role"] for t in branch]
    assert roles.count("result") == 1
    base = [t for _, op, t in node_summary(layer.graph_module) if t.get("role") == "base_out"]
    assert base == [{"rule": "", "pass": "insert-adapters", "adapter": None, "role": "base_out"}]
    layer.merge()
    layer.unmerge()
    passes = {tag(n)["pass"] for n in layer.graph_module.graph.nodes if tag(n).get("adapter")}
    assert passes == {"unmerge"}


@pytest.mark.parametrize("kind", ["Linear", "Conv2d", "Embedding"])
def test_passes_are_idempotent(kind: str) -> None:
    """Each pass after the fold step that precedes it: a second run changes nothing."""
    layer = layer_with_two(kind, dora=True)
    x = make_input(kind)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    gm = empty_graph_module()
    steps = ((lambda: None, InsertAdaptersPass()),
             (lambda: fold.merge_weights(layer, layer.active, False), MergePass()),
             (lambda: fold.unmerge_weights(layer), UnmergePass()))
    for write_weights, pass_ in steps:
        write_weights()
        weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
        first = run_passes(gm, layer, [pass_], verify=True)
        second = run_passes(first.gm, layer, [pass_], verify=True)
        assert first.modified and not second.modified, pass_.name
        # passes only rewrite graphs: no weight moves while they run
        assert all(torch.equal(p, weights[n]) for n, p in layer.named_parameters()), pass_.name
        gm = second.gm
    assert all(max_diff(p, before[n]) <= TOL for n, p in layer.named_parameters())
    with torch.no_grad():
        layer.relower()
        assert max_diff(layer(x), layer_with_two(kind, dora=True)(x)) <= TOL


@dataclass(frozen=True, slots=True)
class FailingPass:
    name: ClassVar[str] = "fail"

    def __call__(self, gm, layer) -> PassResult:
        raise ValueError("this pass always fails")


def test_pipeline_adds_pass_history_to_the_original_exception() -> None:
    layer = layer_with_two()
    with pytest.raises(ValueError, match="always fails") as info:
        run_passes(empty_graph_module(), layer, [InsertAdaptersPass(), FailingPass()])
    assert any("pass `fail`" in n and "insert-adapters -> fail" in n for n in info.value.__notes__)


def test_lowering_goes_through_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    real = pipeline.run_passes

    def spy(gm, layer, passes, **kwargs):
        ran.extend(p.name for p in passes)
        return real(gm, layer, passes, **kwargs)

    monkeypatch.setattr(insert_adapters, "run_passes", spy)
    monkeypatch.setattr(forwards, "run_passes", spy)
    layer = layer_with_two()
    assert ran and set(ran) == {"insert-adapters"}
    ran.clear()
    layer.merge()
    layer.unmerge()
    layer(make_input("Linear"), adapter_names=["default", "other"])  # a mixed batch's graph
    assert ran == ["merge", "unmerge", "insert-adapters"]


def test_registry_is_lazy_and_complete() -> None:
    assert set(PASSES) == {"insert-adapters", "merge", "unmerge"}
    for name in PASSES:
        cls = get_pass(name)
        assert cls.name == name
        result = cls()(empty_graph_module(), layer_with_two()) if name == "insert-adapters" else None
        assert result is None or isinstance(result, PassResult)
    with pytest.raises(KeyError, match="Unknown pass"):
        get_pass("fuse-everything")


def test_compiled_forward_uses_dict_lookups_and_inlines_the_base() -> None:
    layer = layer_with_two()
    src = source_of(layer._run)
    assert "self._modules['lora_A']._modules['other']._parameters['weight']" in src
    assert "self.base_layer(" not in src and "_modules['base_layer'](" not in src
    assert "lora_A.other" in layer.graph_module.code  # the inspectable graph stays readable


def test_hooked_base_is_called_as_a_module() -> None:
    base = make_base("Linear")
    seen = []
    base.register_forward_hook(lambda *_: seen.append(1))
    layer = AdaptedLayer(base, Variant().site("Linear"))
    layer(make_input("Linear"))
    assert seen == [1]
    assert "_modules['base_layer'](" in source_of(layer._run)


def test_no_rebuild_on_the_hot_path() -> None:
    layer = layer_with_two()
    run, gm = layer._run, layer.graph_module
    x = make_input("Linear")
    for _ in range(3):
        layer(x)
    assert layer._run is run and layer.graph_module is gm
    layer.train()
    layer.eval()
    assert layer._run is run  # the eval lowering is kept while the adapter state is unchanged


def test_training_graph_has_dropout_eval_graph_does_not() -> None:
    layer = AdaptedLayer(make_base("Linear"), Variant(lora_dropout=0.5).site("Linear"))
    layer.train()
    assert layer.graph_module.graph.find_nodes(op="call_module", target="lora_dropout.default")
    layer.eval()
    assert not layer.graph_module.graph.find_nodes(op="call_module", target="lora_dropout.default")


def test_construction_mutates_nothing_and_grads_reach_only_adapters() -> None:
    base = make_base("Linear")
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    layer = AdaptedLayer(base, Variant(init_lora_weights=False).site("Linear"))
    assert layer.base_layer is base
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
    base.requires_grad_(False)  # the model-level apply's job
    layer(make_input("Linear")).sum().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == \
        {"lora_A.default.weight", "lora_B.default.weight"}


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_copies_relower(copier: str) -> None:
    layer = layer_with_two(dora=True)
    x = make_input("Linear")
    if copier == "deepcopy":
        clone = copy.deepcopy(layer)
    else:
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        clone.lora_B["other"].weight.mul_(2)  # must not affect the original
        assert max_diff(layer(x), layer_with_two(dora=True)(x)) <= TOL
        assert max_diff(clone(x), layer(x)) > 1e-3
    assert pickle.dumps(layer.state_dict())


def test_bad_site_is_refused_without_side_effects() -> None:
    layer = layer_with_two()
    keys = list(layer.state_dict())
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter(Variant().site("Linear", "other"))
    with pytest.raises(ValueError, match="Cannot add"):
        layer.add_adapter(Variant().site("Conv2d", "third"))
    with pytest.raises(NotImplementedError, match="olora"):
        layer.add_adapter(Variant(init_lora_weights="olora").site("Linear", "third"))
    assert list(layer.state_dict()) == keys and list(layer.sites) == ["default", "other"]


def test_mixed_dtype_adapters_cast_like_peft() -> None:
    """fp32 adapters on a bf16 base (PEFT's autocast_adapter_dtype): output in bf16."""
    base = make_base("Linear").to(torch.bfloat16)
    layer = AdaptedLayer(base, Variant(init_lora_weights=False).site("Linear"))
    for name in ("lora_A", "lora_B"):
        layer._modules[name].float()
    layer.relower()
    x = make_input("Linear").to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        expected = base(x).float() + 2.0 * layer.lora_B["default"](layer.lora_A["default"](x.float()))
    assert out.dtype == torch.bfloat16
    assert max_diff(out, expected.to(torch.bfloat16)) <= 1e-2
    assert any(tag(n).get("role") == "epilogue" for n in layer.graph_module.graph.nodes)


def test_conv_with_groups_forwards_but_does_not_merge() -> None:
    base = nn.Conv2d(4, 4, 3, groups=2)
    layer = AdaptedLayer(base, Variant(r=2, init_lora_weights=False).site("Conv2d"))
    layer(torch.randn(1, 4, 5, 5))
    with pytest.raises(NotImplementedError, match="groups > 1"):
        layer.merge()
    assert not layer.merged


@pytest.mark.parametrize(("kind", "variant"), [
    (k, v) for k in KINDS for v in (Variant(), Variant(r=4, use_dora=True), Variant(lora_bias=True))
    if not (k == "Embedding" and v.lora_bias)])  # PEFT has no lora_bias on Embedding
def test_num_params_counts_what_add_creates(kind: str, variant: Variant) -> None:
    base = make_base(kind)
    layer = AdaptedLayer(base, variant.site(kind))
    created = sum(p.numel() for p in layer.adapter_parameters("default"))
    assert layer.method.num_params(base, variant.site(kind)) == created
