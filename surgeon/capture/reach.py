"""Which adaptable layers the captured forward never calls, and why: an adapter there never runs.

Two facts from the graph, per layer (a layer in a short-circuited block is judged by its twin
in the block captured for it):
- its weight is read (a `get_attr` with users) but the module is never called: its parent
  applies the weight itself (nn.MultiheadAttention's out_proj, a fused kernel). Certain: an
  adapter wrapping the module's call is skipped on every input;
- neither called nor its weight read: a dead branch, or a part these inputs did not reach.
  Not certain: other inputs may reach it.
A capture with a caveat (symbolic tracing) makes every fact uncertain.
"""

from __future__ import annotations

from torch import nn

from surgeon.capture.flow import Flow, adaptable_kind
from surgeon.capture.graph import Capture

READ_DIRECTLY = ("is never called: its parent reads its weight directly (the captured graph has a "
                 "get_attr of `{weight}` and no call of the module), so an adapter there would "
                 "never run")
NEVER_CALLED = ("never called in the captured forward pass (a dead branch, or a part these "
                "inputs do not reach): an adapter there may never run")


def unreached(flow: Flow, captured: Capture, model: nn.Module) -> dict[str, tuple[str, bool]]:
    """Module path -> (why its adapter never runs, whether that holds for every input)."""
    read = _read_weights(flow)
    called = flow.called_modules
    out: dict[str, tuple[str, bool]] = {}
    for path, module in model.named_modules():
        if not path or adaptable_kind(module) is None:
            continue
        seen = _twin(captured.stand_ins, path)
        if seen in called:
            continue
        weights = [f"{seen}.{n}" for n, _ in module.named_parameters(recurse=False)]
        weight = next((w for w in weights if w in read), None)
        if weight is not None:
            out[path] = (READ_DIRECTLY.format(weight=weight), not captured.caveat)
        else:
            out[path] = (NEVER_CALLED, False)
    return out


def _read_weights(flow: Flow) -> set[str]:
    """Canonical paths of parameters the graph reads (a get_attr whose value is used)."""
    return {flow.canonical_param(str(n.target)) for n in flow.nodes if n.op == "get_attr" and n.users}


def _twin(stand_ins: dict[str, str], path: str) -> str:
    for sibling, rep in stand_ins.items():
        if path == sibling or path.startswith(sibling + "."):
            return rep + path[len(sibling):]
    return path
