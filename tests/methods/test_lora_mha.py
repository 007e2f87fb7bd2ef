"""LoRA around nn.MultiheadAttention and nn.TransformerEncoder, against PEFT 0.21.

A MultiheadAttention reads `out_proj.weight` directly and never calls `out_proj`, so an adapter
targeted there never runs: PEFT applies it anyway (its outputs stay the base model's, shown
here), surgeon refuses it at plan time. The encoder layer's feed-forward linears do run (except
under torch's inference fast path, which skips them in PEFT too, with a warning from surgeon):
there surgeon's checkpoints cross both ways with PEFT's outputs.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import surgeon.api as S
from surgeon.planning.planner import PlanError, plan

ATOL = 1e-5


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor notice
        return nn.TransformerEncoder(layer, 2).eval()


def inputs() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def run(model: nn.Module) -> torch.Tensor:
    """Forward in training mode (dropout is 0): torch's inference fast path stays off."""
    model.train()
    try:
        with torch.no_grad():
            return model(inputs())
    finally:
        model.eval()


def test_out_proj_of_multihead_attention_is_refused():
    model = encoder()
    with pytest.raises(PlanError, match=r"`layers\.0\.self_attn\.out_proj` is the out_proj of a "
                                        r"MultiheadAttention.*never run") as info:
        plan("adapter default = lora() { target out_proj }", model)
    assert "exclude" in str(info.value)  # the hint says what to do
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError):
        S.apply("adapter default = lora() { target linear1, out_proj }", model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # excluding them plans the rest (the feed-forward linears with a warning, see below)
    with pytest.warns(UserWarning, match="fast path"):
        planned = plan("adapter default = lora() { target all-linear except out_proj }", model)
    assert planned.paths() == (
        "layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2")


def test_peft_ignores_an_adapter_on_out_proj():
    """Why surgeon refuses: PEFT's adapter there changes nothing the model computes."""
    base = encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["out_proj"]))
    randomize(pm)
    out_proj = pm.base_model.model.layers[0].self_attn.out_proj
    assert out_proj.get_delta_weight("default").abs().max() > 0.1  # it would change outputs
    assert (run(pm) - run(base)).abs().max() <= 1e-6  # but never runs


def test_feed_forward_linears_roundtrip_with_peft(tmp_path: Path):
    base = encoder()
    config = dict(target_modules=["linear1", "linear2"], r=4, lora_alpha=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
        randomize(pm)
        pm.save_pretrained(tmp_path / "peft")
        expected = run(pm)
        assert (expected - run(base)).abs().max() > 10 * ATOL
    with pytest.warns(UserWarning, match="fast path"):
        ours = S.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (run(ours) - expected).abs().max() <= ATOL
    S.save_pretrained(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (run(back) - expected).abs().max() <= ATOL
    # under the inference fast path (eval mode) both skip the adapter alike
    with torch.no_grad():
        assert ours.layers[0].linear1.training is False
        assert torch.equal(ours(inputs()), pm(inputs()))
        assert torch.equal(ours(inputs()), base(inputs()))
