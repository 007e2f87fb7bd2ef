"""The vocabulary of roles and what a role selector matches. Torch-free: the language uses it.

A role says what a layer *does* in the dataflow graph, never what it is called. Role values are
plain strings spelled as in the language (`@attn.q` in a spec is the role "attn.q").

`adaln` is a diffusion transformer's adaptive-norm modulation: a projection of a conditioning
signal (timestep, class) whose output scales and shifts a normalised activation (DiT's
`adaLN_modulation`); it is no MLP part even when it reads another projection through an
activation.

Most roles belong to modules. `moe.up` and `moe.down` belong to parameters: a MoE block's expert
stacks, 3-D parameters `(experts, d1, d2)` in transformers 5 (Mixtral, Qwen-MoE, gpt-oss) that
no Linear applies. `moe.up` feeds the experts' nonlinearity (fused gate_up, w1, w3), `moe.down`
reads it (w2, down_proj); a rule selecting them adapts the parameter (LoRA's
`target_parameters`, surgeon.capture.experts).
"""

from __future__ import annotations

# Every role inference can assign, in display order.
ROLES: tuple[str, ...] = (
    "attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "attn.kv", "attn.gate",
    "xattn.q", "xattn.k", "xattn.v", "xattn.o", "xattn.qkv", "xattn.kv", "xattn.gate",
    "mlp.up", "mlp.gate", "mlp.down", "mlp.gate_up",
    "mixer.in", "mixer.out",
    "moe.router", "moe.up", "moe.down",
    "adaln", "embed", "head", "other",
)

# Roles of parameters (MoE expert stacks), not of modules.
PARAMETER_ROLES: tuple[str, ...] = ("moe.up", "moe.down")

# Families a selector may name on its own: `@attn` is every attention projection, and so on.
FAMILIES: tuple[str, ...] = ("attn", "xattn", "mlp", "mixer", "moe")

# A fused projection produces several parts, so a selector for one part matches it.
_FUSED_PARTS = {"qkv": ("q", "k", "v"), "kv": ("k", "v"), "gate_up": ("gate", "up")}


def selector_names() -> tuple[str, ...]:
    """Everything that may follow `@` in a spec."""
    return ROLES + FAMILIES


def role_matches(selector: str, role: str) -> bool:
    """Whether the role selector `@selector` selects a layer whose inferred role is `role`.

    `@attn.q` matches self- and cross-attention queries and fused projections that produce a
    query (`attn.qkv`), as PEFT's tables target `c_attn` for q on GPT-2; `@xattn.q` matches only
    cross-attention; `@attn` matches every self- or cross-attention role.
    """
    family, _, part = role.partition(".")
    sel_family, _, sel_part = selector.partition(".")
    if not sel_part:
        return family == sel_family or (sel_family == "attn" and family == "xattn")
    if sel_family == "attn" and family not in ("attn", "xattn"):
        return False
    if sel_family != "attn" and sel_family != family:
        return False
    return part == sel_part or sel_part in _FUSED_PARTS.get(part, ())
