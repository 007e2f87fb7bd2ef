"""Timing and memory helpers for benchmarks that compare surgeon with peft in one process.

Runs are interleaved (surgeon, peft, surgeon, peft, ...) so that a slow moment of a shared
machine hits both sides alike, and the median of the repeats is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """How many repeats to take and how many calls each repeat averages."""

    repeats: int = 7
    inner: int = 5
    warmup: int = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Seconds per call of `fn`, averaged over `inner` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - start) / inner


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device,
                timing: Timing) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternation."""
    for fn in fns.values():
        for _ in range(timing.warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(timing.repeats):
        for name, fn in fns.items():
            samples[name].append(clock(fn, device, timing.inner))
    return {name: statistics.median(s) for name, s in samples.items()}


def paired_ratios(fns: dict[str, Callable[[], object]], base: str, device: torch.device,
                  timing: Timing) -> dict[str, float]:
    """Median over rounds of each function's time over `base`'s in the same round, minus 1 (its
    overhead), plus `min_s`: each one's fastest round in seconds per call. Pairing within a round
    cancels most of a shared machine's slow moments; the minimum is the cost with the fewest."""
    for fn in fns.values():
        for _ in range(timing.warmup):
            fn()
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(timing.repeats):
        for name, fn in fns.items():
            rounds[name].append(clock(fn, device, timing.inner))
    out = {name: statistics.median(t / b - 1 for t, b in zip(ts, rounds[base], strict=True))
           for name, ts in rounds.items() if name != base}
    return out | {"min_s": {name: min(ts) for name, ts in rounds.items()}}


def once_each(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of values returned by functions that time themselves (setup excluded), alternated."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(fn())
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak extra memory of one call of `fn` in MiB (CUDA only; CPU has no allocator counter)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
