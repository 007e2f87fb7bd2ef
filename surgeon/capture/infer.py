"""Roles from the graph: what each adaptable layer does, decided by dataflow alone.

`infer_roles(model)` captures the model (surgeon.capture.graph), reads the graph as dataflow
(surgeon.capture.flow) and applies one small rule per role, in priority order:

1. embed      an embedding indexed by a model input (token ids), not by computed positions;
2. attention  q/k/v/o (fused qkv/kv; xattn.* for cross-attention), see roles_attention;
3. router     a projection whose output reaches `topk` (MoE); experts keep their MLP roles;
   (a top-k token indexer's query and key, whose product reaches `topk`, are `other`, said so);
4. adaln      a projection scaling a norm's output (a diffusion transformer's modulation);
   mlp        up/gate/down/gate_up, see roles_mlp;
5. head       q/k of a pairwise scorer (their product is a model output: a pointer head), or
              a projection whose output reaches a model output and no other projection;
6. other      everything else, dead modules included.

Module names are never consulted, except to say which module owns a weight. Layers of repeated
blocks that capture short-circuited take the role of the same layer in the block captured for
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from surgeon.capture.attention import Found, attention_roles, find_cores
from surgeon.capture.experts import expert_role, is_expert_stack, parameter_roles
from surgeon.capture.flow import (
    ACT,
    INPUT,
    MATMUL,
    NORM,
    OUTPUT,
    PASS,
    PROJ,
    REDUCE,
    SLICE,
    SOFTMAX,
    TOPK,
    Flow,
    adaptable_kind,
    op_name,
)
from surgeon.capture.graph import INPUT_HINT, Capture, CaptureError, capture
from surgeon.capture.mlp import mlp_roles
from surgeon.capture.names import ROLES
from surgeon.capture.reach import unreached
from surgeon.layer_kinds import is_transformers_model

_SUGGESTION = "Select these layers by name (\"q_proj\", /regex/) or by type (Linear) instead."
# Ops between an index input and the embedding lookup that keep it "the input".
_INDEX_VIEWS = frozenset({"view", "reshape", "unsqueeze", "squeeze", "to", "_to_copy", "expand",
                          "contiguous", "clone", "flatten", "alias", "lift_fresh_copy"})
# Between a router's logits and topk: softmax, casts, jitter, normalisation.
_TO_TOPK = frozenset({PASS, SLICE, ACT, SOFTMAX, REDUCE})
# Between a projection and a score matmul it is an operand of: views, RoPE, norms, scaling.
_TO_SCORE = frozenset({PASS, SLICE, ACT, NORM, REDUCE})


class Role(str):
    """A role name (one of `role_names.ROLES`) and the dataflow fact that decided it.

    It compares and hashes as its name: `Role("attn.q", "...") == "attn.q"`. `uncertain` says
    why the role may be wrong ("" when the graph it was read from is complete): role selectors
    refuse such layers rather than guess (surgeon.planning.select).
    """

    evidence: str
    uncertain: str

    def __new__(cls, name: str, evidence: str, uncertain: str = "") -> Role:
        if name not in ROLES:
            raise ValueError(f"unknown role `{name}`; roles are {', '.join(ROLES)}")
        role = super().__new__(cls, name)
        role.evidence = evidence
        role.uncertain = uncertain
        return role

    def __repr__(self) -> str:
        extra = f", uncertain={self.uncertain!r}" if self.uncertain else ""
        return f"Role({str(self)!r}, evidence={self.evidence!r}{extra})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Role, (str(self), self.evidence, self.uncertain))


class RolesError(CaptureError):
    """Roles cannot be inferred because the model's dataflow could not be captured."""


def infer_roles(model: nn.Module, *, example_inputs: Any = None) -> dict[str, Role]:
    """The role of every adaptable layer (Linear, transformers Conv1D, Conv1d/2d/3d, Embedding).

    Args:
        model: the model; it is not modified (capture works on a meta-device copy).
        example_inputs: as for `surgeon.capture.graph.capture_graph`; None for transformers models.
    Returns:
        Module path -> Role, in `model.named_modules()` order, for every adaptable layer.
    Raises:
        RolesError: the dataflow could not be captured (the message says why).
    Example:
        >>> roles = infer_roles(model)
        >>> roles["model.layers.0.self_attn.q_proj"], roles["model.layers.0.self_attn.q_proj"].evidence
        ('attn.q', 'reaches the query operand of scaled_dot_product_attention in `model.layers.0.self_attn`')
    """
    return analyse(model, example_inputs=example_inputs).roles


