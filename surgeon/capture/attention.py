"""Attention roles: which projections make the query, key, value and output of an attention core.

A core is what attention computes: weights from scores, normalised along one axis, applied to
values. Three shapes of it are recognised:
- a `scaled_dot_product_attention` call (q, k, v = args 0-2), or the eager pattern: a softmax
  over score matmul(s) of two activations, whose result is operand 0 of another activation
  matmul (P @ V);
- linear attention (mLSTM, gated delta rules, lightning attention, YOSO's kernel): a score
  matmul of two activations reaching, through pointwise ops and normalisations but no softmax,
  operand 0 of another activation matmul (a score product written by hand as a broadcast
  product and a sum counts as a matmul: Kimi delta attention); or its recurrent form, `q @ S`
  with a state `S` made from a product of keys and values (mLSTM's step), where the module forms
  no scores; values computed from the scores themselves (a pointer head's matrix powers) are none;
- deformable attention (Deformable DETR's multi-scale attention): softmax weights predicted from
  the query alone multiply values sampled at learned locations (`grid_sample`); it has no key,
  and the sampled map's projection is the value.
The projections reached backwards from an operand (through RoPE, qk-norm, GQA repeats, splits of
a fused output, scaling, depthwise short convolutions) play that operand's part; one reached from
several operands is fused (qkv, kv). The first projection reading the core's output is `o`, never
past the join of the block's input (a residual add): an attention without an output projection
(D-FINE's deformable attention) has none. Scores copied into a buffer in place (Longformer's
banded scores) are followed through the writes.
Cross-attention: the key/value projections read inputs that depend on other model inputs than
the query projection's (the encoder output, image features).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from surgeon.capture.flow import (
    ACT,
    INPUT,
    MATMUL,
    NORM,
    PARAM,
    PASS,
    PROJ,
    REDUCE,
    SDPA,
    SLICE,
    SOFTMAX,
    TOPK,
    Flow,
    op_name,
)

# Between a projection and an attention operand: views, RoPE, casts, scaling, qk-norm.
_TO_OPERAND = frozenset({PASS, SLICE, ACT, NORM, REDUCE})
# Between the score matmul and the softmax: scale, mask, position bias, softcap tanh.
_TO_SOFTMAX = frozenset({PASS, SLICE, ACT})
# Between the probabilities and P @ V: dropout, casts, head masks, a renormalisation (GroupViT's
# hard assignment, divided by its sum over the other axis).
_TO_PV = frozenset({PASS, SLICE, NORM})
# Between the core output and the output projection: head merge, output gates, a gated norm.
_TO_OUTPUT = frozenset({PASS, SLICE, ACT, NORM})
# Between a linear attention's score matmul and the matmul applying it: decay, mask, normaliser.
_TO_LINEAR_PV = frozenset({PASS, SLICE, ACT, NORM})
_PARTS = {"q": "query", "k": "key", "v": "value"}
# Between an indexer's scores and the top-k that picks tokens with them.
_TO_PICK = frozenset({PASS, SLICE, ACT, SOFTMAX, REDUCE, MATMUL})
# Ops joining two tensors into one (a residual add, a cat before a gate).
_JOINS = frozenset({"add", "add_", "sub", "cat", "concat"})
# Back from an attention's input along the residual stream: views, norms, position adds.
_STREAM = frozenset({PASS, SLICE, NORM, INPUT})


@dataclass(frozen=True)
class Core:
    """One attention computation: its q, k, v operands and the node holding its output."""

    q: fx.Node | None  # None: weights predicted from the query alone (deformable attention)
    k: fx.Node | None
    v: fx.Node
    out: fx.Node
    what: str  # "scaled_dot_product_attention", "the softmax attention", ...
    where: str  # module path it ran in
    weights: fx.Node | None = None  # what the weights were computed from, when q is None


@dataclass(frozen=True)
class Found:
    """A role decided for one projection node, with the fact that decided it."""

    node: fx.Node
    role: str
    evidence: str


def find_cores(flow: Flow) -> list[Core]:
    """Every attention core in the graph, in graph order (linear cores after the others)."""
    cores: list[Core] = []
    for node in flow.nodes:
        if flow.kind[node] == SDPA:
            q, k, v = node.args[:3]
            cores.append(Core(q, k, v, node, "scaled_dot_product_attention", flow.scope(node)))
        elif flow.kind[node] == SOFTMAX:
            core = softmax_core(flow, node) or deformable_core(flow, node)
            if core is not None:
                cores.append(core)
    used = {c.out for c in cores}
    matmuls = [n for n in flow.nodes if flow.kind[n] == MATMUL and n not in used]
    linear = _without_gram(flow, [c for n in matmuls if (c := linear_core(flow, n)) is not None])
    # the recurrent form only where no score is formed: a chunked kernel's state update (k.T @ v
    # of one chunk, applied to the next) is no query
    scored = {c.where for c in cores + linear}
    states = [c for n in matmuls if (c := state_core(flow, n)) is not None and c.where not in scored]
    return cores + linear + states


def linear_core(flow: Flow, pv: fx.Node) -> Core | None:
    """Linear attention around `pv`: its operand 0 is a score matmul of two activations (through
    pointwise ops and normalisations, no softmax), its operand 1 the values."""
    left, right = flow.operands(pv)
    if not isinstance(left, fx.Node) or not isinstance(right, fx.Node) or not flow.origins[right]:
        return None
    for score in flow.walk_back(left, _TO_LINEAR_PV, frozenset({MATMUL})):
        q, k = flow.operands(score)
        if score is not pv and isinstance(q, fx.Node) and isinstance(k, fx.Node) \
                and flow.origins[q] and flow.origins[k] and _features(q) != 1:  # not k (x) v
            if score in _ancestors(flow, [right]):
                return None  # scores times scores (a pointer head's matrix powers): no values
            core = Core(q, k, right, pv, "the linear attention", flow.scope(score))
            return None if _skips_values(flow, core) else core
    return None


def state_core(flow: Flow, qs: fx.Node) -> Core | None:
    """Linear attention in its recurrent form around `qs`, `q @ S`: the state `S` is a product of
    keys and values (`k (x) v`, or `k.T @ v` over a chunk), through decays and sums with earlier
    states (mLSTM's step, a delta rule's inter-chunk term): q weighs values by its scores with
    the keys, as in `(q @ k.T) @ v`."""
    q, state = flow.operands(qs)
    if not isinstance(q, fx.Node) or not isinstance(state, fx.Node) or not flow.origins[q]:
        return None
    for kv in flow.walk_back(state, _TO_LINEAR_PV, frozenset({MATMUL})):
        k, v = flow.operands(kv)
        if kv is not qs and isinstance(k, fx.Node) and isinstance(v, fx.Node) \
                and flow.origins[k] and flow.origins[v] and _features(q) == _rows(k):
            core = Core(q, k, v, qs, "the linear attention (recurrent form)", flow.scope(kv))
            return core if _projected(flow, core) and not _skips_values(flow, core) else None
    return None


def _projected(flow: Flow, core: Core) -> bool:
    """q, k and v each made by projections, q by others than k (a state update `k.T @ v` is no
    query), and the result weighs values rather than only picking tokens (a top-k indexer): what
    tells a recurrent attention from other products of products (hyper-connection mixing)."""
    q, k, v = _sources(flow, core.q), _sources(flow, core.k), _values(flow, core.v)
    picks = flow.walk_forward(core.out, _TO_PICK, frozenset({TOPK}))
    return bool(q and k and v) and not set(q) & set(k) and not picks


def _rows(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    return shape[-2] if shape is not None and len(shape) > 1 and isinstance(shape[-2], int) else None


def _skips_values(flow: Flow, core: Core) -> bool:
    """A state-space scan: linear attention plus a skip of its own values scaled per channel by
    a parameter (Mamba-2's `y + D * x`). Its projections keep the mixer roles (`mixer.in`,
    `mixer.out`), so `@attn.*` never selects the SSM layers of a hybrid model."""
    values = set(_sources(flow, core.v))
    seen: set[fx.Node] = set()
    queue = [core.out]
    while queue and len(seen) < 64:
        node = queue.pop(0)
        if node in seen:
            continue
        seen.add(node)
        for user in flow.users(node):
            if op_name(user) in ("add", "add_") and any(
                    other is not node and _scaled_by_parameter(flow, other)
                    and set(_sources(flow, other)) & values for other in flow.inputs(user)):
                return True
            if flow.kind[user] in (PASS, SLICE):
                queue.append(user)
    return False


def _scaled_by_parameter(flow: Flow, node: fx.Node) -> bool:
    """`node` multiplies data by a parameter (seen through views of it): `D * x`."""
    if op_name(node) not in ("mul", "mul_"):
        return False
    for arg in node.args[:2]:
        while isinstance(arg, fx.Node) and flow.kind[arg] in (PASS, SLICE) and arg.args:
            arg = arg.args[0]
        if isinstance(arg, fx.Node) and flow.kind[arg] == PARAM:
            return True
    return False


def _without_gram(flow: Flow, cores: list[Core]) -> list[Core]:
    """Drop products of one tensor with itself (a delta rule's `k_beta @ k.T`) where the same
    module also has a true query-key product: both score operands reach a same projection
    there, and a separate query projection exists (a fused qkv keeps all its cores)."""
    def same(core: Core) -> bool:
        return bool(set(_sources(flow, core.q)) & set(_sources(flow, core.k)))
    mixed = {c.where for c in cores if not same(c)}
    return [c for c in cores if c.where not in mixed or not same(c)]


def deformable_core(flow: Flow, softmax: fx.Node) -> Core | None:
    """Softmax weights multiplying values sampled at learned locations (`grid_sample`), summed."""
    for mul in _pointwise_users(flow, softmax, "mul"):
        for other in (a for a in mul.args[:2] if isinstance(a, fx.Node)):
            sampled = _sampled(flow, other)
            if sampled is not None:
                sums = flow.walk_forward(mul, _TO_PV, frozenset({REDUCE}))
                return Core(None, None, sampled.args[0], sums[0] if sums else mul,
                            "the deformable attention (values sampled at learned offsets)",
                            flow.scope(mul), weights=flow.inputs(softmax)[0])
    return None


def _pointwise_users(flow: Flow, start: fx.Node, name: str) -> list[fx.Node]:
    """`name` ops reached forwards from `start` through views and slices (not through them)."""
    found, seen, queue = [], set(), list(flow.users(start))
    while queue:
        node = queue.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if op_name(node) == name:
            found.append(node)
        elif flow.kind[node] in _TO_PV:
            queue.extend(flow.users(node))
    return found


def _sampled(flow: Flow, node: fx.Node) -> fx.Node | None:
    """The `grid_sample` call behind `node` through views, slices and stacks, if any."""
    seen, queue = set(), [node]
    while queue:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if op_name(current).startswith("grid_sampler"):
            return current
        if flow.kind[current] in _TO_PV:
            queue.extend(flow.inputs(current))
    return None


def softmax_core(flow: Flow, softmax: fx.Node) -> Core | None:
    """The eager pattern around `softmax`, or None when it is not attention (e.g. a router)."""
    inputs = flow.inputs(softmax, writes=True)  # scores copied into a buffer it reads (Longformer)
    if not inputs:
        return None
    found = (flow.walk_back(i, _TO_SOFTMAX, frozenset({MATMUL}), writes=True) for i in inputs)
    scores = list(dict.fromkeys(s for each in found for s in each))
    if not scores:
        return None
    for pv in flow.walk_forward(softmax, _TO_PV, frozenset({MATMUL})):
        # P @ V, or V @ P.T (a VQ-VAE's attention block): the values are the other operand
        for weights, values in (flow.operands(pv), flow.operands(pv)[::-1]):
            if values is not None and flow.walk_back(weights, _TO_PV, frozenset({SOFTMAX})) == [softmax]:
                score = _content_score(flow, scores)
                q, k = flow.operands(score)
                return Core(q, k, values, pv, "the softmax attention", flow.scope(score))
    return None


def _content_score(flow: Flow, scores: list[fx.Node]) -> fx.Node:
    """The query-key product among several score terms (DeBERTa adds position terms whose one
    side is computed from parameters only): the one with both sides depending on model inputs."""
    content = [s for s in scores if all(flow.origins[o] for o in flow.operands(s))]
    return (content or scores)[0]


def attention_roles(flow: Flow, cores: list[Core]) -> list[Found]:
    """q/k/v/qkv/kv/o roles (attn.* or xattn.*) for the projections around every core."""
    found: list[Found] = []
    for core in cores:
        parts: dict[fx.Node, list[str]] = {}
        for part, operand in (("q", core.q), ("k", core.k), ("v", core.v)):
            for proj in (_values(flow, operand) if part == "v" else _sources(flow, operand)):
                parts.setdefault(proj, []).append(part)
        weighed = _sources(flow, core.weights)  # the query side of deformable attention
        cross = _is_cross(flow, parts, weighed)
        family = "xattn" if cross else "attn"
        for proj, names in parts.items():
            role = "".join(names) if len(names) == 1 or names == ["k", "v"] else "qkv"
            found.append(Found(proj, f"{family}.{role}", _operand_evidence(core, names, cross)))
        for proj in _projections(flow, _output_readers(flow, core, list(parts) + weighed)):
            found.append(Found(proj, f"{family}.o", f"first projection reading the output of "
                               f"{core.what} in `{core.where}`"))
            found.extend(_output_gates(flow, proj, parts, family, core))
    return found


def _output_readers(flow: Flow, core: Core, projs: list[fx.Node]) -> list[fx.Node]:
    """Projections reading the core's output through `_TO_OUTPUT` kinds, but never past the join
    of the block's own input (a residual add, or a cat with it): there the attention has ended,
    without an output projection of its own (D-FINE's deformable attention returns its sampled
    sum, added back to the residual stream), and what follows is the next block."""
    stream: set[fx.Node] | None = None
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    queue = [core.out]
    while queue:
        node = queue.pop(0)
        for user in flow.users(node, writes=True):
            if user in seen:
                continue
            seen.add(user)
            kind = flow.kind[user]
            if kind == PROJ:
                if flow.projs[user].data is node:
                    found.append(user)
                continue
            if kind not in _TO_OUTPUT:
                continue
            if op_name(user) in _JOINS:
                stream = _residual_stream(flow, core, projs) if stream is None else stream
                if any(_pointwise_from(flow, other, stream) for other in flow.inputs(user)
                       if other is not node):
                    continue
            queue.append(user)
    return found


def _residual_stream(flow: Flow, core: Core, projs: list[fx.Node]) -> set[fx.Node]:
    """The tensors the attention's inputs were read from, and what they were computed from
    through views, norms and adds (the residual stream before the block), never through a
    projection or the core itself."""
    starts = [flow.projs[p].data for p in projs if isinstance(flow.projs[p].data, fx.Node)]
    starts = starts or [n for n in (core.q, core.k, core.v) if n is not None]
    stream: set[fx.Node] = set()
    queue = list(starts)
    while queue:
        node = queue.pop()
        if node in stream or flow.kind[node] not in _STREAM:
            continue
        stream.add(node)
        queue.extend(flow.inputs(node))
    return stream


def _pointwise_from(flow: Flow, node: fx.Node, stream: set[fx.Node]) -> bool:
    """`node` is computed from the stream through pointwise ops (`gate * residual`), not through
    a projection (a local enhancement of the values, LePE's `conv(v)`, is no residual)."""
    seen: set[fx.Node] = set()
    queue = [node]
    while queue:
        current = queue.pop()
        if current in stream:
            return True
        if current in seen or flow.kind[current] not in (PASS, SLICE, ACT):
            continue
        seen.add(current)
        queue.extend(flow.inputs(current))
    return False


def _output_gates(flow: Flow, out: fx.Node, parts: dict[fx.Node, list[str]], family: str,
                  core: Core) -> list[Found]:
    """Projections that scale the core's output on its way to `o` (gated attention): they reach
    the output projection's input through pointwise ops, not through the core."""
    feeders = [p for p in _projections(flow, flow.walk_back(flow.projs[out].data, _TO_OUTPUT,
                                                            frozenset({PROJ})))
               if p not in parts and not flow.is_depthwise(p)]  # a short conv filters operands
    if feeders:  # a recurrence's input or forget gate also weighs the state: no output gate
        inside = _ancestors(flow, flow.inputs(core.out) + [n for n in (core.q, core.k, core.v)
                                                           if n is not None])
        feeders = [p for p in feeders if p not in inside]
    return [Found(p, f"{family}.gate", f"gates the output of {core.what} in `{core.where}` "
                  "before the output projection") for p in feeders]


def _ancestors(flow: Flow, nodes: list[fx.Node]) -> set[fx.Node]:
    """Every node the values of `nodes` are computed from."""
    found: set[fx.Node] = set()
    queue = list(nodes)
    while queue:
        node = queue.pop()
        if node not in found:
            found.add(node)
            queue.extend(flow.inputs(node))
    return found


def _sources(flow: Flow, operand: fx.Node | None) -> list[fx.Node]:
    """Projections making `operand`: reached backwards through views, RoPE, norms and scaling,
    and through depthwise short convolutions (a per-channel filter along the sequence, as linear
    attention applies to q, k and v), but not into a scale broadcast over the features (a delta
    rule's per-head `beta`: it weighs the operand, it is not the operand)."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    queue = [operand] if operand is not None else []
    while queue:
        node = queue.pop(0)
        if node in seen:
            continue
        seen.add(node)
        kind = flow.kind[node]
        if kind == PROJ:
            if flow.is_depthwise(node) and isinstance(flow.projs[node].data, fx.Node):
                queue.append(flow.projs[node].data)
            elif flow.projs[node].kind != "embedding":
                found.append(node)
        elif kind in _TO_OPERAND:
            queue.extend(_data_operands(flow, node))
    return found


def _data_operands(flow: Flow, node: fx.Node) -> list[fx.Node]:
    inputs = flow.inputs(node)
    if op_name(node) not in ("mul", "div") or len(inputs) < 2:
        return inputs
    width = _features(node)
    full = [n for n in inputs if _features(n) == width]
    return full if width and width > 1 and full else inputs


def _features(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _values(flow: Flow, operand: fx.Node) -> list[fx.Node]:
    """The value operand's projections; values transformed by a matmul of weights first (a
    chunked delta rule's `attn @ v_beta`) are that matmul's right operand."""
    found = _sources(flow, operand)
    if found:
        return found
    for matmul in flow.walk_back(operand, _TO_OPERAND, frozenset({MATMUL})):
        found.extend(p for p in _sources(flow, flow.operands(matmul)[1]) if p not in found)
    return found


def _projections(flow: Flow, nodes: list[fx.Node]) -> list[fx.Node]:
    """Linear and conv projections only: an embedding lookup is never an attention projection."""
    return [n for n in nodes if flow.projs[n].kind != "embedding"]


def _is_cross(flow: Flow, parts: dict[fx.Node, list[str]], weighed: list[fx.Node]) -> bool:
    """Keys/values read a different source than the query: their inputs depend on other inputs.
    Without a query operand, the projections the weights were computed from stand for it."""
    query = [p for p, names in parts.items() if "q" in names] or weighed
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
