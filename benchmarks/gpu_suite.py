"""Every GPU figure of issue 15 in one command: one JSON file, a short table on stdout.

    python3 benchmarks/gpu_suite.py                                   # one H200: about 7 minutes
    python3 benchmarks/gpu_suite.py --out run/h200.json --budget-s 420
    python3 benchmarks/gpu_suite.py --sections env,peak,forward_1.3b  # some sections only
    python3 benchmarks/gpu_suite.py --quick --device cpu              # tiny shapes: what the CPU test runs

Runs from the source tree (no install). On a machine without diffusers (or ftfy, which our text encoder
needs) carry them as wheels: `make gpu-wheels`, then see README's "Performance on a GPU".

Sections, in the order they run (the acceptance figures first; `--sections` picks some):

- env: GPU, driver, torch, CUDA, cuDNN; which SDPA backends run (a small bf16 call each); the attention
  kernels this process has and the one our code picks for the 1.3B / 14B head width in bf16, fp16, fp32.
- peak: the dense bf16 matrix-product rate measured here (8192^3 products, random data): the
  denominator of every "fraction of peak" below (the datasheet figure is recorded beside it).
- attention: each attention kernel at the t2v-1.3B 480P shape (q, k, v [2, 32760, 12, 128] bf16): seconds
  and TFLOP/s, our kernels by name and SDPA's backends one at a time.
- forward_1.3b: t2v-1.3B at 480P (30 blocks, latents [2, 16, 21, 60, 104], batch 2 as with CFG), eager, ours
  and diffusers' `WanTransformer3DModel` on the same random weights: seconds, TFLOP/s by FLOP count
  (`gpu_step.forward_flops`: every matrix product and both attention products, 2 per multiply-add), the
  fraction of the measured peak, peak memory, max |ours - diffusers|.
- vae: VAE decode of 81 frames at 480P (latents [1, 16, 21, 60, 104]), ours and diffusers'
  `AutoencoderKLWan`, float32, same weights: seconds, peak memory, max difference.
- generation: a whole t2v-1.3B 832x480x81 50-step video, ours against diffusers' `WanPipeline` on the same
  random weights and noise (`gpu_generate.main` with `--narrow-text-encoder`: a 2-layer umT5 of the real
  width, shared by both, said so in the JSON): seconds, peak memory, speed-up, max pixel difference.
- offload: the same video with `offload_model` and `t5_cpu` (`--offload-steps` steps: the peak is reached in
  the first step and the decode): peak memory against the official 8.19 GB.
- numerics: t2v-1.3B width, 2 blocks, the 480P grid, batch 1: bf16 on the device against fp32 on the
  device (TF32 off), ours and diffusers' on the same weights; ours must be at least as close to fp32.
- forward_14b: one t2v-14B 720P forward (40 blocks, latents [1, 16, 21, 90, 160], 75,600 tokens), bf16.
- cp_model: `context_parallel.py`'s scaling model recomputed from that forward time (and a timed 14B block
  for the attention share): predicted seconds per video on 8 GPUs against the official 287.9 s.
- ring: ring attention's block kernels (`wan/distributed/ring.py`, called directly, one process) merged by
  log-sum-exp over 4 key blocks against exact attention over all keys: bf16 and fp32, head dims 128 and 20
  (padded to 24 for the fused kernels), without padding, with padding known on the host (`num_keys`) and
  with an arbitrary key mask (the aligned-bias path); no host sync (CUDA's sync debug mode set to error).
- gpu_tests: what `pytest -m gpu` checks: seeded noise independent of the device, offload_model/t5_cpu
  giving the same video, no host sync in solver steps nor in the pipeline's sampling loop
  (`torch.cuda.set_sync_debug_mode("error")`), as many syncs for 8 steps as for 2, the VAE attention's
  720P peak memory.
- fast_modes: issue 16's fast modes (`fast_modes.py`) on t2v-1.3B at 832x480 with 21 frames (not 81, to fit
  about 90 s) and a narrow text encoder, one video each: 50 steps with CFG, each step cache at its default
  threshold, the 4-step recipe with a random LoRA standing in for a distilled one: DiT forwards (and the
  skipped ones), seconds per video, speed-up, max / mean pixel difference against the 50-step video.
- forward_1.3b_compiled: forward_1.3b with `torch.compile` (ours: `compile_blocks(fullgraph=True)`,
  inductor; diffusers: `compile_repeated_blocks()`), plus the compile time and max |compiled - eager|. Last,
  since its compile time is the one unknown.

Each section catches its own failure: its error and traceback go in the JSON and the suite goes on. A
section whose estimated time (on an H200) exceeds what is left of `--budget-s` is skipped, saying so, and a
timer stops a section that runs past the budget by more than a grace period. Sections that need diffusers
run ours alone and record "skipped: diffusers not importable" for diffusers' half (the generation
comparison is skipped whole). On the CPU, what needs CUDA says so instead of running; `--quick` runs
every section on tiny configurations (tiny presets, 2 steps) so that the code never rots: its figures are
not GPU figures. The JSON is rewritten after every section, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import measure, peak_memory, timed
from gpu_step import build_random, forward_flops, peak_tflops_for

from wan.configs import DiTConfig, get_preset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "run" / "gpu_suite.json"
DEFAULT_BUDGET_S = 450.0  # 7.5 minutes of sections; with start-up and the grace period, within 8
GRACE_S = 20.0  # a section still running this long after the budget is stopped
DIFFUSERS_MISSING = "skipped: diffusers not importable"
NEEDS_CUDA = "skipped: needs CUDA"

GRID_480P = (21, 60, 104)  # latent [T, H, W] of 832x480x81
GRID_720P = (21, 90, 160)  # latent [T, H, W] of 1280x720x81
QUICK_GRID = (2, 8, 12)  # tiny presets' stand-in
OFFLOAD_TARGET_BYTES = 8.19e9  # official t2v-1.3B with --offload_model True --t5_cpu
FORWARD_TARGET, FORWARD_GOAL = 0.50, 0.60  # t2v-1.3B 480P forward: fraction of the measured bf16 peak
SPEEDUP_TARGET = 1.3  # whole generation, ours against diffusers' WanPipeline
OFFICIAL_8GPU_SECONDS = 287.9
PROMPT = "A red fox trots through fresh snow in a birch forest at sunrise, soft light, slow camera pan"


class Skipped(Exception):
    """Raised by a section that cannot run here; its message is the recorded reason."""


class SuiteTimeout(BaseException):
    """Raised by the timer in a section that runs past the budget (a BaseException: no check swallows it)."""


@dataclasses.dataclass
class Suite:
    """What every section sees: the options, the device, and the results so far."""

    args: argparse.Namespace
    device: torch.device
    deadline: float  # time.monotonic() at which the budget runs out
    diffusers_skip: str | None  # None: diffusers imports; else the reason recorded for its halves
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    _peak: dict[str, Any] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    @property
    def dtype(self) -> torch.dtype:
        """The speed sections' dtype: bf16 on a GPU, float32 on the CPU (as `gpu_step.py`)."""
        return torch.bfloat16 if self.cuda else torch.float32

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.cuda else platform.processor() or "cpu"

    def ok(self, name: str) -> dict[str, Any] | None:
        """The result of section `name` when it ran without error, else None."""
        row = self.results.get(name)
        return row if row is not None and row.get("status") == "ok" else None

    def peak(self) -> dict[str, Any]:
        """The measured dense matrix-product rate (the `peak` section's, or measured now)."""
        if self._peak is None:
            self._peak = measure_matmul_peak(self.device, quick=self.quick)
        return self._peak

    def warmup_repeats(self) -> tuple[int, int]:
        return (1, 1) if self.quick else (1, self.args.repeats)


