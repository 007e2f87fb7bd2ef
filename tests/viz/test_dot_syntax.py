"""The DOT text parses without Graphviz: a small reader for DOT's grammar (statements, quoted
IDs with escapes, attribute lists, nested subgraphs) builds a networkx graph, which must hold
every scene node and edge. It runs where `dot` is not installed, unlike test_render's check."""

import re

import networkx as nx
import pytest

_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<id>[A-Za-z_][\w.]*|-?\d+(?:\.\d+)?)'
                    r"|(?P<op>->|[{}\[\];=,]))", re.DOTALL)


def tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        found = _TOKEN.match(text, pos)
        if found is None:
            raise SyntaxError(f"bad DOT at {pos}: {text[pos:pos + 30]!r}")
        out.append(found.group(found.lastgroup))
        pos = found.end()
    return out


def parse(text: str) -> nx.DiGraph:
    """DOT -> DiGraph (node and edge attributes kept as strings). Raises SyntaxError."""
    toks, graph, depth = tokens(text), nx.DiGraph(), 0
    i = 0

    def attrs() -> dict[str, str]:
        nonlocal i
        found = {}
        if i < len(toks) and toks[i] == "[":
            i += 1
            while toks[i] != "]":
                key, eq, value = toks[i:i + 3]
                if eq != "=":
                    raise SyntaxError(f"expected key=value, got {toks[i:i + 3]}")
                found[key] = value.strip('"')
                i += 3 + (toks[i + 3] in (",", ";"))
            i += 1
        return found

    if toks[:3] != ["digraph", toks[1], "{"]:
        raise SyntaxError("not a digraph")
    i = 3
    depth = 1
    while i < len(toks):
        tok = toks[i]
        if tok == "}":
            depth, i = depth - 1, i + 1
        elif tok == "subgraph":
            if toks[i + 2] != "{":
                raise SyntaxError("subgraph without a body")
            depth, i = depth + 1, i + 3
        elif tok in ("graph", "node", "edge"):
            i += 1
            attrs()
        elif i + 1 < len(toks) and toks[i + 1] == "->":
            a, b = toks[i].strip('"'), toks[i + 2].strip('"')
            i += 3
            graph.add_edge(a, b, **attrs())
        else:
            i += 1
            graph.add_node(tok.strip('"'), **attrs())
        if i < len(toks) and toks[i] == ";":
            i += 1
    if depth != 0:
        raise SyntaxError(f"unbalanced braces ({depth})")
    return graph


def test_reader_rejects_broken_dot():
    for broken in ('digraph g { "a" -> "b" ', 'digraph g { "a" [label] }', 'digraph g { "a" [x="unterminated] }'):
        with pytest.raises(SyntaxError):
            parse(broken)


def test_model_dot_parses_into_the_scene_graph(picture):
    graph = parse(picture.dot())
    scene = picture.scene
    assert set(graph.nodes) == {n.id for n in scene.nodes}  # every edge endpoint was declared
    assert set(scene.edges) <= set(graph.edges)
    adapted = {n.id for n in scene.nodes if n.adapted}
    assert adapted and all("LoRA r=" in graph.nodes[n]["label"] for n in adapted)
    assert all(p in graph.nodes[n.id]["tooltip"] for n in scene.nodes if n.adapted for p in n.paths)
    assert nx.is_directed_acyclic_graph(graph)


def test_expansion_dot_parses_and_keeps_provenance(llama):
    import surgeon
    from tests.viz.conftest import SPEC

    graph = parse(surgeon.viz(llama, SPEC, expand="q_proj").dot())
    branch = [n for n, data in graph.nodes(data=True) if n.startswith("before:") and "branch" in data["label"]]
    assert branch and all("insert-adapters" in graph.nodes[n]["label"] for n in branch)
    assert not any("branch" in d["label"] for n, d in graph.nodes(data=True) if n.startswith("after:"))
