"""bench/fusion.py --smoke runs end to end: both surgeon scopes compute peft's function (its
timings are never asserted)."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_examples_and_bench import run


@pytest.mark.slow  # ~25 s: a subprocess importing transformers and peft, one capture
def test_fusion_bench_smoke_agrees_with_peft():
    proc = run("bench/fusion.py", "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bench"] == "fusion" and report["results"]
    for result in report["results"]:
        for phase in ("decode", "prefill"):
            diffs = result[phase]["max_abs_diff_vs_peft"]
            assert set(diffs) == {"site", "compiled"} and max(diffs.values()) < 1e-4, (phase, diffs)
