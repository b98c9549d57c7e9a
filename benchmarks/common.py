"""Measuring helpers shared by the benchmark scripts: wall time, peak memory, the JSON last line."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def allocator_returns_memory() -> None:
    """CPU: make freed tensors leave the RSS (glibc). A fixed mmap threshold turns off glibc's adaptive one,
    which otherwise lets big blocks land on the heap, where they stay after `free`, so a second run would
    reuse the first run's pages and look smaller than it is. Call it before the big allocations."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks of 1 MiB and up get their own mapping
    libc.malloc_trim(0)


def rss_now() -> int:
    """Current resident set size in bytes (second field of /proc/self/statm, in pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Run `fn` once: seconds (CUDA-synced), peak memory (GPU allocator, or process RSS on the CPU), the peak
    above what was held before, and the output as float32 on the CPU (so it holds no GPU memory after);
    on a GPU also the allocator's peak reserved bytes."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    else:
        allocator_returns_memory()
        before = rss_now()
    start = time.perf_counter()
    out, peak = peak_memory(fn, device)
    seconds = time.perf_counter() - start
    row = {"seconds": seconds, "peak": peak, "above_start": max(peak - before, 0), "video": out.float().cpu()}
    if device.type == "cuda":
        row["reserved"] = torch.cuda.max_memory_reserved(device)
    return row


def random_vae(seed: int = 0, cfg: Any = None) -> Any:
    """Our `WanVAE` (full size, or the `wan.configs.VAEConfig` `cfg`) with random weights, float32, on the
    CPU; gammas and the attention output projections get non-trivial values (their init is trivial)."""
    from wan.vae import WanVAE

    torch.manual_seed(seed)
    ours = WanVAE() if cfg is None else WanVAE.from_config(cfg)
    ours = ours.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=g))
            elif name.endswith("proj.weight"):
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
    return ours


def vae_twins(seed: int = 0, cfg: Any = None) -> tuple[Any, Any]:
    """`random_vae(seed, cfg)` and diffusers' `AutoencoderKLWan` of the same architecture with the same
    weights, float32, on the CPU."""
    from diffusers import AutoencoderKLWan

    from wan.vae import diffusers_vae_config, vae_state_dict_to_diffusers

    ours = random_vae(seed, cfg)
    ref = AutoencoderKLWan() if cfg is None else AutoencoderKLWan(**diffusers_vae_config(cfg))
    ref = ref.eval().requires_grad_(False)
    ref.load_state_dict(vae_state_dict_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref
