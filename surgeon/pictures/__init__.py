"""Pictures of adapted models: `surgeon.viz(model, spec)` and `surgeon viz`.

scene.py     what a picture shows (plain data; every renderer reads it)
dataflow.py  the captured graph at module grain;  blocks.py  repeated blocks grouped `×N`
expand.py    an adapted layer's fx graph before and after merge, with provenance
build.py     model + spec / checkpoint / adapted model -> Scene (module tree when capture fails)
dot.py       Scene -> DOT, and `dot` -> SVG/PNG;  page.py  Scene -> one self-contained HTML page
picture.py   `viz()` and `Picture` (save, _repr_html_ for Jupyter)

Named `pictures`, not `viz`, because `surgeon.viz` is the public function (a subpackage of that
name would replace it on `surgeon` once imported).
"""

from __future__ import annotations

from surgeon.pictures.picture import Picture, viz

__all__ = ["Picture", "viz"]

