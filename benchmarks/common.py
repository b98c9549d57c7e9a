"""Measuring helpers shared by the benchmark scripts: wall time, peak memory, the JSON last line."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_peak_bytes() -> int:
    """Peak resident set size of this process since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_rss_peak() -> None:
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[object, int]:
    """Run fn once; return its result and the peak memory it reached: CUDA allocator peak on a GPU,
    peak process RSS on the CPU (an upper bound that includes the Python heap)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device)
    _reset_rss_peak()
    out = fn()
    return out, _rss_peak_bytes()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each function, run alternately so drift in machine load hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    return {name: statistics.median(s) for name, s in samples.items()}


def emit(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True))
