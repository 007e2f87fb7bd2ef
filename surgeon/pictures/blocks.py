"""Repeated blocks drawn once: consecutive layers with the same structure *and* the same
adaptation become one group marked `×N`; a layer with another rank, or with no adapter, starts
a new group, so differences stay visible however many layers the model has.

Capture already traces one representative per block structure (`Capture.stand_ins`); every
group of that structure is drawn with the representative's units, under its own module paths,
roles and sites. Dataflow into or out of a stack is drawn from its last group and into the group
holding the representative; consecutive groups are chained (`Scene.chain`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from surgeon.capture.infer import Role
from surgeon.layer_kinds import outer_stacks
from surgeon.pictures.dataflow import Dataflow, Unit
from surgeon.pictures.scene import LAYER, OP, Group, Node, SiteView


@dataclass(frozen=True, slots=True)
class Layout:
    """Where every block went: its group, its stack, and which block was traced for it."""

    groups: tuple[Group, ...]
    rep_of: Mapping[str, str]  # block path -> representative block path
    group_of: Mapping[str, Group]  # block path -> its group
    stack_of: Mapping[str, str]  # block path -> stack path
    groups_of_stack: Mapping[str, tuple[Group, ...]]


def group_blocks(model: nn.Module, rep_of: Mapping[str, str],
                 sites: Mapping[str, tuple[SiteView, ...]]) -> Layout:
    """Runs of consecutive blocks with one representative and equal adaptation, per stack."""
    stacks = outer_stacks(model.named_modules())
    blocks = {(f"{s}.{name}" if s else name): s for s, members in stacks.items() for name in members}
    adaptation = _adaptation_by_block(blocks, sites)
    groups: list[Group] = []
    by_stack: dict[str, list[Group]] = {}
    for stack, members in stacks.items():
        run: list[tuple[str, int]] = []
        key = None
        for name, position in sorted(members.items(), key=lambda item: item[1]):
            block = f"{stack}.{name}" if stack else name
            this = (rep_of.get(block, block), adaptation.get(block, ()))
            if run and this != key:
                by_stack.setdefault(stack, []).append(_group(len(groups), stack, run))
                groups.append(by_stack[stack][-1])
                run = []
            run.append((block, position))
            key = this
        if run:
            by_stack.setdefault(stack, []).append(_group(len(groups), stack, run))
            groups.append(by_stack[stack][-1])
    group_of = {b: g for g in groups for b in g.blocks}
    return Layout(tuple(groups), {b: rep_of.get(b, b) for b in blocks}, group_of, blocks,
                  {s: tuple(gs) for s, gs in by_stack.items()})


def _group(index: int, stack: str, run: list[tuple[str, int]]) -> Group:
    return Group(f"g{index}", stack, tuple(b for b, _ in run), tuple(p for _, p in run))


def _adaptation_by_block(blocks: Mapping[str, str], sites: Mapping[str, tuple[SiteView, ...]]) -> dict:
    """Block path -> what is adapted inside it, relative to the block (comparable across blocks)."""
    found: dict[str, list] = {}
    for path, views in sites.items():
        block = _block_of(path, blocks)
        if block is not None:
            rel = path[len(block) + 1:]
            found.setdefault(block, []).append(
                (rel, tuple((v.adapter, v.method, v.r, v.alpha, v.merged) for v in views)))
    return {b: tuple(sorted(items)) for b, items in found.items()}


def _block_of(path: str, blocks: Mapping[str, object]) -> str | None:
    """The block `path` lies in (the block itself included), or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in blocks:
            return prefix
    return None


# ---- nodes and edges -------------------------------------------------------------------------

