"""The README's language tour is a valid spec (the front door must not drift from the parser)."""

import re
from pathlib import Path

from surgeon.lang import load_spec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_language_tour_parses():
    block = re.search(r"```\n(# llama\.peft.*?)```", README.read_text(), re.S).group(1)
    spec = load_spec(block)
    assert [a.name for a in spec.adapters] == ["default", "kv"]
