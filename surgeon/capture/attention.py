"""Attention roles: which projections make the query, key, value and output of an attention core.

A core is a `scaled_dot_product_attention` call (q, k, v = args 0-2) or the eager pattern: a
softmax over score matmul(s) of two activations, whose result is operand 0 of another
activation matmul (P @ V). The projections reached backwards from an operand (through RoPE,
qk-norm, GQA repeats, splits of a fused output, scaling) play that operand's part; one reached
from several operands is fused (qkv, kv). The first projection reading the core's output is `o`.
Cross-attention: the key/value projections read inputs that depend on other model inputs than
the query projection's (the encoder output, image features).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from surgeon.capture.flow import ACT, MATMUL, NORM, PASS, PROJ, REDUCE, SDPA, SLICE, SOFTMAX, Flow, op_name

# Between a projection and an attention operand: views, RoPE, casts, scaling, qk-norm.
_TO_OPERAND = frozenset({PASS, SLICE, ACT, NORM, REDUCE})
# Between the score matmul and the softmax: scale, mask, position bias, softcap tanh.
_TO_SOFTMAX = frozenset({PASS, SLICE, ACT})
# Between the probabilities and P @ V: dropout, casts, head masks.
_TO_PV = frozenset({PASS, SLICE})
# Between the core output and the output projection: head merge, output gates.
_TO_OUTPUT = frozenset({PASS, SLICE, ACT})
_PARTS = {"q": "query", "k": "key", "v": "value"}


@dataclass(frozen=True)
class Core:
    """One attention computation: its q, k, v operands and the node holding its output."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    what: str  # "scaled_dot_product_attention" or "the softmax attention"
    where: str  # module path it ran in


@dataclass(frozen=True)
class Found:
    """A role decided for one projection node, with the fact that decided it."""

    node: fx.Node
    role: str
    evidence: str


def find_cores(flow: Flow) -> list[Core]:
    """Every attention core in the graph, in graph order."""
    cores: list[Core] = []
    for node in flow.nodes:
        if flow.kind[node] == SDPA:
            q, k, v = node.args[:3]
            cores.append(Core(q, k, v, node, "scaled_dot_product_attention", flow.scope(node)))
        elif flow.kind[node] == SOFTMAX:
            core = softmax_core(flow, node)
            if core is not None:
                cores.append(core)
    return cores


def softmax_core(flow: Flow, softmax: fx.Node) -> Core | None:
    """The eager pattern around `softmax`, or None when it is not attention (e.g. a router)."""
    inputs = flow.inputs(softmax)
    if not inputs:
        return None
    scores = flow.walk_back(inputs[0], _TO_SOFTMAX, frozenset({MATMUL}))
    pv = [m for m in flow.walk_forward(softmax, _TO_PV, frozenset({MATMUL}))
          if _operands(m)[1] is not None and flow.walk_back(_operands(m)[0], _TO_PV, frozenset({SOFTMAX})) == [softmax]]
    if not scores or not pv:
        return None
    score = _content_score(flow, scores)
    q, k = _operands(score)
    return Core(q, k, _operands(pv[0])[1], pv[0], "the softmax attention", flow.scope(score))


def _operands(matmul: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(left, right) activation operands of a matmul-like node."""
    name = op_name(matmul)
    args = matmul.args[1:3] if name in ("baddbmm", "addbmm") else matmul.args[:2]
    if name == "einsum":
        args = tuple(matmul.args[1])[:2]
    return args[0], args[1]


def _content_score(flow: Flow, scores: list[fx.Node]) -> fx.Node:
    """The query-key product among several score terms (DeBERTa adds position terms whose one
    side is computed from parameters only): the one with both sides depending on model inputs."""
    content = [s for s in scores if all(flow.origins[o] for o in _operands(s))]
    return (content or scores)[0]


def attention_roles(flow: Flow, cores: list[Core]) -> list[Found]:
    """q/k/v/qkv/kv/o roles (attn.* or xattn.*) for the projections around every core."""
    found: list[Found] = []
    for core in cores:
        parts: dict[fx.Node, list[str]] = {}
        for part, operand in (("q", core.q), ("k", core.k), ("v", core.v)):
            for proj in _projections(flow, flow.walk_back(operand, _TO_OPERAND, frozenset({PROJ}))):
                parts.setdefault(proj, []).append(part)
        cross = _is_cross(flow, parts)
        family = "xattn" if cross else "attn"
        for proj, names in parts.items():
            role = "".join(names) if len(names) == 1 or names == ["k", "v"] else "qkv"
            found.append(Found(proj, f"{family}.{role}", _operand_evidence(core, names, cross)))
        for proj in _projections(flow, flow.walk_forward(core.out, _TO_OUTPUT, frozenset({PROJ}))):
            found.append(Found(proj, f"{family}.o", f"first projection reading the output of "
                               f"{core.what} in `{core.where}`"))
            found.extend(_output_gates(flow, proj, parts, family, core))
    return found


def _output_gates(flow: Flow, out: fx.Node, parts: dict[fx.Node, list[str]], family: str,
                  core: Core) -> list[Found]:
    """Projections that scale the core's output on its way to `o` (gated attention): they reach
    the output projection's input through pointwise ops, not through the core."""
    feeders = flow.walk_back(flow.projs[out].data, _TO_OUTPUT, frozenset({PROJ}))
    return [Found(p, f"{family}.gate", f"gates the output of {core.what} in `{core.where}` "
                  "before the output projection") for p in _projections(flow, feeders) if p not in parts]


def _projections(flow: Flow, nodes: list[fx.Node]) -> list[fx.Node]:
    """Linear and conv projections only: an embedding lookup is never an attention projection."""
    return [n for n in nodes if flow.projs[n].kind != "embedding"]


def _is_cross(flow: Flow, parts: dict[fx.Node, list[str]]) -> bool:
    """Keys/values read a different source than the query: their inputs depend on other inputs."""
    query = [p for p, names in parts.items() if "q" in names]
    keys = [p for p, names in parts.items() if "q" not in names]
    if not query or not keys:
        return False
    source = lambda projs: frozenset().union(*(flow.origins[flow.projs[p].data] for p in projs))
    return source(query) != source(keys)


def _operand_evidence(core: Core, names: list[str], cross: bool) -> str:
    operands = ", ".join(_PARTS[n] for n in names)
    plural = "operands" if len(names) > 1 else "operand"
    text = f"reaches the {operands} {plural} of {core.what} in `{core.where}`"
    if cross and "q" in names:
        return text + "; its keys and values are read from another source"
    return text + ("; read from another source than the query" if cross else "")