@dataclass(frozen=True)
class Analysis:
    """What one capture says about a model: the roles of its adaptable layers, of its expert
    stacks (3-D parameters), and why some layers' adapters would never run."""

    roles: dict[str, Role]  # module path -> role, every adaptable layer
    parameters: dict[str, Role]  # parameter path -> role, every 3-D parameter (`@moe.up`, ...)
    unreached: dict[str, tuple[str, bool]]  # module path -> (why never called, certain)


def analyse(model: nn.Module, *, example_inputs: Any = None) -> Analysis:
    """`infer_roles` with the parameter roles and reach facts of the same capture (the planner
    captures once for all three)."""
    try:
        captured = capture(model, example_inputs)
    except CaptureError as error:
        raise RolesError(f"Cannot infer roles: {error}") from None
    found = analysis_of_capture(captured, model)
    if example_inputs is None:  # towers the synthesized call did not reach get their own inputs
        towers = tower_roles(model, found.roles)
        found.roles.update(towers)
        for path in towers:  # reached by the tower's own capture
            found.unreached.pop(path, None)
    return found


def roles_of_capture(captured: Capture, model: nn.Module) -> dict[str, Role]:
    """Roles from an existing capture of `model` (the planner may capture once and reuse it).

    Every role read from a graph with a caveat (symbolic tracing) is uncertain, and so is the
    `other` of a layer the captured call never reached: it may do anything with other inputs.
    """
    return analysis_of_capture(captured, model).roles


def analysis_of_capture(captured: Capture, model: nn.Module) -> Analysis:
    flow = Flow(captured)
    decided, stacks = _decide(flow)
    caveat = f"{captured.caveat}; {INPUT_HINT}" if captured.caveat else ""
    roles: dict[str, Role] = {}
    for path, module in model.named_modules():
        if adaptable_kind(module) is not None:
            role = decided.get(path) or _undecided(flow, captured, decided, path)
            roles[path] = Role(role, role.evidence, caveat) if caveat else role
    parameters = {path: Role(role, evidence, caveat or doubt) for path, (role, evidence, doubt)
                  in parameter_roles(flow, captured, model, stacks).items()}
    return Analysis(roles, parameters, unreached(flow, captured, model))


def tower_roles(model: nn.Module, roles: dict[str, Role]) -> dict[str, Role]:
    """Roles for unreached layers inside nested pretrained models (a VLM's vision tower, an
    audio encoder), each captured on its own with inputs made from its own config."""
    found: dict[str, Role] = {}
    dead = {p for p, r in roles.items() if r.uncertain and r == "other"}
    for path, tower in _towers(model):
        inside = {p for p in dead if p.startswith(path + ".")} - found.keys()
        if not inside:
            continue
        try:
            own = infer_roles(tower)
        except (CaptureError, RecursionError):
            continue
        for sub, role in own.items():
            full = f"{path}.{sub}"
            if full in inside and (not role.uncertain or role != "other"):
                found[full] = Role(role, f"{role.evidence} (tower `{path}` captured on its own)",
                                   role.uncertain)
    return found


def _tied_to(flow: Flow, captured: Capture, path: str) -> str | None:
    """A called layer holding this layer's very weight (T5's `shared` and its embed_tokens)."""
    try:
        weight = captured.model.get_submodule(path).weight
    except AttributeError:
        return None
    for proj in flow.projs.values():
        if proj.module and proj.module != path and proj.module in flow.called_modules:
            if getattr(captured.model.get_submodule(proj.module), "weight", None) is weight:
                return proj.module
    return None


