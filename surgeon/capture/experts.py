"""Roles of MoE expert parameters (`@moe.up`, `@moe.down`), read with the MLP rules.

transformers 5 stores a MoE block's experts as 3-D parameters `(experts, d1, d2)` (Mixtral,
Qwen2/3-MoE, gpt-oss) applied by grouped, batched or per-expert matmuls, with no Linear module
to call. The captured graph still shows each stack applied to data, so the MLP rules
(surgeon.capture.mlp) give it up/gate/gate_up/down; an expert stack takes the MoE role: `moe.up`
for what feeds the nonlinearity (gate_up, w1, w3), `moe.down` for what reads it (w2).
Results are `(role, evidence, uncertain)` triples: infer.py makes them `Role`s.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from surgeon.capture.flow import Flow
from surgeon.capture.graph import INPUT_HINT, Capture

EXPERT_ROLES = {"mlp.up": "moe.up", "mlp.gate": "moe.up", "mlp.gate_up": "moe.up",
                "mlp.down": "moe.down"}
_UNREACHED = ("never applied in the captured forward pass: with other inputs it may take any "
              "role; " + INPUT_HINT)


def expert_parameters(model: nn.Module) -> list[str]:
    """Paths of the model's 3-D parameters (expert stacks), in `named_parameters()` order."""
    return [name for name, p in model.named_parameters() if p.dim() == 3]


def is_expert_stack(captured: Capture, param: str | None) -> bool:
    if param is None:
        return False
    try:
        return captured.model.get_parameter(param).dim() == 3
    except AttributeError:  # a buffer applied as a weight (DPT's bin centres): no expert stack
        return False


def expert_role(mlp_role: str, evidence: str) -> tuple[str, str] | None:
    """The MoE role an MLP role becomes on an expert stack (None: no MoE role)."""
    role = EXPERT_ROLES.get(mlp_role)
    return None if role is None else (role, f"an expert stack: {evidence}")


def parameter_roles(flow: Flow, captured: Capture, model: nn.Module,
                    decided: Mapping[str, tuple[str, str]]) -> dict[str, tuple[str, str, str]]:
    """`(role, evidence, uncertain)` of every 3-D parameter of `model`: its decided MoE role, the
    role of its twin in the block that stood in for its own, else `other` (uncertain when the
    captured call never applied it)."""
    applied = {p.param for p in flow.projs.values() if p.param}
    out: dict[str, tuple[str, str, str]] = {}
    for path in expert_parameters(model):
        twin = _twin(captured.stand_ins, path)
        if path in decided:
            out[path] = (*decided[path], "")
        elif twin in decided:
            role, evidence = decided[twin]
            out[path] = (role, f"{evidence} (as `{twin}`: same block structure)", "")
        elif (twin or path) in applied:
            out[path] = ("other", "applied to data, but in no MLP pattern", "")
        else:
            out[path] = ("other", "never applied in the captured forward pass", _UNREACHED)
    return out


def _twin(stand_ins: Mapping[str, str], path: str) -> str | None:
    """The same parameter in the block captured for `path`'s block, if that was short-circuited."""
    for sibling, rep in stand_ins.items():
        if path.startswith(sibling + "."):
            return rep + path[len(sibling):]
    return None
