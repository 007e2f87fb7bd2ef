"""The MiniLM fine-tuning example (--quick) and the benchmark harness (--smoke) run end to end.

The example asserts its own oracle checks (PEFT reloads surgeon's checkpoint with the same
logits; the training loss goes down); the benchmark's numbers are never asserted, only that it
measures every case against peft and reports surgeon and peft computing the same function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.cli.runner import REPO


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_finetune_minilm_quick():
    proc = run("examples/finetune_minilm.py", "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "test accuracy before:" in out and "test accuracy after:" in out, out
    assert "peft.PeftModel.from_pretrained agrees" in out, out
    assert "12 sites" in out and "save (default): classifier" in out, out


def test_bench_smoke_reports_every_case():
    proc = run("bench/lora_overhead.py", "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    report = json.loads(line)
    assert set(report["results"]) == {"lora_qv", "lora_all_linear", "dora_all_linear", "dora_qv_h1024"}
    for case, metrics in report["results"].items():
        assert metrics["agree_max_abs"]["value"] < 1e-4, (case, metrics["agree_max_abs"])
        assert {"surgeon", "peft"} <= set(metrics["decode_overhead"]), case
    full = report["results"]["lora_qv"]
    for metric in ("apply_ms", "prefill_overhead", "merge_ms", "unmerge_ms", "roundtrip_max_abs",
                   "merged_decode_overhead", "train_step_ms"):
        assert {"surgeon", "peft"} <= set(full[metric]), metric
    assert "surgeon/peft" in proc.stdout


def test_mixed_batch_bench_smoke_agrees_with_peft():
    proc = run("bench/mixed_batch.py", "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["results"] and all(r["max_abs_diff"] < 1e-4 for r in report["results"]), report


def test_kernel_bench_smoke_times_references_against_peft():
    proc = run("bench/triton_kernels.py", "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {c.split()[0] for c in report["rows"]} == {"lora", "gathered", "dora"}
    assert all("reference" in times for times in report["rows"].values())


def test_methods_bench_smoke_agrees_with_peft():
    """Every method case of bench/methods.py computes peft's function (forward, one run)."""
    proc = run("bench/methods.py", "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["rows"]) >= 10
    for case, row in report["rows"].items():
        assert row["max_abs_diff"] < 1e-4, (case, row["max_abs_diff"])


def test_decode_floor_bench_smoke_times_every_part():
    """bench/decode_floor.py: every variant timed, the real row form agreeing with peft."""
    proc = run("bench/decode_floor.py", "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["overhead"]) == {"peft", "wrapper only", "base only", "shrink only",
                                       "expand only", "adapter"}
    assert report["max_abs_diff"] < 1e-4, report["max_abs_diff"]
