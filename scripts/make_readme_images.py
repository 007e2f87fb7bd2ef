"""Regenerate the README's pictures: `python scripts/make_readme_images.py` (needs Graphviz).

docs/images/tiny_llama_qv.svg   tiny:llama with examples/lora_qv.peft (q/v LoRA)
docs/images/lora_merge.svg      one LoRA site's fx graph before and after merge, with provenance

Both come from `surgeon viz`, so the README shows what the tool draws today; rerun this after
changing surgeon/pictures and review the diff.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"


def main() -> int:
    from surgeon.cli.main import main as surgeon

    IMAGES.mkdir(parents=True, exist_ok=True)
    spec = str(ROOT / "examples" / "lora_qv.peft")
    runs = (["viz", spec, "--model", "tiny:llama", "--title", "tiny:llama + examples/lora_qv.peft",
             "-o", str(IMAGES / "tiny_llama_qv.svg")],
            ["viz", spec, "--model", "tiny:llama", "--expand", "q_proj",
             "-o", str(IMAGES / "lora_merge.svg")])
    for argv in runs:
        code = surgeon(argv)
        if code:
            return code
    for svg in IMAGES.glob("*.svg"):  # the spec's absolute path would differ per checkout
        svg.write_text(svg.read_text().replace(str(ROOT) + "/", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
