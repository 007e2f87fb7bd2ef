"""Timing and memory helpers for benchmarks that compare surgeon with peft in one process.

Runs are interleaved (surgeon, peft, surgeon, peft, ...) so that a slow moment of a shared
machine hits both sides alike, and the median of the repeats is reported. Peak memory is the
CUDA allocator's on a GPU and the resident high-water mark (RSS) on CPU (`peak_memory`).
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


def clock(fn: Callable[[], object], device: torch.device, inner: int = 1,
          timer: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of `fn`, averaged over `inner` calls (`timer`: wall clock by default)."""
    sync(device)
    start = timer()
    for _ in range(inner):
        fn()
    sync(device)
    return (timer() - start) / inner


def cpu_timer(device: torch.device) -> Callable[[], float]:
    """This thread's CPU time where it measures the work (a CPU run with one torch thread: every
    kernel runs on the calling thread), so that a shared machine's preemption does not count;
    else the wall clock."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


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
                  timing: Timing, timer: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median over rounds of each function's time over `base`'s in the same round, minus 1 (its
    overhead), plus `min_s`: each one's fastest round in seconds per call. Pairing within a round
    cancels most of a shared machine's slow moments; the minimum is the cost with the fewest.
    The order rotates from round to round: running right after another model (which left its
    last weights in cache) moved a step by about 1%. `timer`: wall clock by default,
    `cpu_timer(device)` to leave preemption out."""
    for fn in fns.values():
        for _ in range(timing.warmup):
            fn()
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(timing.repeats):  # each round starts one later: every side runs in every slot
        for name in order[i % len(order):] + order[:i % len(order)]:
            rounds[name].append(clock(fns[name], device, timing.inner, timer))
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
    """Peak extra memory of one call of `fn` in MiB: the CUDA allocator's peak on a GPU, the
    process's resident high-water mark on CPU (`peak_rss`); None where it cannot be read."""
    if device.type != "cuda":
        return peak_rss(fn)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def peak_memories(fns: dict[str, Callable[[], object]], device: torch.device,
                  repeats: int = 5) -> dict[str, float | None]:
    """Median over `repeats` alternated calls of each function's `peak_memory` (MiB): a stray
    allocation elsewhere in the process (on CPU every thread's counts) moves one call's peak."""
    samples: dict[str, list[float | None]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(peak_memory(fn, device))
    return {name: None if None in s else statistics.median(s) for name, s in samples.items()}


STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def rss_unavailable() -> str | None:
    """Why `peak_rss` cannot measure in this process (None when it can): it needs Linux's
    resettable resident high-water mark (`echo 5 > /proc/self/clear_refs`, then `VmHWM`)."""
    if not STATUS.exists() or "VmHWM" not in STATUS.read_text():
        return "no /proc/self/status VmHWM (not Linux)"
    try:
        CLEAR_REFS.write_text("5")
    except OSError as err:
        return f"cannot reset the high-water mark ({CLEAR_REFS}: {err.strerror})"
    return None


def peak_rss(fn: Callable[[], object]) -> float | None:
    """Extra peak resident memory of one call of `fn` in MiB, or None (see `rss_unavailable`).

    CPU tensors have no allocator counter, so this reads the kernel's: memory glibc holds free
    is returned first (otherwise `fn` could reuse it unseen), the high-water mark is reset to the
    current RSS, and the result is `VmHWM` after the call minus `VmRSS` before it. During the
    call every allocation of 128 KiB or more gets its own mapping (`_tensors_mapped`), so the peak
    is what the call's tensors need, not where glibc's heap happened to place them (with glibc's
    history-dependent default one hidden-256 llama prefill read 20-51 MiB; now 19.6-20.8).
    It counts everything the process touches meanwhile (Python objects, other threads), so run
    nothing else; sizes are exact to a few hundred KiB (the kernel's per-CPU RSS counters)."""
    if rss_unavailable():
        return None
    gc.collect()
    with _tensors_mapped():
        CLEAR_REFS.write_text("5")
        before = _status_kib("VmRSS")
        _in_own_thread(fn)
        return (_status_kib("VmHWM") - before) / 1024


def _in_own_thread(fn: Callable[[], object]) -> None:
    """Call `fn` on a new thread (its grad mode carried over; the caller waits): glibc gives the
    thread its own arena, which held only earlier measured calls, so `fn` cannot reuse the free
    chunks the main heap keeps from the benchmark's other work (after a training step they
    added ~26 MiB to a 21 MiB llama prefill). Its errors are raised here."""
    grad, failure = torch.is_grad_enabled(), []

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad):
                fn()
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            failure.append(err)

    thread = threading.Thread(target=run, name="peak_rss")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    assert match, f"{field} missing from {STATUS}"
    return int(match.group(1))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_FROM, HEAP_BELOW = 128 * 1024, 32 * 2**20


@contextmanager
def _tensors_mapped():
    """glibc only (no-op elsewhere): free heap pages back to the kernel (`malloc_trim`), then
    allocations >= 128 KiB each in their own mapping (unmapped when freed) until the block
    ends; after it, glibc's adaptive threshold's ceiling (32 MiB) stands (timings of a llama
    prefill and train step did not move against glibc's default)."""
    libc = ctypes.CDLL(None)
    glibc = hasattr(libc, "gnu_get_libc_version")
    if glibc:
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, MAPPED_FROM)
    try:
        yield
    finally:
        if glibc:
            libc.mallopt(M_MMAP_THRESHOLD, HEAP_BELOW)
