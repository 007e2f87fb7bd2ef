"""The benchmarks' memory and apply-by-role measurements: what they report is checked against
arithmetic (a forward's peak holds at least its logits; a role selector adapts as many modules
as the model has layers times roles), never against a previous run. Timings are never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.cli.runner import REPO
from tests.cli.test_examples_and_bench import run


def bench_module(name: str):
    """bench/<name>.py as a module; the folder it puts on sys.path (for its siblings) is taken off."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = sys.modules.setdefault(f"bench_{name}", importlib.util.module_from_spec(spec))
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads /proc")
def test_forward_peak_holds_at_least_the_logits():
    """lora_overhead's prefill peak of base, surgeon and peft on a 2-layer llama: each forward
    returns float32 logits of rows x seq x vocab, so its extra peak is at least that."""
    bench = bench_module("lora_overhead")
    shape = bench.Shape(64, 2, (4, 256), (1, 1))
    base = bench.llama(shape, torch.device("cpu"))
    case = bench.CASES[0]
    models = {side: bench.adapt(side, base, case)[0] for side in bench.SIDES}
    ids = torch.zeros(shape.prefill, dtype=torch.long)
    with torch.no_grad():
        for m in (base, *models.values()):
            m(ids)  # warm: one-time buffers are not the forward's peak
    peaks = bench.forward_peaks(models, base, shape.prefill, torch.device("cpu"))
    logits_mib = 4 * 256 * base.config.vocab_size * 4 / 2**20
    assert set(peaks) == {"base", "surgeon", "peft"}
    for side, mib in peaks.items():
        assert logits_mib <= mib < 4 * logits_mib, (side, mib, logits_mib)


@pytest.mark.slow  # ~25 s: a subprocess importing transformers and peft, three role captures
def test_apply_roles_smoke_adapts_the_same_modules_as_names():
    proc = run("bench/apply_roles.py", "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    layers = report["layers"]
    adapted = {r["case"]: r["adapted"] for r in report["results"]}
    assert adapted == {"attn q,v": 2 * layers, "mlp": 3 * layers}, adapted
    for result in report["results"]:
        assert set(result["s"]) == {"surgeon_roles", "surgeon_names", "peft_names"}
    assert report["results"][0]["cold_s"] > 0
