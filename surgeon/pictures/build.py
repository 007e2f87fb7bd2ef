"""Model (+ spec, + PEFT checkpoint, or an adapted model) -> `Scene`.

Where the sites come from: a spec is planned against the model (nothing is applied); a PEFT
checkpoint's `adapter_config.json` is decompiled into a spec and planned the same way (its
weights are never read); a model adapted already shows the sites its layers hold, merged ones
marked. Capture, roles and the plan all read the *base* view of the model, so an adapted model
draws the same dataflow as the plain one.

When capture fails the scene is the module tree, with the reason as a note: a picture of what
the model contains is still worth having, and the note tells the user what to pass
(`--input`) for the dataflow.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from surgeon.capture.graph import CaptureError, capture, repeated_blocks
from surgeon.errors import UserError
from surgeon.planning.site import Site
from surgeon.pictures.blocks import group_blocks, grouped_nodes
from surgeon.pictures.dataflow import Dataflow, Unit, module_dataflow
from surgeon.pictures.expand import expand_layer, expand_layers
from surgeon.pictures.scene import LAYER, MODULE, Scene, SiteView


class VizError(UserError):
    """A picture cannot be made as asked (bad adapter folder, unknown layer to expand, ...)."""


def build_scene(model: nn.Module, *, spec: Any = None, adapter: str | os.PathLike | None = None,
                example_inputs: Any = None, title: str | None = None, expansions: bool = True,
                expand: str | None = None) -> Scene:
    """The scene for `model` as `spec` / `adapter` would adapt it (see the module docstring)."""
    from surgeon.runtime.state import unwrap
    from surgeon.runtime.wrappers import base_view

    clock = _Clock()
    host = unwrap(model)
    base = base_view(host)
    sites, merged, source = _sites(host, base, spec, adapter, example_inputs)
    clock.lap("plan")
    views = {p: tuple(_view(s, p in merged.get(s.adapter, ()), source) for s in ss) for p, ss in sites.items()}
    notes: list[str] = []
    try:
        captured = capture(base, example_inputs)
    except CaptureError as error:
        captured = None
        notes.append(f"This is the module tree: the dataflow could not be captured. {error}")
    clock.lap("capture")
    if captured is not None:
        from surgeon.capture.infer import roles_of_capture

        flow, rep_of = module_dataflow(captured), dict(captured.stand_ins)
        roles = roles_of_capture(captured, base)
    else:
        flow, rep_of, roles = tree_dataflow(base), _siblings(base), {}
    clock.lap("dataflow")
    layout = group_blocks(base, rep_of, views)
    nodes, edges = grouped_nodes(flow, layout, views, roles)
    chain = tuple((a.id, b.id) for gs in layout.groups_of_stack.values() for a, b in itertools.pairwise(gs))
    expanded = ()
    if expansions and sites:
        expanded = expand_layers(base, sites)
        if expand is not None:  # the layer asked for comes first: `--expand` draws it
            path = _match_layer(expand, sites)
            expanded = (expand_layer(base.get_submodule(path), sites[path], (path,)), *expanded)
    elif expand is not None:
        raise VizError("--expand: nothing is adapted; give a spec or --adapter (or an adapted model)")
    clock.lap("expand")
    stats = {"sites": sum(len(s) for s in sites.values()), "layers": len(sites),
             "params": sum(v.params for vs in views.values() for v in vs),
             "model_params": sum(p.numel() for p in base.parameters()),
             "blocks": len(layout.group_of), "groups": len(layout.groups), "seconds": clock.laps}
    return Scene(title or type(base).__name__, "dataflow" if captured else "tree", nodes,
                 layout.groups, edges, chain, tuple(notes), expanded, stats)


def _sites(host: nn.Module, base: nn.Module, spec: Any, adapter: Any, example_inputs: Any
           ) -> tuple[dict[str, tuple[Site, ...]], dict[str, tuple[str, ...]], str]:
    """Sites by path, merged adapters by name -> paths, and the spec text for rule lines."""
    from surgeon.lang.spec import Spec
    from surgeon.planning.planner import plan
    from surgeon.runtime.wrappers import adapted_layers

    found: dict[str, list[Site]] = {}
    merged: dict[str, list[str]] = {}
    for path, layer in adapted_layers(host):
        for name, site in layer.sites.items():
            found.setdefault(path, []).append(site)
            if name in layer.merged_adapters:
                merged.setdefault(name, []).append(path)
    source = ""
    if spec is not None:
        if not isinstance(spec, Spec):
            from surgeon.lang.parser import load_spec

            spec = load_spec(spec)
        source = spec.source
        for site in plan(spec, base, example_inputs=example_inputs).sites:
            found.setdefault(site.path, []).append(site)
    if adapter is not None:
        for site in plan(_adapter_spec(adapter), base, example_inputs=example_inputs).sites:
            found.setdefault(site.path, []).append(site)
    return ({p: tuple(s) for p, s in found.items()}, {a: tuple(p) for a, p in merged.items()}, source)


def _adapter_spec(folder: str | os.PathLike):
    """The spec a PEFT checkpoint folder's adapter_config.json decompiles to."""
    from surgeon.lang.spec import Spec
    from surgeon.peft_format import files
    from surgeon.peft_format.config import spec_from_peft_config

    config_file = Path(folder) / files.CONFIG_NAME
    if not config_file.is_file():
        raise VizError(f"adapter '{folder}': no {files.CONFIG_NAME} in it (a PEFT checkpoint folder)")
    return Spec((spec_from_peft_config(json.loads(config_file.read_text())),))


def _view(site: Site, merged: bool, source: str) -> SiteView:
    return SiteView(site.adapter, site.method, site.r, site.alpha, site.params, site.rule,
                    _rule_line(site.rule, source), merged)


def _rule_line(location: str, source: str) -> str:
    """The spec line a `file:line:col` points at."""
    parts = location.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not source:
        return ""
    lines = source.splitlines()
    line = int(parts[1])
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


def _match_layer(text: str, sites: Mapping[str, tuple[Site, ...]]) -> str:
    """The adapted layer `--expand` names: a full path, or the first path ending in `.text`."""
    if text in sites:
        return text
    for path in sites:
        if path.endswith("." + text) or text == "":
            return path
    raise VizError(f"--expand '{text}': no adapted layer has that path or ends in it; adapted "
                   f"layers include {', '.join(list(sites)[:3])}")


def tree_dataflow(model: nn.Module) -> Dataflow:
    """The module tree as units and parent -> child edges (the fallback when capture fails)."""
    from surgeon.layer_kinds import kind_of

    units: dict[str, Unit] = {}
    edges = []
    for path, module in model.named_modules():
        if not path:
            continue
        kind = LAYER if kind_of(module) is not None else MODULE
        shape = "×".join(map(str, module.weight.shape)) if kind == LAYER else ""
        units[path] = Unit(path, path, kind, path, type(module).__name__, shape)
        parent = path.rpartition(".")[0]
        if parent in units:
            edges.append((parent, path))
    return Dataflow(units, tuple(edges))


def _siblings(model: nn.Module) -> dict[str, str]:
    return {sib: rep for rep, sibs in repeated_blocks(model).items() for sib in sibs}


class _Clock:
    """Seconds per stage, for `Scene.stats` (the issue asks for timings on large models)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now
