"""Scene -> Graphviz DOT text, and DOT -> SVG/PNG through Debian's `dot`.

The DOT text needs nothing installed; laying it out does. `render` finds `dot` on PATH and
says which package to install when it is missing, instead of a FileNotFoundError traceback.
Every node carries its module paths in its tooltip (`xlink:title` in the SVG), so a collapsed
`×N` block still names each module it stands for.
"""

from __future__ import annotations

import shutil
import subprocess

from surgeon.errors import UserError
from surgeon.pictures.scene import IO, LAYER, MODULE, OP, Expansion, Node, Scene

FONT = "Helvetica"
# Adapter colours (fill, border), in the order adapters first appear.
PALETTE = (("#ffe8cc", "#d9480f"), ("#d3f9d8", "#2b8a3e"), ("#e5dbff", "#5f3dc4"),
           ("#c5f6fa", "#0b7285"), ("#ffdeeb", "#c2255c"))
_STYLE = {
    LAYER: 'shape=box style="rounded,filled" fillcolor="#ffffff" color="#868e96"',
    MODULE: 'shape=box style="rounded,filled" fillcolor="#f1f3f5" color="#ced4da" fontcolor="#495057"',
    OP: 'shape=ellipse style=filled fillcolor="#e7f5ff" color="#74c0fc"',
    IO: 'shape=box style="rounded,dashed" color="#adb5bd" fontcolor="#495057"',
}


class GraphvizMissing(UserError):
    """`dot` is not installed; the message names the package."""


