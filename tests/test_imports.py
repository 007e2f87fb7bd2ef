"""surgeon's modules import each other without circles, and the language stays torch-free.

The import graph is read from the source with `ast`: every `import` anywhere in a file (module
level, inside functions, under `if TYPE_CHECKING:`) is an edge, because a circle that only shows
at call time or to the type checker is still a circle a newcomer must untangle. Files map to the
modules they ship as: `surgeon/a/b.py` -> `surgeon.a.b`, `passes/x.py` -> `surgeon.passes.x`,
`grammar/` -> `surgeon.grammar`; a package's `__init__.py` is its own node, and
`from surgeon.pkg import name` points at the submodule `surgeon.pkg.name` when there is one.
Imports by string (`importlib.import_module` in the method registry and in `surgeon/__init__`'s
lazy names) are not edges: they run only on demand, after both modules finished loading.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it ships as (pyproject's package-dir)
SOURCES = {"surgeon": "surgeon", "passes": "surgeon.passes", "grammar": "surgeon.grammar"}


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py file that ships in surgeon."""
    found = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies inside (`surgeon.x.f` -> `surgeon.x`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every surgeon module `module` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..y import z`
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # `from surgeon.pkg import sub` imports the submodule when there is one
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                     for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules) if name.startswith("surgeon") else None
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> nx.DiGraph:
    modules = module_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        graph.add_edges_from((module, target) for target in imports_of(module, path, modules))
    return graph


def test_the_graph_reader_sees_every_kind_of_import():
    graph = import_graph()
    assert graph.has_edge("surgeon.cli.commands", "surgeon.cli.output")  # module level
    assert graph.has_edge("surgeon.cli.main", "surgeon.cli.commands")  # inside a function
    assert graph.has_edge("surgeon.planning.layers", "surgeon.layer_kinds")
    assert "surgeon.passes" in graph and "surgeon.grammar" in graph


def test_no_import_cycles():
    graph = import_graph()
    cycles = list(itertools.islice(nx.simple_cycles(graph), 8))
    shown = "\n".join("  " + " -> ".join([*cycle, cycle[0]]) for cycle in cycles)
    assert not cycles, f"import cycles among surgeon's modules (first {len(cycles)}):\n{shown}"


def test_layer_kinds_depends_on_errors_only():
    """Every stage reads layer kinds, so they must not pull any stage in."""
    assert set(import_graph().successors("surgeon.layer_kinds")) <= {"surgeon.errors"}


def test_the_language_and_method_configs_do_not_import_torch():
    """`surgeon check` parses and checks specs against every method's config without torch."""
    code = (
        "import sys\n"
        "import surgeon, surgeon.errors, surgeon.layer_kinds, surgeon.lang, surgeon.methods as m\n"
        "import surgeon.cli.main, surgeon.cli.commands\n"
        "surgeon.load_spec('adapter default = lora(r=4) { target q_proj in layers[0:2] }')\n"
        "for name in m.names():\n"
        "    m.config_of(name)\n"
        "heavy = sorted(n for n in ('torch', 'transformers', 'peft') if n in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
