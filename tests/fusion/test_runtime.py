"""The groups `surgeon.compile` installs: found from the capture, undoable, never stale when a
tensor or weight is written between the members' calls, copied with the model, and traced by
torch.compile. Outputs are checked against PEFT or the LoRA formula written out."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import surgeon
import surgeon.api as S
import surgeon.fusion as F
from surgeon.errors import UserError
from surgeon.fusion.shared import FusedForward
from tests.fusion.common import ATOL, LLAMA, ShrinkCounter, diff, output, twins


class TwoHeads(nn.Module):
    """Two linears on one input and a third on another: one group of two."""

    def __init__(self, layer=nn.Linear) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = layer(8, 6), layer(8, 6), layer(6, 5)

    def forward(self, x):
        h = torch.tanh(x)
        return self.c(self.a(h) * self.b(h))


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    return Conv1D(n_out, n_in)  # transformers' (GPT-2's) transposed linear


def _heads(layer=nn.Linear):
    model = S.apply("adapter default = lora(r=2, alpha=4) { target a, b, c }", TwoHeads(layer))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _lora(layer, x):
    """The LoRA formula for one adapted Linear: W x + b + scaling * B A x."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.base_layer(x) + layer.sites["default"].scaling * (x @ a.T @ b.T)


@pytest.mark.parametrize("layer", [nn.Linear, _conv1d], ids=["Linear", "Conv1D"])
def test_example_inputs_find_the_layers_reading_one_input(layer):
    model = _heads(layer)
    x = torch.randn(4, 8)
    surgeon.compile(model, example_inputs=x)
    assert F.groups(model) == [("a", "b")]
    h = torch.tanh(x)
    with torch.no_grad(), ShrinkCounter(rank=4) as shrinks:
        assert diff(model(x), _lora(model.c, _lora(model.a, h) * _lora(model.b, h))) <= 1e-5
    assert shrinks.count == 2  # a and b share one, c has its own (`_lora` uses matmul)


class Branchy(TwoHeads):
    """Control flow on data: no symbolic trace, and export needs inputs."""

    def forward(self, x):
        h = torch.tanh(x) if x.sum() > 0 else x
        return self.c(self.a(h) * self.b(h))


def test_a_model_without_a_capture_is_refused_with_what_to_do():
    model = S.apply("adapter default = lora(r=2) { target a, b }", Branchy())
    with pytest.raises(UserError, match="example_inputs="):
        surgeon.compile(model)
    assert F.groups(model) == []
    surgeon.compile(model, example_inputs=torch.ones(2, 8))
    assert F.groups(model) == [("a", "b")]


def test_compile_again_regroups_and_undo_restores_site_scope():
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets)
    keys = sorted(ours.state_dict())
    surgeon.compile(ours)
    first = F.groups(ours)
    assert surgeon.compile(ours) is ours
    assert F.groups(ours) == first and len(first) == 4
    assert sorted(ours.state_dict()) == keys  # nothing registered on the modules
    assert diff(output(case, ours), output(case, pm)) <= ATOL
    F.undo(ours)
    assert F.groups(ours) == []
    assert not any(isinstance(m.__dict__.get("forward"), FusedForward) for m in ours.modules())
    assert diff(output(case, ours), output(case, pm)) <= ATOL


def test_writes_between_member_calls_are_seen():
    """q computes the shared GEMM; an input or weight written before k's call is not missed."""
    model = _heads()
    surgeon.compile(model, example_inputs=torch.randn(4, 8))
    x = torch.randn(4, 8)
    with torch.no_grad():
        model.a(x)
        model.b.lora_A["default"].weight.mul_(2)  # in place: A's version changes
        assert diff(model.b(x), _lora(model.b, x)) <= 1e-5
        model.a(x)
        x.add_(1)  # the input itself, in place
        assert diff(model.b(x), _lora(model.b, x)) <= 1e-5
        model.a(x)
        model.b.lora_A["default"].weight = nn.Parameter(torch.randn(2, 8))  # replaced
        assert diff(model.b(x), _lora(model.b, x)) <= 1e-5
        model.a(x)
        assert diff(model.b(x + 0), _lora(model.b, x)) <= 1e-5  # an equal but other tensor
        assert diff(model.a(x), _lora(model.a, x)) <= 1e-5  # a again: computes, does not reuse