def quote(text: str) -> str:
    """A DOT double-quoted string (newlines become DOT's `\\n`)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def scene_to_dot(scene: Scene) -> str:
    """The whole model: groups as clusters marked ×N, submodules nested, adapted layers coloured."""
    colours = adapter_colours(scene)
    out = ["digraph surgeon {",
           (f'  graph [rankdir=TB compound=true fontname="{FONT}" fontsize=12 nodesep=0.25 ranksep=0.35 '
           f'label={quote(_caption(scene))} labelloc=t labeljust=l];'),
           f'  node [fontname="{FONT}" fontsize=10 margin="0.12,0.05"];',
           f'  edge [color="#868e96" arrowsize=0.6 fontname="{FONT}" fontsize=9];']
    by_group: dict[str | None, list[Node]] = {}
    for node in scene.nodes:
        by_group.setdefault(node.group, []).append(node)
    for node in by_group.get(None, []):
        out.append("  " + _node(node, colours))
    for group in scene.groups:
        members = by_group.get(group.id, [])
        adapted = sum(1 for n in members if n.adapted)
        label = group.label + (f"\n{adapted} adapted layer{'s' * (adapted != 1)} per block" if adapted else "")
        out.append(f"  subgraph {quote('cluster_' + group.id)} {{")
        out.append(f'    graph [label={quote(label)} style="rounded,filled" fillcolor="#f8f9fa" '
                   f'color="{"#495057" if group.count > 1 else "#ced4da"}" '
                   f'penwidth={2 if group.count > 1 else 1} tooltip={quote(", ".join(group.blocks))}];')
        tree: dict = {}
        for node in members:
            level = tree
            for part in node.cluster.split(".") if node.cluster else ():
                level = level.setdefault(part, {})
            level.setdefault(None, []).append(node)
        _clusters(out, tree, f"cluster_{group.id}_", "", "    ", colours)
        out.append("  }")
    for src, dst in scene.edges:
        out.append(f"  {quote(src)} -> {quote(dst)};")
    for a, b in scene.chain:
        tail, head = by_group[a][-1].id, by_group[b][0].id
        out.append(f"  {quote(tail)} -> {quote(head)} [ltail={quote('cluster_' + a)} "
                   f'lhead={quote("cluster_" + b)} color="#495057" penwidth=2 label=" next layer"];')
    out.append("}")
    return "\n".join(out) + "\n"


def _clusters(out: list[str], level: dict, full: str, prefix: str, indent: str, colours) -> None:
    """Nested submodule clusters: a cluster for every module with boxes of its own; a module
    with none (a ModuleList such as T5's `layer`) only prefixes its children's labels."""
    out.extend(indent + _node(node, colours) for node in level.get(None, ()))
    for name, sub in level.items():
        if name is None:
            continue
        if None not in sub:
            _clusters(out, sub, f"{full}{name}.", f"{prefix}{name}.", indent, colours)
            continue
        out.append(f"{indent}subgraph {quote(full + name)} {{")
        out.append(f'{indent}  graph [label={quote(prefix + name)} style="rounded,dashed" '
                   'color="#adb5bd" fillcolor="#ffffff"];')
        _clusters(out, sub, f"{full}{name}.", "", indent + "  ", colours)
        out.append(f"{indent}}}")


def _caption(scene: Scene) -> str:
    stats = scene.stats
    line = f"{scene.title}"
    if stats.get("sites"):
        line += (f" — {stats['layers']} adapted layers, {stats['params']:,} trainable parameters "
                 f"({100 * stats['params'] / max(stats['model_params'], 1):.2f}%)")
    return "\n".join((line, *scene.notes))


def adapter_colours(scene: Scene) -> dict[str, tuple[str, str]]:
    names: dict[str, None] = {}
    for node in scene.nodes:
        for site in node.sites:
            names.setdefault(site.adapter, None)
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _node(node: Node, colours: dict[str, tuple[str, str]]) -> str:
    lines = [node.label]
    if node.kind == MODULE:
        lines.append(node.type)
    if node.role and node.role != "other":
        lines.append("@" + node.role)
    for site in node.sites:
        lines.append(site.summary + (f" [{site.adapter}]" if len(colours) > 1 else ""))
        count = len(node.paths)
        lines.append(f"{site.params:,} params" + (f" ×{count}" if count > 1 else ""))
    style = _STYLE[node.kind]
    if node.sites:
        fill, border = colours[node.sites[0].adapter]
        style = f'shape=box style="rounded,filled,bold" fillcolor="{fill}" color="{border}" penwidth=2'
    return f"{quote(node.id)} [label={quote(chr(10).join(lines))} tooltip={quote(tooltip(node))} {style}];"


def tooltip(node: Node) -> str:
    """Every module path the node stands for, then its role's evidence and the rules."""
    lines = list(node.paths) or [node.type]
    if node.shape:
        lines.append(f"weight {node.shape}")
    if node.role:
        lines.append(f"@{node.role}: {node.evidence}")
    for site in node.sites:
        lines.append(f"{site.adapter}: {site.summary}, rule {site.rule} {site.rule_text}".rstrip())
    return "\n".join(lines)


def expansion_to_dot(expansion: Expansion) -> str:
    """One adapted layer's graph before and after merge, side by side, provenance in each node."""
    out = ["digraph surgeon_expand {",
           (f'  graph [rankdir=TB fontname="{FONT}" fontsize=12 nodesep=0.3 ranksep=0.3 labelloc=t '
           f'labeljust=l label={quote(_expansion_caption(expansion))}];'),
           f'  node [fontname="{FONT}" fontsize=10 shape=box style="rounded,filled"];',
           '  edge [color="#868e96" arrowsize=0.6];']
    for state, nodes, edges in (("before", expansion.before, expansion.edges_before),
                                ("after", expansion.after, expansion.edges_after)):
        title = "before merge (insert-adapters)" if state == "before" else "after merge (merge pass)"
        out.append(f"  subgraph {quote('cluster_' + state)} {{")
        out.append(f'    graph [label={quote(title)} style="rounded" color="#adb5bd"];')
        for name, op, label, tag in nodes:
            out.append(f"    {quote(state + ':' + name)} [{_fx_style(op, tag)} "
                       f"label={quote(label + _provenance(tag))} tooltip={quote(_tag_text(name, op, tag))}];")
        out.append("  }")
        out.extend(f"  {quote(state + ':' + a)} -> {quote(state + ':' + b)};" for a, b in edges)
    out.append("}")
    return "\n".join(out) + "\n"


def _expansion_caption(expansion: Expansion) -> str:
    others = len(expansion.stands_for) - 1
    head = f"{expansion.path}" + (f" (and {others} more like it)" if others > 0 else "")
    return f"{head}\nmerge: {expansion.folded}; unmerge subtracts ΔW and re-inserts the branch"


def _provenance(tag: dict) -> str:
    if not tag or tag.get("role") in ("input", None):
        return ""
    who = f"{tag['adapter']} · " if tag.get("adapter") else ""
    rule = f"\nrule {tag['rule']}" if tag.get("rule") else ""
    return f"\n{who}{tag.get('role')}\n{tag.get('pass', '')}{rule}"


def _tag_text(name: str, op: str, tag: dict) -> str:
    return f"{name} ({op})\n" + "\n".join(f"{k}: {v}" for k, v in tag.items())


def _fx_style(op: str, tag: dict) -> str:
    role = tag.get("role")
    if role in ("branch", "result"):
        return f'fillcolor="{PALETTE[0][0]}" color="{PALETTE[0][1]}"' + (" penwidth=2" if role == "result" else "")
    if op in ("placeholder", "output"):
        return 'fillcolor="#ffffff" color="#adb5bd" style="rounded,dashed"'
    return 'fillcolor="#f1f3f5" color="#868e96"'


def require_dot(fmt: str) -> str:
    """The path of Graphviz's `dot`, or GraphvizMissing naming the package to install."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing(
            f"drawing .{fmt} needs Graphviz's `dot`, which is not installed: install the Debian "
            "package `graphviz` (apt-get install graphviz), or write .html or .dot, which need nothing")
    return exe


def render(dot_text: str, fmt: str) -> bytes:
    """Lay out `dot_text` with Graphviz: `fmt` is "svg" or "png"."""
    exe = require_dot(fmt)
    done = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=300,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dot failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout
