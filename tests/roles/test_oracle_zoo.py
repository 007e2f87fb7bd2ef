"""`@attn.q, @attn.v` round-trips through PEFT on every architecture of the role zoo.

Issue 5: a role spec produces checkpoints that PEFT loads with the same outputs. For each tiny
zoo model surgeon plans and applies the spec, randomises the adapter (lora_B non-zero), saves;
`PeftModel.from_pretrained` loads the checkpoint into an untouched copy of the same base. PEFT
must then hold exactly the saved tensors, target exactly the plan's sites, and give the same
outputs (fp32, max abs diff <= 1e-5) on the same seeded inputs.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import surgeon
from surgeon.capture.synthesize import synthesize_inputs
from tests.core.test_oracle import ATOL, max_diff, peft_targets, randomize, surgeon_targets
from tests.roles.zoo import BUILDERS, build

torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine (as tests/models.py)

SPEC = "adapter default = lora(r=4, alpha=8) { target @attn.q, @attn.v }"
# PEFT adapts only BLIP-2's language model; scope the roles to it the same way.
SCOPED = {"blip-2": "adapter default = lora(r=4, alpha=8) { target @attn.q, @attn.v within language_model }"}
NO_ATTENTION = {"rwkv"}  # a recurrence, not softmax attention: no @attn roles at all
ROUNDTRIP = sorted(set(BUILDERS) - NO_ATTENTION)
# Float outputs compared, first one present wins.
OUTPUT_KEYS = ("logits", "logits_per_image", "last_hidden_state")


def spec_for(arch: str) -> str:
    return SCOPED.get(arch, SPEC)


def seeded_inputs(model: torch.nn.Module, seed: int = 0) -> dict[str, Any]:
    """Surgeon's synthesized input shapes, filled with seeded random tokens and values."""
    example = synthesize_inputs(model, device="cpu")
    assert example is not None, "zoo models are transformers models with synthesizable inputs"
    g = torch.Generator().manual_seed(seed)
    vocab = getattr(model.config.get_text_config(), "vocab_size", 99)
    found: dict[str, Any] = {}
    for name, t in example.kwargs:
        if name == "bbox":  # box corners index 2-D position tables: keep them small and ordered
            found[name] = torch.randint(0, 50, t.shape, generator=g).sort(dim=-1).values
        elif t.dtype == torch.long:
            found[name] = torch.randint(4, vocab, t.shape, generator=g)  # skip special ids 0-3
        else:
            found[name] = torch.randn(t.shape, generator=g)
    image_token = getattr(model.config, "image_token_id", None)
    queries = getattr(model.config, "num_query_tokens", 0) or 0
    if image_token is not None and queries:  # BLIP-2 puts its query embeddings at image tokens
        found["input_ids"][:, :queries] = image_token
    return {**found, **dict(example.options)}


@torch.no_grad()
def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs)
    for key in OUTPUT_KEYS:
        value = out.get(key) if hasattr(out, "get") else None
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().clone()
    raise AssertionError(f"no float output among {OUTPUT_KEYS} in {type(out).__name__}")


def lora_params(pm: PeftModel) -> dict[str, torch.Tensor]:
    """PEFT's adapter parameters, keyed as PEFT's checkpoint spells them (no adapter name)."""
    return {n.replace(".default.", "."): p.detach() for n, p in pm.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("arch", ROUNDTRIP)
def test_attn_qv_roundtrips_through_peft(arch: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build(arch)
        inputs = seeded_inputs(base)
        sites = set(surgeon.plan(spec_for(arch), base).paths())
        assert sites, "the role spec selects nothing"

        ours = surgeon.apply(spec_for(arch), copy.deepcopy(base))
        assert any("lora_B" in n for n, _ in ours.named_parameters())
        randomize(ours)
        assert surgeon_targets(ours) == sites
        surgeon.save_pretrained(ours, tmp_path)

        back = PeftModel.from_pretrained(base, tmp_path).eval()
        saved = load_file(tmp_path / "adapter_model.safetensors")
        loaded = lora_params(back)
        assert set(loaded) == set(saved)  # no missing, no unexpected adapter keys
        for key, tensor in saved.items():
            assert torch.equal(loaded[key], tensor), key
        assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)

        assert peft_targets(back) == sites
        expected = run(back, inputs)
        assert max_diff(expected, run(ours, inputs)) <= ATOL
        with back.disable_adapter():
            assert max_diff(expected, run(back, inputs)) > 100 * ATOL  # the adapter is live


@pytest.mark.parametrize("arch", sorted(NO_ATTENTION))
def test_no_attention_roles_is_a_plan_error(arch: str) -> None:
    model = build(arch)
    with pytest.raises(surgeon.PlanError) as err:
        surgeon.plan(SPEC, model)
    assert err.value.message == f"`target @attn.q, @attn.v` matches no module of `{type(model).__name__}`"
    with pytest.raises(surgeon.PlanError):
        surgeon.apply(SPEC, model)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing changed