# ------------------------------------------------------------------------------------------------ helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max / mean absolute difference and the relative L2 error of `out` against `ref` (float64)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    diff = out - ref
    return {
        "max_abs": diff.abs().max().item(),
        "mean_abs": diff.abs().mean().item(),
        "rel_l2": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
    }


def _importable(module: str) -> str | None:
    """The module's version (or "yes") when it imports, else None."""
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "yes"))


def time_calls(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """`warmup` calls, then `repeats` timed calls (each between syncs), the first of which also measures the
    peak memory: (figures, the output of that first call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    out, peak = peak_memory(fn, device)
    samples = [time.perf_counter() - start] + [timed(fn, device) for _ in range(repeats - 1)]
    row = {
        "seconds": _r(statistics.median(samples), 5),
        "seconds_min": _r(min(samples), 5),
        "seconds_max": _r(max(samples), 5),
        "warmup": warmup,
        "repeats": len(samples),
        "peak_bytes": peak,
    }
    if device.type == "cuda":
        row["peak_above_start_bytes"] = peak - before
    return row, out


def rates(suite: Suite, flops: float, seconds: float) -> dict[str, Any]:
    """Achieved TFLOP/s and its fraction of the measured peak (and of the datasheet's, on a known GPU)."""
    achieved = flops / seconds / 1e12
    peak = suite.peak()
    row: dict[str, Any] = {"tflops_per_s": _r(achieved, 2)}
    row["fraction_of_measured_peak"] = (
        _r(achieved / peak["tflops_per_s"]) if peak.get("tflops_per_s") else None
    )
    datasheet = peak.get("datasheet_tflops")
    row["fraction_of_datasheet_peak"] = _r(achieved / datasheet) if datasheet else None
    return row


def measure_matmul_peak(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """Dense matrix-product rate: n x n x n products of random matrices (bf16 on a GPU, float32 on the CPU):
    3 warm-ups, then the median of 5 samples of 10 back-to-back products each (2 FLOPs per multiply-add)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda and not quick else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    for _ in range(3):
        a @ b
    per_sample = 10 if not quick else 2

    def products() -> None:
        for _ in range(per_sample):
            a @ b

    seconds = statistics.median(timed(products, device) for _ in range(5 if not quick else 2)) / per_sample
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    datasheet = peak_tflops_for(name) if cuda else None
    tflops = 2 * n**3 / seconds / 1e12
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds_median": _r(seconds, 6),
        "tflops_per_s": _r(tflops, 2),
        "datasheet_tflops": datasheet,
        "fraction_of_datasheet": _r(tflops / datasheet) if datasheet else None,
        "note": "random data, dense (no sparsity); the denominator of every fraction_of_measured_peak",
    }


def dit_inputs(
    cfg: DiTConfig, grid: tuple[int, int, int], batch: int, device: torch.device, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, in_dim, T, H, W] float32 latents, t [B] timesteps (937.0), ctx [B, text_len, text_dim]
    float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, cfg.in_dim, *grid, generator=g, device=device)
    t = torch.full((batch,), 937.0, device=device)
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g, device=device)
    return x, t, ctx


def diffusers_dit(ours: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Any:
    """diffusers' `WanTransformer3DModel` with `ours`' weights, on `device`, in `dtype` with its
    `_keep_in_fp32_modules` in float32 (as its `from_pretrained(torch_dtype=...)` loads it)."""
    from diffusers import WanTransformer3DModel
    from gpu_generate import cast_keeping_fp32_modules

    from wan.dit_keys import diffusers_transformer_config, dit_state_dict_to_diffusers

    with torch.device(device):
        ref = WanTransformer3DModel(**diffusers_transformer_config(ours.cfg))
    ref.load_state_dict(dit_state_dict_to_diffusers(ours.state_dict()), strict=True)
    return cast_keeping_fp32_modules(ref, dtype).eval().requires_grad_(False)


def diffusers_forward(
    ref: Any, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """() -> diffusers' output [B, 16, T, H, W], its inputs in its dtype (as its pipeline hands them over)."""
    dtype = ref.patch_embedding.weight.dtype
    xd, cd = x.to(dtype), ctx.to(dtype)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return ref(hidden_states=xd, timestep=t, encoder_hidden_states=cd, return_dict=False)[0]

    return run


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """float32 matrix products and convolutions without TF32 (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _shapes(
    suite: Suite, preset: str, full_grid: tuple[int, int, int]
) -> tuple[DiTConfig, tuple[int, int, int]]:
    """The preset's DiT config and latent grid, or the tiny preset's on `--quick`."""
    if suite.quick:
        return get_preset("tiny-t2v").dit, QUICK_GRID
    return get_preset(preset).dit, full_grid


# ----------------------------------------------------------------------------------------------- sections


def section_env(suite: Suite) -> dict[str, Any]:
    device = suite.device
    row: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "diffusers": _importable("diffusers") or suite.diffusers_skip,
        "transformers": _importable("transformers"),
        "ftfy": _importable("ftfy"),
        "triton": _importable("triton"),
        "flash_attn_interface": _importable("flash_attn_interface"),
        "flash_attn": _importable("flash_attn"),
        "WAN_ATTENTION": os.environ.get("WAN_ATTENTION"),
    }
    if suite.cuda:
        props = torch.cuda.get_device_properties(device)
        row |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "driver": _driver_version(),
        }
    else:
        row["gpu"] = NEEDS_CUDA + " (no GPU on this device)"
    from wan.attention import available_kernels, kernel_name

    row["attention_kernels_available"] = sorted(available_kernels())
    heads = {"t2v-1.3B": get_preset("t2v-1.3B").dit.head_dim, "t2v-14B": get_preset("t2v-14B").dit.head_dim}
    row["attention_kernel_picked"] = {
        f"{model} {str(dtype).removeprefix('torch.')} head_dim {d}": kernel_name(device, dtype, d)
        for model, d in heads.items()
        for dtype in (torch.bfloat16, torch.float16, torch.float32)
    }
    row["sdpa_backends"] = probe_sdpa_backends(device)
    runs = [name for name, r in row["sdpa_backends"].items() if r == "ok"]
    picked = kernel_name(device, torch.bfloat16, heads["t2v-1.3B"])
    row["line"] = (
        f"{row.get('gpu') if suite.cuda else 'cpu'}, driver {row.get('driver')}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; bf16 head 128 -> {picked}; SDPA runs: {','.join(runs)}"
    )
    return row


def _driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def probe_sdpa_backends(device: torch.device) -> dict[str, str]:
    """Each SDPA backend alone on q, k, v [2, 12, 256, 128] (bf16 on a GPU, float32 on the CPU): "ok" or the
    first line of its error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 12, 256, 128, device=device).to(dtype)
    out: dict[str, str] = {}
    for backend in (
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, q, q)
            _sync(device)
            out[backend.name.lower()] = "ok"
        except Exception as exc:  # not built, not supported on this device or dtype
            out[backend.name.lower()] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    return out


def section_peak(suite: Suite) -> dict[str, Any]:
    row = dict(suite.peak())
    sheet = (
        f" = {row['fraction_of_datasheet']:.0%} of the datasheet's {row['datasheet_tflops']}"
        if (row.get("fraction_of_datasheet"))
        else ""
    )
    row["line"] = f"{row['n']}^3 {row['dtype']} matmul: {row['tflops_per_s']} TFLOP/s{sheet}"
    return row


def section_attention(suite: Suite) -> dict[str, Any]:
    """Attention kernels at the t2v-1.3B 480P shape (q, k, v [2, 32760, 12, 128])."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from wan.attention import available_kernels, get_kernel, kernel_name, sdpa

    device, dtype = suite.device, suite.dtype
    if suite.quick:
        b, length, heads, d = 2, 256, 4, 16
    else:
        cfg = get_preset("t2v-1.3B").dit
        b, length, heads, d = 2, math.prod(GRID_480P) // 4, cfg.num_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, length, heads, d, generator=g, device=device).to(dtype) for _ in range(3))
    flops = 4 * b * heads * length * length * d
    warmup, repeats = suite.warmup_repeats()
    picked = kernel_name(device, dtype, d)

    def bench(fn: Callable[[], torch.Tensor]) -> dict[str, Any]:
        try:
            with torch.no_grad():
                figures, out = time_calls(fn, device, warmup, max(repeats, 3))
            figures["max_abs_vs_sdpa"] = _r((out.float() - reference).abs().max().item(), 6)
            return figures | {"tflops_per_s": _r(flops / figures["seconds"] / 1e12, 2)}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}

    with torch.no_grad():
        reference = sdpa(q, k, v).float()
    kernels: dict[str, Any] = {}
    for name in sorted(available_kernels()):
        op = get_kernel(name)
        kernels[name] = bench(lambda op=op: op(q, k, v))
    backends: dict[str, Any] = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):  # fmt: skip

        def run(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return sdpa(q, k, v)

        if backend == SDPBackend.MATH and not suite.quick:
            backends["math"] = "not run: it builds the whole L x L score matrix"
        else:
            backends[backend.name.lower()] = bench(run)
    timed_ok = {n: r["tflops_per_s"] for n, r in kernels.items() if "tflops_per_s" in r}
    best = max(timed_ok, key=timed_ok.get) if timed_ok else None
    row = {
        "shape_bshd": [b, length, heads, d],
        "dtype": str(dtype).removeprefix("torch."),
        "flops": flops,
        "picked": picked,
        "kernels": kernels,
        "sdpa_backends": backends,
        "picked_fraction_of_measured_peak": rates(suite, flops, kernels[picked]["seconds"])[
            "fraction_of_measured_peak"
        ]
        if "seconds" in kernels.get(picked, {})
        else None,
    }
    picked_rate = kernels.get(picked, {}).get("tflops_per_s")
    row["line"] = f"{picked} {picked_rate} TFLOP/s" + (f"; fastest {best} {timed_ok[best]}" if best else "")
    return row


def _forward_section(suite: Suite, compiled: bool) -> dict[str, Any]:
    """t2v-1.3B 480P forward, batch 2: ours and diffusers', eager or compiled."""
    device, dtype = suite.device, suite.dtype
    cfg, grid = _shapes(suite, "t2v-1.3B", GRID_480P)
    batch = 2
    warmup, repeats = suite.warmup_repeats()
    flops = forward_flops(cfg, grid, batch)
    total = sum(flops.values())
    ours = build_random(cfg, device, dtype, seed=0)
    x, t, ctx = dit_inputs(cfg, grid, batch, device)
    ctx = ctx.to(dtype)

    def run_ours() -> torch.Tensor:
        with torch.no_grad():
            return ours(x, t, ctx)

    from wan.attention import kernel_name

    backend = "eager" if suite.quick and not suite.cuda else "inductor"
    row: dict[str, Any] = {
        "preset": "tiny-t2v (quick)" if suite.quick else "t2v-1.3B",
        "layers": cfg.num_layers,
        "latents": [batch, cfg.in_dim, *grid],
        "tokens": math.prod(grid) // math.prod(cfg.patch_size),
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_kernel": kernel_name(device, dtype, cfg.head_dim),
        "flops": total,
        "flops_by_part": flops,
        "flop_count": "gpu_step.forward_flops: matrix products and both attention products, 2 FLOPs per "
        "multiply-add",
        "attention_flop_share": _r(flops["self_attn_core"] / total),
    }
    eager_out = None
    if compiled:
        row["compile_backend"] = backend
        eager_out = run_ours().float().cpu()
        ours.compile_blocks(fullgraph=True, backend=backend)
        start = time.perf_counter()
        try:
            run_ours()
        except Exception as exc:  # fullgraph refused: record why, compile with graph breaks allowed
            row["fullgraph_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            torch._dynamo.reset()
            ours.compile_blocks(backend=backend)
            run_ours()
        _sync(device)
        row["compile_seconds"] = _r(time.perf_counter() - start, 2)
    figures, out = time_calls(run_ours, device, warmup, repeats)
    row["ours"] = figures | rates(suite, total, figures["seconds"])
    ours_out = out.float().cpu()
    if eager_out is not None:
        row["ours"]["max_abs_vs_eager"] = _r((ours_out - eager_out).abs().max().item(), 6)
    del out
    if suite.diffusers_skip:
        row["diffusers"] = suite.diffusers_skip
    else:
        ours.to("cpu")
        _free(device)
        ref = diffusers_dit(ours, device, dtype)
        del ours
        run_ref = diffusers_forward(ref, x, t, ctx)
        if compiled:
            start = time.perf_counter()
            ref.compile_repeated_blocks(backend=backend)
            run_ref()
            _sync(device)
            compile_s = time.perf_counter() - start
        figures, out = time_calls(run_ref, device, warmup, repeats)
        row["diffusers"] = figures | rates(suite, total, figures["seconds"])
        if compiled:
            row["diffusers"]["compile_seconds"] = _r(compile_s, 2)
        row["diffusers"]["attention"] = "diffusers' default (native SDPA, its own backend choice)"
        row["max_abs_ours_vs_diffusers"] = _r((ours_out - out.float().cpu()).abs().max().item(), 6)
        row["time_ratio_ours_vs_diffusers"] = _r(row["ours"]["seconds"] / figures["seconds"])
    if compiled:
        torch._dynamo.reset()
    o = row["ours"]
    frac = o.get("fraction_of_measured_peak")
    line = f"ours {o['seconds']:.3f} s {o['tflops_per_s']} TFLOP/s" + (
        f" ({frac:.0%} of peak)" if frac else ""
    )
    if isinstance(row["diffusers"], dict):
        line += f"; diffusers {row['diffusers']['seconds']:.3f} s {row['diffusers']['tflops_per_s']} TFLOP/s"
    row["line"] = line
    return row


def section_forward(suite: Suite) -> dict[str, Any]:
    return _forward_section(suite, compiled=False)


def section_forward_compiled(suite: Suite) -> dict[str, Any]:
    return _forward_section(suite, compiled=True)


def section_vae(suite: Suite) -> dict[str, Any]:
    """VAE decode of 81 frames at 480P (quick: the tiny VAE, 2 latent frames), ours and diffusers'."""
    from common import random_vae, vae_twins

    device = suite.device
    cfg = get_preset("tiny-t2v").vae if suite.quick else None
    frames, h, w = (2, *QUICK_GRID[1:]) if suite.quick else GRID_480P
    if suite.diffusers_skip:
        ours, ref = random_vae(0, cfg), None
    else:
        ours, ref = vae_twins(0, cfg)
    z = torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(2))  # normalised latents
    models: dict[str, Any] = {"ours": ours}
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"ours": lambda zz: ours.decode(zz)}
    if ref is not None:
        mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
        models["diffusers"] = ref
        fns["diffusers"] = lambda zz: ref.decode(zz * std.to(zz.device) + mean.to(zz.device)).sample
    zd = z.to(device)
    rows: dict[str, Any] = {}
    videos: dict[str, torch.Tensor] = {}
    for name, fn in fns.items():
        for other, model in models.items():  # only the running model on the device
            model.to(device if other == name else "cpu")
        _free(device)
        with torch.no_grad():
            fn(zd[:, :, :1])  # warm-up: one latent frame
            sample = measure(lambda fn=fn: fn(zd), device)
        videos[name] = sample.pop("video")
        rows[name] = {k: _r(v, 4) if isinstance(v, float) else v for k, v in sample.items()}
    for model in models.values():
        model.to("cpu")
    row: dict[str, Any] = {
        "latents": [1, 16, frames, h, w],
        "video": [1, 3, 1 + 4 * (frames - 1), 8 * h, 8 * w],
        "vae": "tiny-t2v's (quick)" if suite.quick else "full-size Wan 2.1 VAE, float32, random weights",
        "ours": rows["ours"],
        "diffusers": rows.get("diffusers", suite.diffusers_skip),
    }
    line = f"ours {rows['ours']['seconds']:.2f} s {_gb(rows['ours']['peak'])}"
    if "diffusers" in rows:
        d = rows["diffusers"]
        row["max_abs_ours_vs_diffusers"] = (videos["ours"] - videos["diffusers"]).abs().max().item()
        row["time_ratio_ours_vs_diffusers"] = _r(rows["ours"]["seconds"] / d["seconds"])
        row["peak_ratio_ours_vs_diffusers"] = _r(rows["ours"]["peak"] / d["peak"])
        line += f"; diffusers {d['seconds']:.2f} s {_gb(d['peak'])}"
    row["line"] = line
    return row


@contextlib.contextmanager
def _quiet_stdout(log: list[str]) -> Iterator[None]:
    """Collect what a reused benchmark prints (its summary and JSON line) into `log`."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        log.extend(buffer.getvalue().splitlines()[-30:])


def section_generation(suite: Suite) -> dict[str, Any]:
    if suite.diffusers_skip:
        raise Skipped(suite.diffusers_skip)
    import gpu_generate

    # The DiT and VAE kernels were warmed at these shapes by earlier sections of this process: no warm-up
    # generation then (each would decode a whole video).
    warmed = suite.ok("forward_1.3b") is not None and suite.ok("vae") is not None and not suite.quick
    argv = ["--device", str(suite.device), "--narrow-text-encoder", "--repeats", "1"]
    argv += ["--warmup-steps", "0" if warmed else "1"]
    if suite.quick:
        argv += ["--preset", "tiny-t2v", "--size", "64*48", "--frame_num", "5", "--steps", "2"]
    log: list[str] = []
    with _quiet_stdout(log):
        result = gpu_generate.main(argv)
    result["argv"] = argv
    result["log"] = log[:-1]  # the last line is the JSON itself
    result["line"] = (
        f"ours {result['seconds_ours']:.1f} s {_gb(result['peak_bytes_ours'])}; diffusers "
        f"{result['seconds_diffusers']:.1f} s {_gb(result['peak_bytes_diffusers'])}; "
        f"{result['speedup']}x (target {SPEEDUP_TARGET}x)"
    )
    return result


def section_offload(suite: Suite) -> dict[str, Any]:
    import gpu_generate

    from wan.pipeline import MemoryOptions

    device = suite.device
    preset = "tiny-t2v" if suite.quick else "t2v-1.3B"
    size, frames = ((64, 48), 5) if suite.quick else ((832, 480), 81)
    steps = 2 if suite.quick else suite.args.offload_steps
    memory = MemoryOptions(offload_model=True, t5_cpu=True)
    start = time.perf_counter()
    pipe = gpu_generate.random_pipeline(preset, device, seed=0, memory=memory)
    build_s = time.perf_counter() - start
    t5_params = sum(p.numel() for p in pipe.text_encoder.model.parameters())

    def run() -> torch.Tensor:
        with torch.no_grad():
            return pipe.generate(PROMPT, seed=0, size=size, frame_num=frames, steps=steps, progress=False)

    sample = measure(run, device)
    video = sample.pop("video")
    peak = sample["peak"]
    row = {
        "preset": preset,
        "size": list(size),
        "frame_num": frames,
        "steps": steps,
        "options": memory.describe(),
        "seconds": _r(sample["seconds"], 2),
        "build_s": _r(build_s, 1),
        "peak_bytes": peak,
        "peak_reserved_bytes": sample.get("reserved"),
        "target_bytes": OFFLOAD_TARGET_BYTES,
        "meets_target": peak <= OFFLOAD_TARGET_BYTES if suite.cuda and not suite.quick else None,
        "video_finite": bool(torch.isfinite(video).all()),
        "dit_on_cpu_after": next(pipe.dit.parameters()).device.type == "cpu",
        "text_encoder": f"narrow random umT5 ({t5_params / 1e9:.2f}B params) on the CPU (t5_cpu): its size "
        "does not enter the GPU peak",
        "note": "the peak is reached in the first sampling step and in the VAE decode, so fewer steps than "
        "the 50-step comparison give the same peak",
    }
    row["line"] = (
        f"peak {_gb(peak)} (reserved {_gb(sample.get('reserved'))}), target {_gb(OFFLOAD_TARGET_BYTES)}"
    )
    return row


def section_numerics(suite: Suite) -> dict[str, Any]:
    """bf16 against fp32 on the same device: ours and diffusers' on the same weights."""
    device = suite.device
    base, grid = _shapes(suite, "t2v-1.3B", GRID_480P)
    cfg = dataclasses.replace(base, num_layers=2)
    x, t, ctx = dit_inputs(cfg, grid, 1, device, seed=3)
    ours = build_random(cfg, device, torch.float32, seed=5)
    outs: dict[str, torch.Tensor] = {}
    with exact_fp32(), torch.no_grad():
        outs["ours_fp32"] = ours(x, t, ctx).float().cpu()
        ref = None
        if not suite.diffusers_skip:
            ref = diffusers_dit(ours, device, torch.float32)
            outs["diffusers_fp32"] = diffusers_forward(ref, x, t, ctx)().float().cpu()
        ours.cast(torch.bfloat16)
        outs["ours_bf16"] = ours(x, t, ctx.to(torch.bfloat16)).float().cpu()
        if ref is not None:
            from gpu_generate import cast_keeping_fp32_modules

            cast_keeping_fp32_modules(ref, torch.bfloat16)
            outs["diffusers_bf16"] = diffusers_forward(ref, x, t, ctx)().float().cpu()
    row: dict[str, Any] = {
        "preset": "tiny-t2v (quick)" if suite.quick else "t2v-1.3B width",
        "layers": cfg.num_layers,
        "latents": [1, cfg.in_dim, *grid],
        "tokens": math.prod(grid) // math.prod(cfg.patch_size),
        "reference": "float32 on the same device, TF32 off",
        "ours_bf16_vs_fp32": _errors(outs["ours_bf16"], outs["ours_fp32"]),
        "output_rms": outs["ours_fp32"].pow(2).mean().sqrt().item(),
    }
    line = f"ours bf16 rel L2 {row['ours_bf16_vs_fp32']['rel_l2']:.2e}"
    if ref is None:
        row["diffusers"] = suite.diffusers_skip
    else:
        row["diffusers_bf16_vs_fp32"] = _errors(outs["diffusers_bf16"], outs["diffusers_fp32"])
        row["ours_bf16_vs_diffusers_fp32"] = _errors(outs["ours_bf16"], outs["diffusers_fp32"])
        row["ours_fp32_vs_diffusers_fp32"] = _errors(outs["ours_fp32"], outs["diffusers_fp32"])
        ours_err, ref_err = row["ours_bf16_vs_fp32"]["rel_l2"], row["diffusers_bf16_vs_fp32"]["rel_l2"]
        row["ours_at_least_as_close"] = ours_err <= ref_err
        row["error_ratio_ours_vs_diffusers"] = _r(ours_err / ref_err) if ref_err else None
        fp32 = row["ours_fp32_vs_diffusers_fp32"]["max_abs"]
        line += f", diffusers {ref_err:.2e}; fp32 ours vs diffusers max {fp32:.1e}"
    row["line"] = line
    return row


def section_forward_14b(suite: Suite) -> dict[str, Any]:
    device, dtype = suite.device, suite.dtype
    base, grid = _shapes(suite, "t2v-14B", GRID_720P)
    cfg = dataclasses.replace(base, num_layers=1) if suite.quick else base
    flops = forward_flops(cfg, grid, 1)
    total = sum(flops.values())
    start = time.perf_counter()
    model = build_random(cfg, device, dtype, seed=0)
    _sync(device)
    build_s = time.perf_counter() - start
    x, t, ctx = dit_inputs(cfg, grid, 1, device)
    ctx = ctx.to(dtype)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(x, t, ctx)

    blocks = model.blocks
    model.blocks = torch.nn.ModuleList(blocks[:1])  # warm-up on one block: the same kernels, 1/40 the time
    run()
    model.blocks = blocks
    figures, out = time_calls(run, device, 0, 1)
    from wan.attention import kernel_name

    row = {
        "preset": "tiny-t2v, 1 block (quick)" if suite.quick else "t2v-14B",
        "layers": cfg.num_layers,
        "latents": [1, cfg.in_dim, *grid],
        "tokens": math.prod(grid) // math.prod(cfg.patch_size),
        "dtype": str(dtype).removeprefix("torch."),
        "attention_kernel": kernel_name(device, dtype, cfg.head_dim),
        "build_s": _r(build_s, 2),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "flops": total,
        "attention_flop_share": _r(flops["self_attn_core"] / total),
        "output_finite": bool(torch.isfinite(out).all()),
        "forward_s_official_h100_estimate": round((1837.9 - 40.0) / 100, 2),
        **figures,
        **rates(suite, total, figures["seconds"]),
    }
    row["line"] = (
        f"{figures['seconds']:.2f} s, {row['tflops_per_s']} TFLOP/s, peak {_gb(figures['peak_bytes'])} "
        f"(official 1-GPU H100 time / 100 forwards ~{row['forward_s_official_h100_estimate']} s)"
    )
    return row


def section_cp_model(suite: Suite) -> dict[str, Any]:
    import context_parallel

    measured = suite.ok("forward_14b")
    argv = ["--skip-measure", "--repeats", "1" if suite.quick else "2"]
    if suite.cuda and not suite.quick:
        argv.append("--measure-gpu")  # a full-size 14B block for the attention share
    else:
        argv += ["--no-measure-gpu", "--cpu-tokens", "64"]
    if measured is not None:
        argv += ["--single-forward-seconds", str(measured["seconds"])]
    log: list[str] = []
    with _quiet_stdout(log):
        result = context_parallel.main(argv)
    keys = (
        "predicted_8gpu_seconds", "official_8gpu_seconds", "prediction_ratio_8gpu", "predicted_seconds",
        "predicted_official_layout_seconds", "single_gpu_forward_seconds", "single_gpu_video_seconds_model",
        "block_timing", "inputs",
    )  # fmt: skip
    row: dict[str, Any] = {k: result.get(k) for k in keys}
    row["argv"] = argv
    stand_in = ", tiny stand-in: not a 14B figure" if suite.quick else ""
    row["forward_seconds_source"] = (
        f"forward_14b section ({measured['seconds']} s{stand_in})"
        if measured is not None
        else "forward_14b did not run: the official 1-GPU H100 time less overhead, over 100 forwards"
    )
    row["log"] = log[:-1]
    row["line"] = (
        f"8 GPUs predicted {row['predicted_8gpu_seconds']} s vs official {OFFICIAL_8GPU_SECONDS} s "
        f"(ratio {row['prediction_ratio_8gpu']})"
    )
    return row


def section_ring(suite: Suite) -> dict[str, Any]:
    """Ring attention's block kernels merged over 4 key blocks against exact attention over all keys."""
    from wan.distributed import ring

    device = suite.device
    blocks, lk, lq, b, h = 4, 250, 250, 2, 4  # 250 keys a block: no multiple of 8 or 16
    cases: dict[str, Any] = {}
    for dtype in (torch.bfloat16, torch.float32):
        for d in (128, 20):
            g = torch.Generator().manual_seed(d)
            q = torch.randn(b, lq, h, d, generator=g).to(device, dtype)
            k = torch.randn(b, blocks * lk, h, d, generator=g).to(device, dtype)
            v = torch.randn(b, blocks * lk, h, d, generator=g).to(device, dtype)
            mask = torch.rand(b, blocks * lk, generator=g) < 0.6  # scattered keys
            mask[0, lk : 2 * lk] = False  # one whole block without a key in row 0
            mask[1, 700:] = False  # row 1: padding at the end
            mask[:, 0] = True
            mask = mask.to(device)
            num_keys = blocks * lk - 137  # the last block partly padding
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            name = f"{str(dtype).removeprefix('torch.')}_d{d}"
            for case, kwargs in {
                "no_padding": {},
                "num_keys": {"num_keys": num_keys},
                "key_mask": {"mask": mask},
            }.items():
                cases[f"{name}_{case}"] = _ring_case(suite, ring, q, k, v, lk, blocks, tol, **kwargs)
            # ring_attention itself on one rank (its num_keys path, host arithmetic)
            ref_out, _ = ring.block_attention_reference(q, k[:, :num_keys], v[:, :num_keys])
            got = ring.ring_attention(q, k, v, None, num_keys=num_keys)
            err = (got.float() - ref_out).abs().max().item()
            cases[f"{name}_ring_attention_one_rank"] = {
                "max_abs_out": err,
                "tolerance": tol,
                "passed": err <= tol,
            }
    failed = [n for n, c in cases.items() if not c.get("passed")]
    return {
        "shape": {"batch": b, "heads": h, "queries": lq, "key_blocks": blocks, "keys_per_block": lk},
        "kernels_used": sorted({k for c in cases.values() for k in c.get("kernels", [])}),
        "cases": cases,
        "failed": failed,
        "all_passed": not failed,
        "line": f"{len(cases) - len(failed)}/{len(cases)} cases within tolerance"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
    }


def _ring_case(
    suite: Suite, ring: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lk: int, blocks: int,
    tol: float, num_keys: int | None = None, mask: torch.Tensor | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Blocks through `block_attention_kernel`, merged with `merge_partial`, as `ring_attention` does on each
    rank, against `block_attention_reference` over the concatenated keys."""
    kernels: set[str] = set()

    def merged() -> tuple[torch.Tensor, torch.Tensor]:
        out = lse = None
        for i in range(blocks):
            n = ring._real_keys(num_keys, i, lk)  # host arithmetic, as ring_attention
            if n == 0:
                continue
            kb, vb = k[:, i * lk : i * lk + n], v[:, i * lk : i * lk + n]
            mb = None if mask is None else mask[:, i * lk : i * lk + n]
            kernels.add(ring.pick_block_kernel(q, mb is not None))
            part = ring.block_attention_kernel(q, kb, vb, mb)
            out, lse = part if out is None else ring.merge_partial(out, lse, *part)
        assert out is not None and lse is not None
        return out, lse

    row: dict[str, Any] = {}
    if suite.cuda:
        _sync(suite.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, lse = merged()
            row["host_syncs"] = "none (sync debug mode 'error' raised nothing)"
        except RuntimeError as exc:
            torch.cuda.set_sync_debug_mode(0)
            row["host_syncs"] = f"RuntimeError: {str(exc)[:300]}"
            out, lse = merged()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        out, lse = merged()
        row["host_syncs"] = NEEDS_CUDA
    keys = k.shape[1] if num_keys is None else num_keys
    ref_out, ref_lse = ring.block_attention_reference(q, k[:, :keys], v[:, :keys], mask)
    finite = torch.isfinite(ref_lse)
    err_out = (out - ref_out).abs().max().item()
    err_lse = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    lse_inf_match = bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)))
    row |= {
        "kernels": sorted(kernels),
        "max_abs_out": err_out,
        "max_abs_lse": err_lse,
        "tolerance": tol,
        "passed": err_out <= tol
        and err_lse <= tol
        and lse_inf_match
        and not row["host_syncs"].startswith("Runtime"),
    }
    return row


def section_gpu_tests(suite: Suite) -> dict[str, Any]:
    """The `pytest -m gpu` checks, each recorded on its own."""
    from wan.pipeline import MemoryOptions, WanPipeline
    from wan.sampling import SOLVERS, FlowSampler, initial_noise

    device, cuda = suite.device, suite.cuda
    small = dict(size=(64, 48), frame_num=5, sampling_steps=4, guide_scale=5.0)
    checks: dict[str, Any] = {}

    def check(name: str, needs_cuda: bool, fn: Callable[[], dict[str, Any]]) -> None:
        if needs_cuda and not cuda:
            checks[name] = NEEDS_CUDA
            return
        try:
            checks[name] = fn()
        except Exception as exc:
            checks[name] = {"passed": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)

    def noise() -> dict[str, Any]:
        shape = (16, 2, 6, 8)
        on_gpu = initial_noise(7, shape, device=device)
        return {"passed": on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), initial_noise(7, shape))}

    def solver_steps() -> dict[str, Any]:
        out: dict[str, Any] = {}
        g = torch.Generator().manual_seed(3)
        for solver in SOLVERS:
            x = torch.randn(1, 16, 2, 6, 8, generator=g).to(device)
            target = torch.randn(16, 2, 6, 8, generator=g).to(device)
            sampler = FlowSampler(solver, 50, 5.0)
            sigmas = sampler.sigmas.tolist()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for i in range(sampler.steps):
                    x = sampler.step((x - target) * (1 + sigmas[i]), i, x)
                out[solver] = "no sync in 50 steps"
            except RuntimeError as exc:
                out[solver] = f"synchronised: {str(exc)[:200]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return {"passed": all(v.startswith("no sync") for v in out.values()), "solvers": out}

    def sampling_loop() -> dict[str, Any]:
        out: dict[str, Any] = {}
        pipe = WanPipeline.from_config("tiny-t2v", seed=0, device=device)
        for solver in SOLVERS:
            settings = pipe.settings(size=(64, 48), frame_num=5, steps=4, shift=5.0, guide_scale=5.0,
                                     solver=solver)  # fmt: skip
            hook = pipe.dit.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))
            try:
                latents = pipe.sample_latents(["a fox"], [3], settings, progress=False)
                torch.cuda.set_sync_debug_mode(0)
                out[solver] = "no sync" if torch.isfinite(latents).all() else "no sync, but not finite"
            except RuntimeError as exc:
                out[solver] = f"synchronised: {str(exc)[:200]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
                hook.remove()
        return {"passed": all(v == "no sync" for v in out.values()), "solvers": out}

    def sync_counts() -> dict[str, Any]:
        pipe = WanPipeline.from_config("tiny-t2v", seed=0, device=device)

        def syncs(steps: int) -> int:
            settings = pipe.settings(size=(64, 48), frame_num=5, sampling_steps=steps)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    pipe.sample_latents(["a fox"], [1], settings, progress=False)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            return sum("synchroniz" in str(w.message).lower() for w in caught)

        syncs(2)  # warm-up
        short, long = syncs(2), syncs(8)
        return {"passed": short == long, "syncs_2_steps": short, "syncs_8_steps": long}

    def offload() -> dict[str, Any]:
        lean = WanPipeline.from_config("tiny-t2v", seed=0, device=device, memory=MemoryOptions(True, True))
        plain = WanPipeline.from_config("tiny-t2v", seed=0, device=device)
        a = torch.cat(list(plain.generate_stream("a fox", seed=4, progress=False, **small)))
        b = torch.cat(list(lean.generate_stream("a fox", seed=4, progress=False, **small)))
        diff = int((a.int() - b.int()).abs().max())
        placed = next(lean.dit.parameters()).device.type == "cpu" and lean.text_encoder.device.type == "cpu"
        return {"passed": diff <= 1 and placed, "max_uint8_diff": diff, "models_back_on_cpu": placed}

    def vae_attention() -> dict[str, Any]:
        from wan.vae import AttentionBlock

        h, w, dim = 90, 160, 384
        scores = (h * w) ** 2 * 4  # one float32 [HW, HW] matrix
        torch.manual_seed(0)
        block = AttentionBlock(dim).eval()
        with torch.no_grad():
            block.norm.gamma.uniform_(0.8, 1.2)
            block.proj.weight.normal_(std=0.05)
        block = block.to(device)
        x = torch.randn(1, dim, 1, h, w, device=device)
        with torch.no_grad():
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            block(x)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        return {"passed": peak < scores / 4, "peak_above_start_bytes": peak, "score_matrix_bytes": scores}

    check("noise_device_independent", True, noise)
    check("solver_steps_no_host_sync", True, solver_steps)
    check("sampling_loop_no_host_sync", True, sampling_loop)
    check("sync_count_2_vs_8_steps", True, sync_counts)
    check("offload_same_video", False, offload)
    check("vae_attention_720p_peak", True, vae_attention)
    ran = {n: c for n, c in checks.items() if isinstance(c, dict)}
    failed = [n for n, c in ran.items() if not c.get("passed")]
    skipped = [n for n, c in checks.items() if not isinstance(c, dict)]
    line = f"{len(ran) - len(failed)}/{len(ran)} passed" + (
        f"; failed: {', '.join(failed)}" if failed else ""
    )
    if skipped:
        line += f"; {len(skipped)} need CUDA"
    return {"checks": checks, "failed": failed, "all_passed": not failed, "line": line}


def section_fast_modes(suite: Suite) -> dict[str, Any]:
    """Issue 16's fast modes (`fast_modes.main`): t2v-1.3B at 832x480 with fewer frames (21), one repeat, a
    narrow text encoder; on `--quick` the tiny preset with few steps."""
    import fast_modes

    argv = ["--device", str(suite.device), "--repeats", "1"]
    if suite.quick:
        argv += ["--preset", "tiny-t2v", "--size", "64*48", "--frame-num", "5", "--steps", "4",
                 "--warmup-steps", "1"]  # fmt: skip
    else:
        argv += ["--preset", "t2v-1.3B", "--size", "832*480", "--frame-num", "21", "--steps", "50",
                 "--text-encoder", "narrow"]  # fmt: skip
    log: list[str] = []
    with _quiet_stdout(log), contextlib.redirect_stderr(io.StringIO()) as table:
        result = fast_modes.main(argv)
    result["argv"] = argv
    result["log"] = table.getvalue().splitlines()[-30:]  # its summary and table (stdout: the JSON only)
    modes = result["modes"]
    result["line"] = "; ".join(
        f"{name} {row['effective_full_forwards']}/{row['dit_forwards']} fwd {row['seconds']:.2f} s"
        + (f" {row['speedup_vs_baseline']:.1f}x" if name != "baseline" and row["speedup_vs_baseline"] else "")
        for name, row in modes.items()
    )
    return result


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Suite], dict[str, Any]]
    estimate_s: float  # on an H200 at full size


# The run order: what the acceptance needs first. Estimates are guesses for an H200 (about 550 s in all, more
# than the default budget: a section whose estimate exceeds what is left is skipped, saying so).
SECTIONS: tuple[Section, ...] = (
    Section("env", section_env, 5),
    Section("peak", section_peak, 5),
    Section("attention", section_attention, 10),
    Section("forward_1.3b", section_forward, 20),
    Section("vae", section_vae, 30),
    Section("generation", section_generation, 180),
    Section("offload", section_offload, 30),
    Section("numerics", section_numerics, 15),
    Section("forward_14b", section_forward_14b, 30),
    Section("cp_model", section_cp_model, 20),
    Section("ring", section_ring, 5),
    Section("gpu_tests", section_gpu_tests, 20),
    Section("fast_modes", section_fast_modes, 90),  # 50 steps + 2 caches + 4 steps at 832x480x21
    Section("forward_1.3b_compiled", section_forward_compiled, 90),  # last: compile time is the unknown
)
QUICK_ESTIMATE_S = 1.0


# ------------------------------------------------------------------------------------------------- driver


def _on_alarm(signum: int, frame: Any) -> None:
    raise SuiteTimeout("the section ran past the budget (--budget-s) and its grace period")


def run_section(suite: Suite, section: Section) -> dict[str, Any]:
    """Run one section: its figures with status "ok", or status "skipped" / "error" with the reason."""
    remaining = suite.deadline - time.monotonic()
    estimate = QUICK_ESTIMATE_S if suite.quick else section.estimate_s
    if estimate > remaining:
        return {
            "status": "skipped",
            "reason": f"budget: needs about {estimate:.0f} s, {max(remaining, 0):.0f} s left",
            "section_seconds": 0.0,
        }
    alarm = hasattr(signal, "SIGALRM")
    if alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(remaining + GRACE_S, 1.0))
    start = time.perf_counter()
    try:
        row = {"status": "ok", **section.run(suite)}
    except Skipped as exc:
        row = {"status": "skipped", "reason": str(exc)}
    except (Exception, SuiteTimeout) as exc:
        row = {
            "status": "error",
            "reason": f"{type(exc).__name__}: {str(exc)[:1000]}",
            "traceback": traceback.format_exc()[-4000:],
        }
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if suite.cuda:
            torch.cuda.set_sync_debug_mode(0)
        _free(suite.device)
    row["section_seconds"] = round(time.perf_counter() - start, 2)
    return row


def acceptance(suite: Suite) -> dict[str, Any]:
    """The issue's GPU acceptance figures, read off the sections ("passed" is None off a GPU, on --quick, or
    when the section did not run)."""
    real = suite.cuda and not suite.quick

    def verdict(ok: bool | None) -> bool | None:
        return ok if real and ok is not None else None

    out: dict[str, Any] = {}
    fractions = {}
    for name in ("forward_1.3b", "forward_1.3b_compiled"):
        row = suite.ok(name)
        if row and row["ours"].get("fraction_of_measured_peak") is not None:
            fractions[name] = row["ours"]["fraction_of_measured_peak"]
    best = max(fractions.values()) if fractions else None
    out["forward_1.3b_fraction_of_measured_peak"] = {
        "value": best, "by_section": fractions, "target": FORWARD_TARGET, "goal": FORWARD_GOAL,
        "passed": verdict(None if best is None else best >= FORWARD_TARGET),
    }  # fmt: skip
    gen = suite.ok("generation")
    speedup = gen["speedup"] if gen else None
    out["generation_speedup_vs_diffusers"] = {
        "value": speedup, "target": SPEEDUP_TARGET,
        "passed": verdict(None if speedup is None else speedup >= SPEEDUP_TARGET),
    }  # fmt: skip
    out["generation_peak_ours_vs_diffusers"] = {
        "value": gen["peak_ratio"] if gen else None, "target": "<= 1.0",
        "passed": verdict(None if not gen else gen["peak_bytes_ours"] <= gen["peak_bytes_diffusers"]),
    }  # fmt: skip
    off = suite.ok("offload")
    out["offload_peak_bytes"] = {
        "value": off["peak_bytes"] if off else None, "target": OFFLOAD_TARGET_BYTES,
        "passed": verdict(None if not off else off["peak_bytes"] <= OFFLOAD_TARGET_BYTES),
    }  # fmt: skip
    num = suite.ok("numerics")
    closer = num.get("ours_at_least_as_close") if num else None
    out["bf16_numerics_at_least_as_close_as_diffusers"] = {
        "ours_rel_l2": num["ours_bf16_vs_fp32"]["rel_l2"] if num else None,
        "diffusers_rel_l2": num["diffusers_bf16_vs_fp32"]["rel_l2"] if num and closer is not None else None,
        "passed": verdict(closer),
    }
    f14 = suite.ok("forward_14b")
    out["t2v_14b_720p_forward_seconds"] = f14["seconds"] if f14 else None
    cp = suite.ok("cp_model")
    out["cp_predicted_8gpu_seconds"] = {
        "value": cp["predicted_8gpu_seconds"] if cp else None,
        "official": OFFICIAL_8GPU_SECONDS,
        "ratio": cp["prediction_ratio_8gpu"] if cp else None,
        "from_measured_forward": bool(cp and f14),
    }
    if not real:
        out["note"] = "not GPU figures (CPU or --quick): 'passed' stays None"
    return out


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON file (default {DEFAULT_OUT})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sections", default=None, help=f"comma-separated, of: {', '.join(s.name for s in SECTIONS)}"
    )
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all sections")
    p.add_argument("--quick", action="store_true", help="tiny configurations and few steps (the CPU test)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per model (median)")
    p.add_argument("--offload-steps", type=int, default=10, help="steps of the offload_model + t5_cpu run")
    p.add_argument("--without-diffusers", action="store_true", help="run as if diffusers did not import")
    args = p.parse_args(argv)
    known = {s.name for s in SECTIONS}
    if args.sections:
        picked = [n.strip() for n in args.sections.split(",") if n.strip()]
        unknown = [n for n in picked if n not in known]
        if unknown:
            p.error(f"unknown section(s) {unknown}; choose from {', '.join(s.name for s in SECTIONS)}")
        args.sections = picked
    else:
        args.sections = [s.name for s in SECTIONS]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.without_diffusers:
        skip = f"{DIFFUSERS_MISSING} (--without-diffusers)"
    else:
        try:
            import diffusers  # noqa: F401

            skip = None
        except Exception as exc:
            skip = f"{DIFFUSERS_MISSING} ({type(exc).__name__}: {exc})"
    started = time.monotonic()
    suite = Suite(args=args, device=device, deadline=started + args.budget_s, diffusers_skip=skip)
    doc: dict[str, Any] = {
        "suite": "gpu_suite",
        "command": [sys.executable, *sys.argv] if argv is None else ["gpu_suite.py", *argv],
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": suite.device_name,
        "quick": args.quick,
        "budget_s": args.budget_s,
        "diffusers": _importable("diffusers") if skip is None else skip,
        "sections": {},
    }
    print(
        f"gpu_suite on {suite.device_name} ({device}), budget {args.budget_s:.0f} s"
        + (", quick (tiny shapes: not GPU figures)" if args.quick else "")
        + ("" if skip is None else f"; {skip}"),
        flush=True,
    )
    print(f"{'section':<22} {'status':<8} {'secs':>6}  figures", flush=True)
    for section in SECTIONS:
        if section.name not in args.sections:
            row = {"status": "skipped", "reason": "not selected (--sections)", "section_seconds": 0.0}
        else:
            row = run_section(suite, section)
        suite.results[section.name] = row
        doc["sections"][section.name] = row
        doc["elapsed_s"] = round(time.monotonic() - started, 1)
        _write(args.out, doc)
        if section.name in args.sections:
            shown = row.get("line") if row["status"] == "ok" else row.get("reason", "")
            print(
                f"{section.name:<22} {row['status']:<8} {row['section_seconds']:>6.1f}  {str(shown)[:160]}",
                flush=True,
            )
    doc["acceptance"] = acceptance(suite)
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["finished_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    _write(args.out, doc)
    print("acceptance:", flush=True)
    for name, value in doc["acceptance"].items():
        if name != "note":
            print(f"  {name}: {json.dumps(value, default=str)[:200]}", flush=True)
    print(f"{doc['elapsed_s']} s in all; wrote {args.out}", flush=True)
    return doc


if __name__ == "__main__":
    main()