def _towers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Nested modules with their own transformers config, outermost first."""
    own = getattr(model, "config", None)
    return [(p, m) for p, m in model.named_modules()
            if p and getattr(m, "config", None) is not None and m.config is not own
            and hasattr(m.config, "to_dict") and is_transformers_model(m)]


def _decide(flow: Flow) -> tuple[dict[str, Role], dict[str, tuple[str, str]]]:
    """Rules in priority order; a module keeps the first role any of its calls gets, and so does
    an expert stack applied without a module (its MoE role, surgeon.capture.experts)."""
    decided: dict[str, Role] = {}
    stacks: dict[str, tuple[str, str]] = {}
    taken: set[fx.Node] = set()

    def keep(found: list[Found]) -> None:
        for item in found:
            module, param = flow.projs[item.node].module, flow.projs[item.node].param
            taken.add(item.node)
            if module is not None and module not in decided:
                decided[module] = Role(item.role, item.evidence)
            elif module is None and param not in stacks and is_expert_stack(flow.capture, param) \
                    and (moe := expert_role(item.role, item.evidence)) is not None:
                stacks[param] = moe

    keep(embed_roles(flow))
    keep(attention_roles(flow, find_cores(flow)))
    keep(router_roles(flow, _free(flow, taken)))
    keep(indexer_roles(flow, _free(flow, taken)))
    keep(modulation_roles(flow, _free(flow, taken)))
    keep(mlp_roles(flow, _free(flow, taken)))
    keep(scorer_roles(flow, _free(flow, taken)))  # an MLP's last layer may feed a scorer (MaskFormer)
    keep(head_roles(flow, _free(flow, taken)))
    return decided, stacks


def _free(flow: Flow, taken: set[fx.Node]) -> list[fx.Node]:
    return [n for n in flow.projs if n not in taken]


def embed_roles(flow: Flow) -> list[Found]:
    """Embeddings looked up with a model input itself (token ids); position, token-type and
    relative-bucket tables are indexed by values computed in the graph and stay `other`."""
    found = []
    for node, proj in flow.projs.items():
        if proj.kind != "embedding":
            continue
        source = _index_source(flow, proj.data)
        if source is not None:
            found.append(Found(node, "embed", f"looked up with the model input `{source}`"))
        else:
            found.append(Found(node, "other", "an embedding indexed by values computed in the graph "
                               "(positions, token types, buckets), not by a model input"))
    return found


def _index_source(flow: Flow, index: Any) -> str | None:
    """The model input an embedding index is, through reshapes and casts only."""
    while isinstance(index, fx.Node):
        if flow.kind[index] == INPUT:
            return flow.input_name(index)
        if index.op not in ("call_function", "call_method") or op_name(index) not in _INDEX_VIEWS:
            return None
        index = index.args[0]
    return None


def router_roles(flow: Flow, candidates: list[fx.Node]) -> list[Found]:
    """MoE routers: the logits reach topk (through softmax and normalisation)."""
    found = []
    for node in candidates:
        hits = flow.walk_forward(node, _TO_TOPK, frozenset({TOPK}))
        if hits:
            found.append(Found(node, "moe.router", f"its output reaches topk in `{flow.scope(hits[0])}`"))
    return found


def indexer_roles(flow: Flow, candidates: list[fx.Node]) -> list[Found]:
    """Query/key projections of a top-k token indexer (DeepSeek's sparse attention): their
    product's scores only select tokens (topk) and weigh no values, so they are no attention
    operands; `other`, said plainly, rather than left without a reason."""
    found = []
    for node in candidates:
        for score in flow.walk_forward(node, _TO_SCORE, frozenset({MATMUL})):
            hits = flow.walk_forward(score, _TO_TOPK | {MATMUL}, frozenset({TOPK}))
            if hits:
                found.append(Found(node, "other", "enters a product of two activations whose scores "
                                   f"only pick tokens by topk in `{flow.scope(hits[0])}` (a "
                                   "sparse-attention indexer): no values are weighed, so it is no "
                                   "attention operand"))
                break
    return found


def scorer_roles(flow: Flow, candidates: list[fx.Node]) -> list[Found]:
    """Query/key projections of a pairwise scorer (a global pointer's reading-order logits,
    CLIP's similarities): their product of two activations is a model output and weighs no
    values, so they are `head`, said plainly, not attention operands."""
    everything = frozenset(set(flow.kind.values()) - {PROJ, OUTPUT})
    found = []
    for node in candidates:
        for score in flow.walk_forward(node, _TO_SCORE, frozenset({MATMUL})):
            if not all(isinstance(o, fx.Node) and flow.origins[o] for o in flow.operands(score)):
                continue  # a product with a constant: no pair of activations scored
            reached = flow.walk_forward(score, everything, frozenset({PROJ, OUTPUT}))
            if reached and all(flow.kind[n] == OUTPUT for n in reached):
                found.append(Found(node, "head", "enters a product of two activations whose scores "
                                   "are a model output (a pairwise scorer): no values are weighed"))
                break
    return found


def modulation_roles(flow: Flow, candidates: list[fx.Node]) -> list[Found]:
    """Adaptive-norm modulation (adaLN): a linear projection whose output, through views and
    splits only (no activation: a gated norm's gate passes one), multiplies a norm's output."""
    found = []
    for node in candidates:
        scaled = _scales_a_norm(flow, node) if flow.projs[node].kind == "linear" else None
        if scaled is not None:
            found.append(Found(node, "adaln", "its output scales a normalised activation in "
                               f"`{flow.scope(scaled)}` (adaptive norm modulation), through no "
                               "activation"))
    return found


def _scales_a_norm(flow: Flow, proj: fx.Node) -> fx.Node | None:
    """The `mul` of a norm's output that `proj`'s output reaches through views and splits."""
    seen, queue = set(), [proj]
    while queue:
        current = queue.pop(0)
        for user in flow.users(current):
            if user in seen:
                continue
            seen.add(user)
            others = [o for o in flow.inputs(user) if o is not current]
            if op_name(user) == "mul" and any(_normed(flow, o) for o in others):
                return user
            if flow.kind[user] in (PASS, SLICE):
                queue.append(user)
    return None


def _normed(flow: Flow, node: fx.Node) -> bool:
    """A norm's output, seen through a few views and casts."""
    for _ in range(4):
        if flow.kind[node] == NORM:
            return True
        if op_name(node) not in _INDEX_VIEWS or not flow.inputs(node):
            return False
        node = flow.inputs(node)[0]
    return False


def head_roles(flow: Flow, candidates: list[fx.Node]) -> list[Found]:
    """Output heads: the projection's output reaches a model output and no other projection."""
    everything = frozenset(set(flow.kind.values()) - {PROJ, OUTPUT})
    found = []
    for node in candidates:
        if flow.projs[node].kind == "embedding":
            continue
        reached = flow.walk_forward(node, everything, frozenset({PROJ, OUTPUT}))
        if reached and all(flow.kind[n] == OUTPUT for n in reached):
            found.append(Found(node, "head", "its output reaches a model output without passing "
                               "another projection"))
    return found


def _undecided(flow: Flow, captured: Capture, decided: dict[str, Role], path: str) -> Role:
    """`other`, or the role of the same layer in the block that stood in for this one."""
    for sibling, rep in captured.stand_ins.items():
        if path.startswith(sibling + "."):
            twin = rep + path[len(sibling):]
            if twin in decided:
                role = decided[twin]
                return Role(role, f"{role.evidence} (as `{twin}`: same block structure)")
            twin_role = _undecided(flow, captured, decided, twin)
            return Role("other", f"as `{twin}` (same block structure): {twin_role.evidence}",
                        twin_role.uncertain)
    tied = _tied_to(flow, captured, path)
    if tied:
        return Role("other", f"never called itself; its weight is applied by `{tied}` (tied)")
    applied = any(p.module == path for p in flow.projs.values())
    if path not in flow.called_modules and not applied:
        return Role("other", "never called in the captured forward pass (dead)",
                    "never reached by the captured call: with other inputs it may take any role; "
                    + INPUT_HINT)
    if not applied:
        return Role("other", "called, but its weight is never applied to data (read directly)")
    return Role("other", "no attention, MLP, router, embedding or head pattern in its dataflow")