def grouped_nodes(flow: Dataflow, layout: Layout, sites: Mapping[str, tuple[SiteView, ...]],
                  roles: Mapping[str, Role]) -> tuple[tuple[Node, ...], tuple[tuple[str, str], ...]]:
    """Scene nodes and edges: units outside blocks as they are, units of a representative block
    once per group it stands for, edges mapped as the module docstring says."""
    nodes: list[Node] = []
    instances: dict[str, dict[str, str]] = {}  # unit id -> group id -> node id
    for unit in flow.units.values():
        block = _block_of(unit.path, layout.rep_of) if unit.path else None
        if block is None:
            paths = (unit.path,) if unit.path else ()
            nodes.append(_node(unit, unit.id, paths, None, "", unit.label, sites, roles))
            continue
        if layout.rep_of[block] != block or unit.id == block:
            continue  # traced in full (no stand-ins): the representative only; a block is its group
        rel = unit.id[len(block) + 1:] if unit.id.startswith(block + ".") else unit.id[len(block):]
        cluster, label = _split(rel, unit)
        for group in _groups_with_rep(layout, block):
            paths = tuple(b + unit.path[len(block):] for b in group.blocks)
            node_id = f"{group.id}/{rel}"
            nodes.append(_node(unit, node_id, paths, group.id, cluster, label, sites, roles))
            instances.setdefault(unit.id, {})[group.id] = node_id
    ids = {n.id for n in nodes}
    edges = tuple(e for e in _grouped_edges(flow, layout, instances) if e[0] in ids and e[1] in ids)
    return tuple(nodes), edges


def _groups_with_rep(layout: Layout, rep: str) -> list[Group]:
    return [g for g in layout.groups if layout.rep_of[g.blocks[0]] == rep]


def _split(rel: str, unit: Unit) -> tuple[str, str]:
    """(cluster, label) inside a block: the cluster is the module's parent within the block
    (`self_attn.q_proj` -> ("self_attn", "q_proj"); T5's `layer.1.EncDecAttention.q` ->
    ("layer.1.EncDecAttention", "q")); an op sits in its scope's cluster with its own label."""
    module, _, op = rel.partition("::")
    module = module.lstrip(".")
    if op:
        return module, unit.label
    parent, _, name = module.rpartition(".")
    return parent, name


def _node(unit: Unit, node_id: str, paths: tuple[str, ...], group: str | None, cluster: str,
          label: str, sites: Mapping[str, tuple[SiteView, ...]], roles: Mapping[str, Role]) -> Node:
    first = paths[0] if paths else ""
    role = roles.get(first) if unit.kind == LAYER else None
    return Node(node_id, label, unit.kind, paths if unit.kind != OP else (), group, cluster,
                unit.type, unit.shape, str(role) if role is not None else "",
                role.evidence if role is not None else "", sites.get(first, ()) if unit.kind == LAYER else ())


def _grouped_edges(flow: Dataflow, layout: Layout, instances: dict[str, dict[str, str]]
                   ) -> tuple[tuple[str, str], ...]:
    out: dict[tuple[str, str], None] = {}
    for src, dst in flow.edges:
        a, b = instances.get(src), instances.get(dst)
        if a is None and b is None:
            out[(src, dst)] = None
        elif a is not None and b is not None and a.keys() == b.keys() and _same_block(src, dst, layout):
            for gid in a:
                out[(a[gid], b[gid])] = None
        elif a is not None and b is not None and _stack(src, layout) == _stack(dst, layout):
            continue  # block to block of one stack: drawn as the chain between groups
        else:
            s = src if a is None else a.get(_last_group(src, layout), next(iter(a.values())))
            d = dst if b is None else next(iter(b.values()))
            out[(s, d)] = None
    return tuple(out)


def _same_block(src: str, dst: str, layout: Layout) -> bool:
    return _block_of(_path(src), layout.rep_of) == _block_of(_path(dst), layout.rep_of)


def _stack(unit_id: str, layout: Layout) -> str | None:
    block = _block_of(_path(unit_id), layout.rep_of)
    return layout.stack_of.get(block) if block else None


def _last_group(unit_id: str, layout: Layout) -> str:
    stack = _stack(unit_id, layout)
    return layout.groups_of_stack[stack][-1].id if stack is not None else ""


def _path(unit_id: str) -> str:
    return unit_id.split("::")[0]
