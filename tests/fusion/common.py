"""Twins for the fusion tests: PEFT's model (the oracle) and surgeon's, on identical weights."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

import surgeon.api as S
from tests.methods.harness import quiet, randomize, spec_of
from tests.models import CASES, ModelCase

ATOL = 2e-5
# (case, PEFT target_modules, the groups one block should have)
LLAMA = ("llama", ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
         [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")])
BERT = ("bert", ["query", "key", "value", "dense"],
        [("attention.self.query", "attention.self.key", "attention.self.value")])


def twins(name: str, targets: list[str], **options):
    """(case, peft model, surgeon model): the same random LoRA weights, eval mode."""
    case: ModelCase = CASES[name]
    ctx = quiet()
    try:
        base = case.build()
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **options)
        pm = get_peft_model(copy.deepcopy(base), config)
        randomize(pm, ("lora_",), scale=0.3)
        ours = copy.deepcopy(base)
        S.apply(spec_of(config), ours)
        ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
    finally:
        ctx.__exit__(None, None, None)
    return case, pm.eval(), ours.eval()


def output(case: ModelCase, model, **extra) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model, **extra)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class ShrinkCounter(torch.overrides.TorchFunctionMode):
    """Counts `linear` calls whose weight is at most `rank` rows: LoRA shrinks (`x @ A.T`, or
    over concatenated A's) and nothing else in the tiny models (their smallest base layer has
    more rows)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank, self.count = rank, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch._C._nn.linear, torch.nn.functional.linear) and args[1].shape[0] <= self.rank:
            self.count += 1
        return func(*args, **(kwargs or {}))
