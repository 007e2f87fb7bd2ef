"""The files: SVG is well-formed XML naming every adapted module, DOT parses (Graphviz's own
parser, and the edges as networkx sees them), the command line writes each format."""

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

import surgeon
from tests.viz.conftest import SPEC

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's `dot` is not installed (Debian package graphviz)")


@needs_dot
def test_svg_is_xml_and_names_every_adapted_module(llama, picture):
    root = ET.fromstring(picture.svg())
    text = ET.tostring(root, encoding="unicode")
    for path in surgeon.plan(SPEC, llama).paths():
        assert path in text, path


@needs_dot
def test_dot_parses_with_graphviz_into_the_scene_graph(picture):
    done = subprocess.run(["dot", "-Tjson0"], input=picture.dot().encode(), capture_output=True, check=True)
    parsed = json.loads(done.stdout)
    names = {o["_gvid"]: o["name"] for o in parsed["objects"] if "nodes" not in o}
    graph = nx.DiGraph((names[e["tail"]], names[e["head"]]) for e in parsed["edges"])
    graph.add_nodes_from(names.values())
    scene = picture.scene
    assert set(graph.nodes) == {n.id for n in scene.nodes}
    assert set(scene.edges) <= set(graph.edges)
    assert ("::input:input_ids", "model.embed_tokens") in graph.edges
    assert nx.is_directed_acyclic_graph(graph)


@needs_dot
def test_expanded_layer_draws_before_and_after_merge(llama):
    svg = surgeon.viz(llama, SPEC, expand="v_proj").svg()
    root = ET.fromstring(svg)
    text = ET.tostring(root, encoding="unicode")
    assert "before merge" in text and "after merge" in text and "insert-adapters" in text


def test_missing_graphviz_names_the_debian_package(picture, monkeypatch):
    from surgeon.pictures.dot import GraphvizMissing

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GraphvizMissing, match="Debian package `graphviz`"):
        picture.svg()
    assert picture.dot().startswith("digraph")  # .dot and .html need nothing installed


def test_cli_writes_html_and_dot_and_rejects_other_suffixes(tmp_path, capsys):
    from surgeon.cli.main import main

    spec = tmp_path / "qv.peft"
    spec.write_text(SPEC)
    assert main([ "viz", str(spec), "--model", "tiny:llama", "-o", str(tmp_path / "m.html")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "m.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["viz", "--model", "tiny:llama", "-o", str(tmp_path / "m.dot")]) == 0
    assert "@attn.q" in (tmp_path / "m.dot").read_text()  # no spec: roles only
    assert main(["viz", "--model", "tiny:llama", "-o", str(tmp_path / "m.jpg")]) == 2
    assert "must end in" in capsys.readouterr().err


def test_cli_draws_a_peft_checkpoint(tmp_path):
    from surgeon.cli.main import main

    out = tmp_path / "adapter"
    assert main(["apply", _spec(tmp_path), "--model", "tiny:llama", "-o", str(out)]) == 0
    assert main(["viz", "--model", "tiny:llama", "--adapter", str(out), "-o", str(tmp_path / "a.dot")]) == 0
    dot = (tmp_path / "a.dot").read_text()
    assert dot.count("fillcolor=\"#ffe8cc\"") == 2  # q and v, drawn once for both identical blocks (×2)
    assert main(["viz", "--model", "tiny:llama", "--adapter", str(tmp_path), "-o", str(tmp_path / "b.dot")]) == 2


def _spec(tmp_path) -> str:
    spec = tmp_path / "plain.peft"
    spec.write_text("adapter default = lora(r=8, alpha=16) { target @attn.q, @attn.v }\n")
    return str(spec)


def test_cli_draws_a_plain_module_from_a_factory(tmp_path, capsys):
    from surgeon.cli.main import main

    spec = tmp_path / "fc.peft"
    spec.write_text("adapter default = lora(r=2) { target fc1 in layers[1] }\n")
    out = tmp_path / "net.dot"
    assert main(["viz", str(spec), "--model", "py:tests/cli/factories.py:tiny_net", "--input", "2x16",
                 "-o", str(out)]) == 0
    dot = out.read_text()
    assert 'label="layers.0"' in dot and 'label="layers.1\\n1 adapted layer per block"' in dot  # apart
    assert '"g0/fc1"' in dot and '"g1/fc1"' in dot and "layers.1.fc1" in dot
    assert capsys.readouterr().err == ""  # captured: no module-tree note
