"""Golden files: tests/golden/spec/<case>.peft -> <case>.err (rendered diagnostics, exact text)
or <case>.spec.txt (canonical printer output). Regenerate with `pytest tests/lang --update-goldens`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from surgeon.lang import SpecError, parse, print_spec

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "spec"
CASES = sorted(p.stem for p in GOLDEN.glob("*.peft"))


def _outcome(case: str) -> tuple[str, str]:
    """(suffix, text) of what the case produces: its diagnostics or its canonical print."""
    source = (GOLDEN / f"{case}.peft").read_text(encoding="utf-8")
    try:
        spec = parse(source, file=f"{case}.peft")
    except SpecError as e:
        return ".err", str(e) + "\n"
    printed = print_spec(spec)
    assert parse(printed, file="printed.peft") == spec, "the canonical print must parse back to the spec"
    return ".spec.txt", printed


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, update_goldens: bool):
    suffix, text = _outcome(case)
    expected = GOLDEN / f"{case}{suffix}"
    other = GOLDEN / f"{case}{'.spec.txt' if suffix == '.err' else '.err'}"
    if update_goldens:
        expected.write_text(text, encoding="utf-8")
        other.unlink(missing_ok=True)
        return
    assert not other.exists(), f"{case} now gives {suffix}, but {other.name} exists (run --update-goldens)"
    assert expected.exists(), f"no golden {expected.name}; run pytest tests/lang --update-goldens"
    assert text == expected.read_text(encoding="utf-8")


def test_every_golden_file_has_a_case():
    stray = [p.name for p in GOLDEN.iterdir() if p.suffix != ".peft" and p.name.split(".")[0] not in CASES]
    assert not stray