def test_a_deep_copy_groups_its_own_layers():
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets)
    surgeon.compile(ours)
    twin = copy.deepcopy(ours)
    _check_own_members(twin)
    assert diff(output(case, twin), output(case, pm)) <= ATOL
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_A" in name:
                p.mul_(0)
    assert diff(output(case, ours), output(case, pm)) <= ATOL  # the original is untouched


def test_a_pickled_model_groups_its_own_layers():
    # a plain module: pickling an adapted transformers model fails with or without fusion
    model = _heads()
    surgeon.compile(model, example_inputs=torch.randn(4, 8))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    twin = torch.load(buffer, weights_only=False)
    _check_own_members(twin)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert diff(twin(x), model(x)) <= 1e-6  # same weights; each through its own groups
        assert diff(twin.b(x), _lora(twin.b, x)) <= 1e-5


def _check_own_members(twin) -> None:
    assert F.groups(twin)
    for paths in F.groups(twin):
        group = twin.get_submodule(paths[0]).forward.group
        assert all(m is twin.get_submodule(p) for m, p in zip(group.members, paths, strict=True))


def test_generate_matches_peft():
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets)
    surgeon.compile(ours)
    ids = case.inputs()["input_ids"]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
          "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids=ids, **kw), pm.generate(input_ids=ids, **kw))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_of_the_fused_model_matches_peft(backend):
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets)
    surgeon.compile(ours)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    expected = output(case, pm)
    assert diff(output(case, compiled), expected) <= ATOL
    S.set_adapter(ours, "default")  # unchanged state: same graphs
    assert diff(output(case, compiled), expected) <= ATOL
    with S.disable_adapters(ours), pm.disable_adapter():
        assert diff(output(case, compiled), output(case, pm)) <= ATOL


def test_torch_compile_traces_one_shared_gemm_per_group():
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets)
    surgeon.compile(ours)
    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    assert diff(output(case, torch.compile(ours, backend=record, fullgraph=True)), output(case, pm)) <= ATOL
    (graph,) = graphs
    splits = [n for n in graph.graph.nodes if n.op == "call_method"
              and n.target in ("split", "split_with_sizes")]
    assert len(splits) == 4  # (q, k, v) and (gate, up) in 2 blocks; llama itself splits nothing


def test_a_dtype_cast_after_compile_replans():
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets)
    surgeon.compile(ours)
    output(case, ours)
    ours.double(), pm.double()
    with ShrinkCounter(rank=12) as shrinks:
        assert diff(output(case, ours), output(case, pm)) <= 1e-10
    assert shrinks.count == 4 + 10  # ours shares (4 GEMMs), peft's model does not (10)


def test_a_cpu_decode_step_runs_each_members_row_form():
    """One row on the CPU: each member runs its own single-row form (its few calls cost less than
    sharing saves there) and the output stays the LoRA formula; a wider input shares again."""
    model = _heads()
    surgeon.compile(model, example_inputs=torch.randn(4, 8))
    model.eval()
    calls = []
    for member in (model.a, model.b):
        member(torch.randn(1, 1, 8))  # lowers the eval state
        row = member._run_row
        member.__dict__["_run_row"] = lambda self, x, row=row: calls.append(self) or row(self, x)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        h = torch.tanh(x)
        expected = _lora(model.c, _lora(model.a, h) * _lora(model.b, h))
        assert diff(model(x), expected) <= ATOL
        assert calls == [model.a, model.b]
        with ShrinkCounter(rank=4) as counter:
            model(torch.randn(1, 3, 8))
    assert counter.count == 2  # a and b's shrinks as one GEMM, then c's
