"""What a picture shows, as plain data: the one thing every renderer (DOT, HTML) reads.

Building the scene (capture, roles, plan, grouping) is the slow and subtle part; rendering is
string formatting. Keeping them apart means the DOT and HTML views cannot disagree about what
is adapted, and tests can check the scene without a browser or Graphviz. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Node kinds: an adaptable layer, another module that computes (norm, activation, rotary), a
# functional op worth seeing (attention, matmul, softmax), or a model input/output.
LAYER, MODULE, OP, IO = "layer", "module", "op", "io"


@dataclass(frozen=True, slots=True)
class SiteView:
    """One adapter on a drawn layer, as the reader needs it (from `surgeon.planning.Site`)."""

    adapter: str
    method: str
    r: int
    alpha: float
    params: int  # trainable parameters per layer
    rule: str  # "file:line:col" of the rule that chose the site
    rule_text: str = ""  # that line of the spec, when the spec text is known
    merged: bool = False  # folded into the base weight already

    @property
    def summary(self) -> str:
        """`LoRA r=8 α=16`: the line a highlighted layer carries."""
        name = {"lora": "LoRA", "ia3": "IA3", "adalora": "AdaLoRA", "loha": "LoHa",
                "lokr": "LoKr"}.get(self.method, self.method)
        parts = [name] + ([f"r={self.r}"] if self.r else []) + ([f"α={self.alpha:g}"] if self.r else [])
        return " ".join(parts) + (" (merged)" if self.merged else "")

    def to_json(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "method": self.method, "r": self.r, "alpha": self.alpha,
                "params": self.params, "rule": self.rule, "rule_text": self.rule_text,
                "merged": self.merged, "summary": self.summary}


@dataclass(frozen=True, slots=True)
class Node:
    """One drawn box. In a collapsed group it stands for the same module in every layer."""

    id: str
    label: str  # short name: the path relative to its group or cluster, or the op's name
    kind: str  # LAYER, MODULE, OP or IO
    paths: tuple[str, ...]  # the module paths it stands for ("" for ops outside modules)
    group: str | None = None  # id of the collapsed block it is drawn in
    cluster: str = ""  # the submodule inside its group it belongs to ("self_attn"), for nesting
    type: str = ""  # module class or op name
    shape: str = ""  # weight shape, out x in
    role: str = ""  # inferred role name ("attn.q"), "" when none was inferred
    evidence: str = ""  # why that role
    sites: tuple[SiteView, ...] = ()

    @property
    def adapted(self) -> bool:
        return bool(self.sites)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "kind": self.kind, "paths": list(self.paths),
                "group": self.group, "cluster": self.cluster, "type": self.type,
                "shape": self.shape, "role": self.role, "evidence": self.evidence,
                "sites": [s.to_json() for s in self.sites]}


@dataclass(frozen=True, slots=True)
class Group:
    """Consecutive blocks of one stack drawn once: same structure and the same adaptation."""

    id: str
    stack: str  # path of the ModuleList holding the blocks
    blocks: tuple[str, ...]  # block paths, in order
    indices: tuple[int, ...]  # their positions in the stack

    @property
    def count(self) -> int:
        return len(self.blocks)

    @property
    def label(self) -> str:
        """`model.layers[0:16]  ×16`, or the one block's path."""
        if self.count == 1:
            return self.blocks[0]
        first, last = self.indices[0], self.indices[-1]
        contiguous = self.indices == tuple(range(first, last + 1))
        span = f"[{first}:{last + 1}]" if contiguous else "[" + ", ".join(map(str, self.indices)) + "]"
        return f"{self.stack}{span}  ×{self.count}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "stack": self.stack, "blocks": list(self.blocks),
                "count": self.count}


@dataclass(frozen=True, slots=True)
class Expansion:
    """The inside of one adapted layer: its fx graph before and after `merge`."""

    path: str  # the layer drawn (others with the same sites look the same)
    stands_for: tuple[str, ...]  # every adapted layer whose graph has this shape
    before: tuple[tuple[str, str, str, dict[str, Any]], ...]  # (name, op, label, provenance tag)
    after: tuple[tuple[str, str, str, dict[str, Any]], ...]
    edges_before: tuple[tuple[str, str], ...]
    edges_after: tuple[tuple[str, str], ...]
    folded: str  # what merge wrote into the base weight, in words

    def to_json(self) -> dict[str, Any]:
        def nodes(items):
            return [{"name": n, "op": op, "label": label, "tag": tag} for n, op, label, tag in items]
        return {"path": self.path, "stands_for": list(self.stands_for), "before": nodes(self.before),
                "after": nodes(self.after), "edges_before": [list(e) for e in self.edges_before],
                "edges_after": [list(e) for e in self.edges_after], "folded": self.folded}


@dataclass(frozen=True, slots=True)
class Scene:
    """A whole picture: the model's drawn nodes, groups, dataflow and notes."""

    title: str
    mode: str  # "dataflow" (captured) or "tree" (module tree, capture failed)
    nodes: tuple[Node, ...]
    groups: tuple[Group, ...]
    edges: tuple[tuple[str, str], ...]  # node id -> node id
    chain: tuple[tuple[str, str], ...] = ()  # group id -> next group id of the same stack
    notes: tuple[str, ...] = ()  # what the reader should know (why the tree, what was collapsed)
    expansions: tuple[Expansion, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)  # sites, params, timings

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    @property
    def adapted_paths(self) -> tuple[str, ...]:
        """Every module path with an adapter, collapsed groups expanded, in drawing order."""
        return tuple(p for n in self.nodes if n.adapted for p in n.paths)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "mode": self.mode, "nodes": [n.to_json() for n in self.nodes],
                "groups": [g.to_json() for g in self.groups], "edges": [list(e) for e in self.edges],
                "chain": [list(c) for c in self.chain], "notes": list(self.notes),
                "expansions": [e.to_json() for e in self.expansions], "stats": self.stats}
