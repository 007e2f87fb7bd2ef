"""Scene -> one self-contained HTML page: no network, no Graphviz, one file to send around.

The page is an outline of the model in dataflow order: modules outside repeated blocks as
cards, each group of blocks as a collapsible panel (`×N`) whose body is the block's dataflow,
drawn as inline SVG with `surgeon.pictures.layout`. A click on any layer shows its details (paths,
shape, role and evidence, adapters, the rule and spec line that chose it, its neighbours, and
for adapted layers the fx graph before and after merge). The scene travels as JSON in the page.
"""

from __future__ import annotations

import html
import json

import networkx as nx

from surgeon.pictures.dot import PALETTE, adapter_colours, tooltip
from surgeon.pictures.layout import LINE_H, PAD_Y, break_cycles, layered
from surgeon.pictures.page_assets import CSS, JS
from surgeon.pictures.scene import IO, LAYER, MODULE, OP, Expansion, Node, Scene

_BOLD = ' font-weight="600"'
_FILL = {LAYER: ("#ffffff", "#868e96"), MODULE: ("#f1f3f5", "#ced4da"), OP: ("#e7f5ff", "#74c0fc"),
         IO: ("#ffffff", "#adb5bd")}


def scene_to_html(scene: Scene, open_layer: str | None = None) -> str:
    """The page for `scene`; `open_layer` (a module path or suffix) starts selected."""
    colours = adapter_colours(scene)
    expansion_of = _expansion_index(scene)
    data = scene.to_json()
    for node in data["nodes"]:
        node["expansion"] = expansion_of.get(node["id"])
    data["open"] = _open_id(scene, open_layer)
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(scene.title)} — surgeon viz</title>", f"<style>{CSS}</style></head><body>",
             "<header>", f"<h1>{esc(scene.title)}</h1>", f'<div class="caption">{esc(_caption(scene))}</div>']
    parts += [f'<div class="note">{esc(note)}</div>' for note in scene.notes]
    parts.append(_legend(colours))
    parts.append('<button id="expand-all" type="button">expand all</button>'
                 '<button id="collapse-all" type="button">collapse all</button></header>')
    parts.append('<main><div id="outline">')
    parts.append(_outline(scene, colours))
    parts.append('</div><aside id="details"><p class="empty">Click a layer to see its details: '
                 'module paths, shape, role and why, the adapter and the spec rule that chose it.</p>'
                 "</aside></main>")
    for i, expansion in enumerate(scene.expansions):
        parts.append(f'<template id="expansion-{i}">{_expansion(expansion, i)}</template>')
    parts.append(f'<script type="application/json" id="scene-data">{payload}</script>')
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _caption(scene: Scene) -> str:
    s = scene.stats
    text = f"{s.get('blocks', 0)} blocks drawn as {len(scene.groups)} group(s)"
    if s.get("sites"):
        share = 100 * s["params"] / max(s["model_params"], 1)
        text += f"; {s['layers']} adapted layers, {s['params']:,} trainable parameters ({share:.2f}%)"
    return text + f"; {scene.mode} view"


def _legend(colours: dict[str, tuple[str, str]]) -> str:
    items = [f'<span><i style="background:{f};border-color:{b}"></i>adapter {html.escape(a)}</span>'
             for a, (f, b) in colours.items()]
    items += [f'<span><i style="background:{f};border-color:{b}"></i>{what}</span>' for what, (f, b) in
              (("adaptable layer", _FILL[LAYER]), ("module", _FILL[MODULE]), ("op", _FILL[OP]))]
    return '<div class="legend">' + "".join(items) + "</div>"


def _outline(scene: Scene, colours) -> str:
    """Top-level items (outside nodes and groups) in dataflow order, arrows between."""
    group_of = {n.id: n.group for n in scene.nodes}
    items = [n.id for n in scene.nodes if n.group is None] + [g.id for g in scene.groups]
    order = {item: i for i, item in enumerate(items)}
    graph = nx.DiGraph()
    graph.add_nodes_from(items)
    for src, dst in (*scene.edges, *scene.chain):
        a, b = group_of.get(src) or src, group_of.get(dst) or dst
        if a != b and a in order and b in order:
            graph.add_edge(a, b)
    break_cycles(graph)
    ordered = nx.lexicographical_topological_sort(graph, key=lambda item: order[item])
    groups = {g.id: g for g in scene.groups}
    nodes = {n.id: n for n in scene.nodes}
    out = []
    for i, item in enumerate(ordered):
        if i:
            out.append('<div class="arrow">&#8595;</div>')
        out.append(_block(scene, groups[item], colours) if item in groups else _card(nodes[item], colours))
    return "\n".join(out)


def _card(node: Node, colours) -> str:
    cls = "card " + node.kind + (" adapted" if node.adapted else "")
    style = ""
    if node.adapted:
        fill, border = colours[node.sites[0].adapter]
        style = f' style="background:{fill};border-color:{border}"'
    text = "\n".join(_lines(node, len(colours) > 1, full=True))
    return (f'<div class="{cls}"{style} data-node="{html.escape(node.id)}" '
            f'title="{html.escape(tooltip(node))}">{html.escape(text)}</div>')


