"""`surgeon.viz(model, ...)`: a picture of a (planned or adapted) model, in every format.

A `Picture` holds the scene and renders on demand: `.dot` and `.html` need only Python,
`.svg` and `.png` need Graphviz. In Jupyter it shows itself as the interactive HTML view.
"""

from __future__ import annotations

import html as html_lib
import os
from pathlib import Path
from typing import Any

from surgeon.pictures.scene import Scene

FORMATS = ("svg", "html", "dot", "png")


class Picture:
    """A model drawn by `surgeon.viz`; `save(path)` picks the format from the suffix."""

    def __init__(self, scene: Scene, expand: str | None = None) -> None:
        self.scene = scene
        self.expand = expand  # with --expand, svg/png/dot draw that layer's inside

    def dot(self) -> str:
        """Graphviz DOT text: the model, or with `expand` the adapted layer before/after merge."""
        from surgeon.pictures.dot import expansion_to_dot, scene_to_dot

        if self.expand is not None:
            from surgeon.pictures.build import VizError

            if not self.scene.expansions:
                raise VizError("--expand: the model has no adapted layer to expand (give a spec or --adapter)")
            return expansion_to_dot(self.scene.expansions[0])
        return scene_to_dot(self.scene)

    def svg(self) -> str:
        from surgeon.pictures.dot import render

        return render(self.dot(), "svg").decode()

    def png(self) -> bytes:
        from surgeon.pictures.dot import render

        return render(self.dot(), "png")

    def html(self) -> str:
        """One self-contained page (no network): collapsible blocks, click for details."""
        from surgeon.pictures.page import scene_to_html

        return scene_to_html(self.scene, open_layer=self.expand)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the picture; the format is the suffix of `path` (.svg, .html, .dot or .png)."""
        from surgeon.pictures.build import VizError

        target = Path(path)
        fmt = target.suffix.lower().lstrip(".")
        if fmt not in FORMATS:
            raise VizError(f"output '{path}': the name must end in .svg, .html, .dot or .png")
        data: Any = {"svg": self.svg, "html": self.html, "dot": self.dot, "png": self.png}[fmt]()
        if isinstance(data, str):
            target.write_text(data, encoding="utf-8")
        else:
            target.write_bytes(data)
        return target

    def _repr_html_(self) -> str:
        # An iframe keeps the page's styles and script apart from the notebook's own.
        return (f'<iframe srcdoc="{html_lib.escape(self.html(), quote=True)}" '
                'style="width:100%;height:720px;border:1px solid #dee2e6" sandbox="allow-scripts"></iframe>')

    def __repr__(self) -> str:
        s = self.scene.stats
        return (f"<surgeon.viz.Picture {self.scene.title}: {len(self.scene.nodes)} nodes, "
                f"{len(self.scene.groups)} groups, {s.get('layers', 0)} adapted layers>")


def viz(model: Any, spec: Any = None, adapter: str | os.PathLike | None = None, *,
        example_inputs: Any = None, expand: str | None = None, title: str | None = None) -> Picture:
    """Draw `model`, as `spec` or a PEFT checkpoint folder `adapter` would adapt it.

    Args:
        model: any nn.Module; a model adapted by surgeon shows the adapters it holds.
        spec: a Spec, `.peft` text or path (planned, never applied).
        adapter: a PEFT checkpoint folder; only its adapter_config.json is read.
        example_inputs: inputs for capture, for models that are not transformers models.
        expand: an adapted layer (full path or a suffix such as "q_proj"; "" for the first)
            whose inside `svg()`/`png()`/`dot()` draw before and after merge.
        title: the caption; the model's class name by default.
    Returns:
        A Picture: `.save("model.svg")`, `.html()`, `.dot()`; it displays inline in Jupyter.
    Example:
        >>> surgeon.viz(model, "examples/lora_qv.peft").save("model.html")
    """
    from surgeon.pictures.build import build_scene

    scene = build_scene(model, spec=spec, adapter=adapter, example_inputs=example_inputs,
                        title=title, expand=expand)
    return Picture(scene, expand)
