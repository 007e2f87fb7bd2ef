"""`surgeon.compile` against PEFT 0.21: the fused model computes PEFT's outputs and gradients,
in every state the adapter set can be put in (the shared GEMM must never serve a stale state)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

import surgeon
import surgeon.api as S
import surgeon.fusion as F
from tests.fusion.common import ATOL, BERT, LLAMA, ShrinkCounter, diff, output, twins
from tests.methods.harness import quiet, randomize


def _expected_groups(block_groups, blocks: list[str]) -> set[tuple[str, ...]]:
    return {tuple(f"{b}.{p}" for p in g) for b in blocks for g in block_groups}


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"use_dora": True}, {"lora_bias": True}],
                         ids=["lora", "rslora", "dora", "lora_bias"])
def test_llama_qkv_gate_up_share_one_shrink_and_match_peft(options):
    name, targets, block = LLAMA
    case, pm, ours = twins(name, targets, **options)
    expected = output(case, pm)
    with ShrinkCounter(rank=12) as site:
        assert diff(output(case, ours), expected) <= ATOL
    surgeon.compile(ours)
    blocks = [f"model.layers.{i}" for i in range(2)]
    assert set(F.groups(ours)) == _expected_groups(block, blocks)
    with ShrinkCounter(rank=12) as shrink:
        assert diff(output(case, ours), expected) <= ATOL
    assert site.count == 10  # r=4: five shrinks per block; the concatenations have 12 and 8 rows
    assert shrink.count == 4  # one GEMM per group: (q, k, v) and (gate, up) in 2 blocks


def test_bert_query_key_value_share_one_shrink_and_match_peft():
    name, targets, block = BERT
    case, pm, ours = twins(name, targets)
    surgeon.compile(ours)
    blocks = [f"bert.encoder.layer.{i}" for i in range(2)]
    assert set(F.groups(ours)) == _expected_groups(block, blocks)
    assert diff(output(case, ours), output(case, pm)) <= ATOL


def test_gpt2_fused_qkv_has_nothing_to_share_and_matches_peft():
    case, pm, ours = twins("gpt2", ["c_attn", "c_fc"])  # c_attn is q, k, v in one Conv1D already
    surgeon.compile(ours)
    assert F.groups(ours) == []
    assert diff(output(case, ours), output(case, pm)) <= ATOL


def test_state_changes_never_serve_a_stale_shared_shrink():
    """set_adapter, two active adapters, add_adapter, merge/unmerge, disable, mixed batches."""
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets)
    ctx = quiet()
    try:
        config = LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"])
        pm.add_adapter("other", config)
        randomize(pm, ("lora_A.other", "lora_B.other"), seed=11, scale=0.3)
        S.apply("adapter other = lora(r=2, alpha=8) { target q_proj, k_proj, up_proj }", ours)
        ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
        surgeon.compile(ours)
        assert diff(output(case, ours), output(case, pm)) <= ATOL
        for active in ("other", ["default", "other"], "default"):
            pm.base_model.set_adapter(active)
            S.set_adapter(ours, active)
            pm.eval()
            assert diff(output(case, ours), output(case, pm)) <= ATOL, active
        rows = ["default", "other"]
        assert diff(output(case, ours, adapter_names=rows), output(case, pm, adapter_names=rows)) <= ATOL
        with pm.disable_adapter(), S.disable_adapters(ours):
            assert diff(output(case, ours), output(case, pm)) <= ATOL
        pm.merge_adapter()
        S.merge(ours)
        assert diff(output(case, ours), output(case, pm)) <= ATOL
        pm.unmerge_adapter()
        S.unmerge(ours)
        assert diff(output(case, ours), output(case, pm)) <= ATOL
        # an adapter added after compile, on grouped layers and on one outside every group
        third = LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "v_proj", "o_proj"])
        pm.add_adapter("third", third)
        randomize(pm, ("lora_A.third", "lora_B.third"), seed=13, scale=0.3)
        S.apply("adapter third = lora(r=3, alpha=6) { target k_proj, v_proj, o_proj }", ours)
        ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
        assert diff(output(case, ours), output(case, pm)) <= ATOL
        pm.base_model.set_adapter(["third", "default"])
        S.set_adapter(ours, ["third", "default"])
        pm.eval()
        assert diff(output(case, ours), output(case, pm)) <= ATOL
    finally:
        ctx.__exit__(None, None, None)


def test_a_seeded_training_step_has_peft_losses_and_gradients():
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets)
    surgeon.compile(ours)
    pm.train(), ours.train()
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model."): p for n, p in pm.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(theirs)
    opts = [torch.optim.SGD(list(m.values()), lr=0.05) for m in (mine, theirs)]
    for step in range(3):  # after a step the cached A must not be reused: losses would differ
        losses = []
        for model, opt in zip((ours, pm), opts):
            loss = case.output(model).pow(2).mean()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(*losses, rtol=1e-5, atol=ATOL)
        for n, p in mine.items():
            scale = max(theirs[n].grad.abs().max().item(), 1.0)
            assert diff(p.grad, theirs[n].grad) <= 1e-5 * scale, (step, n)
        for opt in opts:
            opt.step(), opt.zero_grad()
    pm.eval(), ours.eval()
    assert diff(output(case, ours), output(case, pm)) <= ATOL  # eval after training: fresh stacks


def test_training_with_dropout_matches_peft_with_the_same_seed():
    """Dropout gives each adapter its own input: those shrinks stay per layer, still PEFT's."""
    name, targets, _ = LLAMA
    case, pm, ours = twins(name, targets, lora_dropout=0.1)
    surgeon.compile(ours)
    pm.train(), ours.train()
    losses = []
    for model in (ours, pm):
        torch.manual_seed(5)
        losses.append(case.output(model).pow(2).mean().detach())
    torch.testing.assert_close(*losses, rtol=1e-5, atol=ATOL)
