"""bench/harness.py's CPU peak memory (`peak_rss`) against allocations of known size.

The expected sizes are the tensors' own byte counts (arithmetic, not a previous measurement);
the tolerance covers the interpreter's own small allocations and the kernel's per-CPU RSS
counters. Skipped only where the kernel's high-water mark cannot be reset (the reason shown).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from tests.cli.runner import REPO

_spec = importlib.util.spec_from_file_location("bench_harness", REPO / "bench" / "harness.py")
harness = sys.modules.setdefault("bench_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)

MIB = 2**20
TOLERANCE_MIB = 8

pytestmark = pytest.mark.skipif(harness.rss_unavailable() is not None,
                                reason=str(harness.rss_unavailable()))


def touched(mib: int) -> torch.Tensor:
    """A float32 tensor of `mib` MiB with every page written (resident, not just reserved)."""
    return torch.ones(mib * MIB // 4)


def test_one_allocation_is_its_size():
    def fn():
        x = touched(200)
        return float(x[-1])  # freed on return: only the high-water mark still sees it

    assert abs(harness.peak_rss(fn) - 200) < TOLERANCE_MIB


def test_peak_not_total_of_sequential_allocations():
    def fn():
        x = touched(120)
        del x
        y = touched(120)
        return float(y[-1])

    assert abs(harness.peak_rss(fn) - 120) < TOLERANCE_MIB


def test_memory_freed_before_the_call_is_counted_again():
    """64 KiB tensors land in glibc's heap; with a small live tensor after each, the heap cannot
    shrink when they are freed, so they stay resident and a later call would reuse them unseen
    (reporting a few MiB instead of 150 if the harness skipped its malloc_trim)."""
    keep = []

    def fn():
        xs = []
        for _ in range(150 * 16):
            xs.append(torch.ones(2**14))
            keep.append(torch.ones(8))
        return len(xs)

    fn()
    first, second = harness.peak_rss(fn), harness.peak_rss(fn)
    # trimming frees whole pages only: of each freed 64 KiB chunk about one page stays resident
    # and is reused unseen, up to 150/16 MiB
    for mib in (first, second):
        assert 150 - 150 / 16 - 4 < mib < 150 + TOLERANCE_MIB, (first, second)


def test_a_call_that_allocates_nothing_is_near_zero():
    assert harness.peak_rss(lambda: None) < 2


def test_cpu_device_goes_through_peak_rss():
    assert abs(harness.peak_memory(lambda: touched(64).sum(), torch.device("cpu")) - 64) < TOLERANCE_MIB


def test_peak_memories_are_each_functions_own():
    fns = {"small": lambda: touched(40).sum(), "large": lambda: touched(120).sum()}
    peaks = harness.peak_memories(fns, torch.device("cpu"), repeats=3)
    assert abs(peaks["small"] - 40) < TOLERANCE_MIB and abs(peaks["large"] - 120) < TOLERANCE_MIB


def test_the_measured_call_keeps_the_callers_grad_mode_and_raises_its_errors():
    seen = []
    with torch.no_grad():
        harness.peak_rss(lambda: seen.append(torch.is_grad_enabled()))
    harness.peak_rss(lambda: seen.append(torch.is_grad_enabled()))
    assert seen == [False, True]
    with pytest.raises(ValueError, match="inside"):
        harness.peak_rss(lambda: (_ for _ in ()).throw(ValueError("inside")))