def _block(scene: Scene, group, colours) -> str:
    members = [n for n in scene.nodes if n.group == group.id]
    ids = {n.id for n in members}
    adapted = sum(1 for n in members if n.adapted)
    summary = f"{adapted} adapted layer(s) per block" if adapted else "no adapter"
    edges = [e for e in scene.edges if e[0] in ids and e[1] in ids]
    cls = "block" + (" single" if group.count == 1 else "")
    return (f'<section class="{cls}" id="{group.id}" data-group="{group.id}">'
            f'<button class="toggle" type="button" aria-expanded="false">{html.escape(group.label)}'
            f'<span class="sum">{summary}</span></button><div class="body">'
            f"{_svg(members, edges, colours, group.id)}</div></section>")


def _svg(nodes: list[Node], edges, colours, prefix: str) -> str:
    labels = {n.id: "\n".join(_lines(n, len(colours) > 1)) for n in nodes}
    boxes, width, height = layered(labels, edges)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img">'), _marker(prefix)]
    out += [_edge(boxes[a], boxes[b], prefix) for a, b in edges]
    for node in nodes:
        fill, border = _FILL[node.kind]
        if node.adapted:
            fill, border = colours[node.sites[0].adapter]
        out.append(_box(node.id, boxes[node.id], labels[node.id], fill, border, node.adapted,
                        tooltip(node), ellipse=node.kind == OP))
    out.append("</svg>")
    return "".join(out)


def _lines(node: Node, several: bool, full: bool = False) -> list[str]:
    name = node.paths[0] if full and node.paths and node.paths[0] else node.label
    if not full and node.cluster and node.kind != OP:
        name = f"{node.cluster}.{node.label}"
    lines = [name]
    if node.kind == MODULE:
        lines.append(node.type)
    if node.role and node.role != "other":
        lines.append("@" + node.role)
    for site in node.sites:
        lines.append(site.summary + (f" [{site.adapter}]" if several else ""))
        count = len(node.paths)
        lines.append(f"{site.params:,} params" + (f" ×{count}" if count > 1 else ""))
    return lines


def _marker(prefix: str) -> str:
    return (f'<defs><marker id="arrow-{prefix}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#868e96"/>'
            "</marker></defs>")


def _edge(a, b, prefix: str) -> str:
    x1, y1, x2, y2 = a.cx, a.y + a.h, b.cx, b.y
    if y2 <= y1:  # an edge upwards (rare): leave from the side
        x1, y1 = a.x + a.w, a.y + a.h / 2
    mid = (y1 + y2) / 2
    return (f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} '
            f'{x2:.1f},{y2:.1f}" marker-end="url(#arrow-{prefix})"/>')


def _box(node_id: str, box, label: str, fill: str, border: str, bold: bool, title: str,
         ellipse: bool = False) -> str:
    shape = (f'<ellipse cx="{box.cx:.1f}" cy="{box.y + box.h / 2:.1f}" rx="{box.w / 2:.1f}" '
             f'ry="{box.h / 2:.1f}" fill="{fill}" stroke="{border}"/>' if ellipse else
             f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" rx="6" '
             f'fill="{fill}" stroke="{border}" stroke-width="{2 if bold else 1}"/>')
    texts = "".join(
        f'<text x="{box.cx:.1f}" y="{box.y + PAD_Y + LINE_H * (i + 0.8):.1f}" text-anchor="middle"'
        f'{_BOLD if i == 0 else ""}>{html.escape(line)}</text>'
        for i, line in enumerate(label.split("\n")))
    return (f'<g class="node" data-node="{html.escape(node_id)}"><title>{html.escape(title)}</title>'
            f"{shape}{texts}</g>")


def _expansion(expansion: Expansion, index: int) -> str:
    figures = []
    for state, nodes, edges in (("before merge", expansion.before, expansion.edges_before),
                                ("after merge", expansion.after, expansion.edges_after)):
        labels = {}
        for name, _, label, tag in nodes:
            who = " · ".join(str(tag[k]) for k in ("adapter", "role", "pass") if tag.get(k))
            labels[name] = label + (f"\n{who}" if who else "") + (f"\n{tag['rule']}" if tag.get("rule") else "")
        boxes, width, height = layered(labels, list(edges))
        prefix = f"x{index}{state[0]}"
        svg = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
               f'viewBox="0 0 {width:.0f} {height:.0f}">'), _marker(prefix)]
        svg += [_edge(boxes[a], boxes[b], prefix) for a, b in edges if a in boxes and b in boxes]
        for name, op, _, tag in nodes:
            branch = tag.get("role") in ("branch", "result")
            fill, border = PALETTE[0] if branch else ("#f1f3f5", "#868e96")
            svg.append(_box(f"{prefix}:{name}", boxes[name], labels[name], fill, border,
                            tag.get("role") == "result", f"{name} ({op})"))
        svg.append("</svg>")
        figures.append(f"<figure><figcaption>{state}</figcaption>{''.join(svg)}</figure>")
    note = html.escape(expansion.folded)
    return f'<div class="expansion">{"".join(figures)}</div><p>{note}</p>'


def _expansion_index(scene: Scene) -> dict[str, int]:
    where = {p: i for i, e in enumerate(scene.expansions) for p in e.stands_for}
    return {n.id: where[p] for n in scene.nodes if n.adapted for p in n.paths[:1] if p in where}


def _open_id(scene: Scene, layer: str | None) -> str | None:
    if layer is None:
        return None
    for node in scene.nodes:
        if any(p == layer or p.endswith("." + layer) or (layer == "" and node.adapted) for p in node.paths):
            return node.id
    return None
