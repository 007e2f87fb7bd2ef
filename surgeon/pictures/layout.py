"""A small layered layout (Sugiyama-style) for the HTML view, which must work without Graphviz.

The graphs it lays out are small: the inside of one block (a few dozen nodes) or one adapted
layer. Layers are longest-path ranks, so data flows downwards; within a rank nodes are ordered
by the mean position of their predecessors (a few barycentre sweeps), which untangles the
usual q/k/v fan-out and the MLP's two branches well enough to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

CHAR_W, LINE_H, PAD_X, PAD_Y, GAP_X, GAP_Y, MARGIN = 6.6, 13.0, 10.0, 6.0, 18.0, 34.0, 12.0


@dataclass(frozen=True, slots=True)
class Box:
    x: float  # left
    y: float  # top
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2


def box_size(label: str) -> tuple[float, float]:
    lines = label.split("\n")
    return max(len(line) for line in lines) * CHAR_W + 2 * PAD_X, len(lines) * LINE_H + 2 * PAD_Y


def layered(labels: dict[str, str], edges: list[tuple[str, str]]) -> tuple[dict[str, Box], float, float]:
    """Boxes for every node id in `labels`, and the drawing's width and height."""
    graph = nx.DiGraph()
    graph.add_nodes_from(labels)
    graph.add_edges_from((a, b) for a, b in edges if a in labels and b in labels and a != b)
    break_cycles(graph)
    rank: dict[str, int] = {}
    for node in nx.topological_sort(graph):
        rank[node] = max((rank[p] + 1 for p in graph.predecessors(node)), default=0)
    rows: list[list[str]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for node in labels:
        rows[rank[node]].append(node)
    _order(rows, graph)
    sizes = {n: box_size(labels[n]) for n in labels}
    widths = [sum(sizes[n][0] for n in row) + GAP_X * (len(row) - 1) for row in rows]
    total_w = max(widths, default=0) + 2 * MARGIN
    boxes: dict[str, Box] = {}
    y = MARGIN
    for row, width in zip(rows, widths):
        x = (total_w - width) / 2
        height = max((sizes[n][1] for n in row), default=0)
        for node in row:
            w, h = sizes[node]
            boxes[node] = Box(x, y + (height - h) / 2, w, h)
            x += w + GAP_X
        y += height + GAP_Y
    return boxes, total_w, y - GAP_Y + MARGIN


def break_cycles(graph: nx.DiGraph) -> None:
    """Drop the closing edge of each cycle, in place. Module-level dataflow can loop where a
    grouped block feeds a module that feeds the same group again (encoder -> decoder)."""
    while not nx.is_directed_acyclic_graph(graph):
        graph.remove_edge(*nx.find_cycle(graph)[-1][:2])


def _order(rows: list[list[str]], graph: nx.DiGraph) -> None:
    """Barycentre sweeps, down then up, in place."""
    for _ in range(3):
        for i in range(1, len(rows)):
            _sort_by(rows[i], rows[i - 1], graph.predecessors)
        for i in range(len(rows) - 2, -1, -1):
            _sort_by(rows[i], rows[i + 1], graph.successors)


def _sort_by(row: list[str], other: list[str], neighbours) -> None:
    where = {n: i for i, n in enumerate(other)}
    keys = {}
    for i, node in enumerate(row):
        near = [where[m] for m in neighbours(node) if m in where]
        keys[node] = sum(near) / len(near) if near else i
    row.sort(key=lambda n: keys[n])
