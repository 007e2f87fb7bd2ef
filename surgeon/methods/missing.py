"""PEFT 0.21's types that surgeon does not implement, each with the reason. Torch-free.

One table serves the language (a spec naming one gets a located error that says why, not a
"did you mean" towards an unrelated method) and the docs. Keys are PEFT's peft_type lower-cased.
"""

from __future__ import annotations

_PROMPT = ("a model-level prompt method (virtual tokens or prompt encoders, not adapters on layers); "
           "planned as its own issue")
_ROUTED = "a model-level mixture over adapters (routing at run time); planned with the prompt methods"
_WEIGHT = "a weight-space method not implemented yet (after issue 10's first list)"

MISSING: dict[str, str] = {
    "prompt_tuning": _PROMPT,
    "multitask_prompt_tuning": _PROMPT,
    "p_tuning": _PROMPT,
    "prefix_tuning": _PROMPT,
    "adaption_prompt": _PROMPT,
    "cpt": _PROMPT,
    "cartridge": _PROMPT,
    "poly": _ROUTED,
    "xlora": _ROUTED,
    "adamss": _WEIGHT,
    "beft": _WEIGHT,
    "lily": _WEIGHT,
    "frod": _WEIGHT,
    "pvera": _WEIGHT,
    "glora": _WEIGHT,
    "unilora": _WEIGHT,
    "hira": _WEIGHT,
    "tinylora": _WEIGHT,
    "psoft": _WEIGHT,
    "peanut": _WEIGHT,
    "shadow": _WEIGHT,
    "supertuning": _WEIGHT,
    "deft": _WEIGHT,
    "trainable_tokens": "not a method of its own here: write a `tokens` rule in any adapter",
}


def why_missing(name: str) -> str | None:
    """Why PEFT's method `name` (any case) is not in surgeon, or None when it is not one."""
    return MISSING.get(name.lower())
