"""The fast modes of issue 16 against the plain video: DiT forwards and seconds per video, and what each costs
in pixels, one process, one pipeline.

    python benchmarks/fast_modes.py                                      # tiny-t2v 64x48x9, 50 steps
    python benchmarks/fast_modes.py --preset t2v-1.3B --device cuda      # 832x480x21, narrow text encoder
    python benchmarks/fast_modes.py --modes baseline,fbcache --steps 10 --repeats 1

Modes (`--modes`, default all, in this order):

- baseline: `--steps` (50) steps with classifier-free guidance (`--guide-scale` 5, batched), no cache;
- fbcache / magcache: the same with that step cache at its default threshold (`wan.fast_modes.
  DEFAULT_THRESHOLDS`: first-block cache 0.05, MagCache 0.12 with the preset's published ratios);
- few-step: the "few-step" recipe's settings (`wan.fast_modes.RECIPES`: 4 steps, guidance 1, shift 5, euler)
  with a random LoRA merged through `use_loras` standing in for a step/CFG-distilled LoRA (said so in the
  JSON): its video differs from the baseline by the LoRA as well as by the sampling.

For each mode: DiT calls per video (a forward hook on `pipe.dit`; one call is one forward of the model,
whatever its batch: with batched CFG one call per step, of batch 2), the calls the step cache skipped past
the first block (`pipe.last_cache_counts`), the effective full forwards (calls - skipped), the seconds per
video end to end (prompt encoding, sampling, VAE decode; between CUDA syncs on a GPU; the median of
`--repeats`, the modes alternating, after a warm-up), the speed-up against the baseline, and the max / mean
absolute pixel difference (pixels in [0, 1]) and PSNR of the video against the baseline's (same seed).

Weights are random (`WanPipeline.from_config`, the preset's own text encoder; for a full-size preset by
default, as `gpu_generate.py --narrow-text-encoder`, the DiT built on the device and a narrow 2-layer umT5 of
the real width, `--text-encoder`): how many steps a cache skips depends on the weights, so these are not the
trained model's figures; the forwards of the baseline and the few-step recipe are. On a GPU the full-size
default is 21 frames (not 81) and one repeat, so that the run takes a minute or two; the JSON states the
shapes. On the CPU a tiny preset runs on one thread (`--threads`; see `CPU_THREADS`). Prints a table on
stderr, then one JSON object (`--out FILE` writes it too).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import emit

from wan.configs import get_preset, parse_size
from wan.fast_modes import DEFAULT_THRESHOLDS, RECIPES
from wan.lora import LoraSet, lora_from_state_dict, random_lora_state_dict
from wan.pipeline import WanPipeline, default_dtype
from wan.sampling import latent_shape

PROMPT = "A red fox trots through fresh snow in a birch forest at sunrise, soft light, slow camera pan"
MODES = ("baseline", "fbcache", "magcache", "few-step")
RECIPE = RECIPES["few-step"]
LORA_RANK, LORA_SEED = 4, 16
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Full-size presets: fewer frames than the preset's 81 and one repeat, so that a GPU run fits a minute or two.
FULL_FRAME_NUM, FULL_REPEATS = 21, 1
TINY_REPEATS = 5
# CPU threads by default: the tiny shapes cost per operator, not per FLOP, and one thread does not fight
# other work on a shared machine for cores (with 2 threads on 2 busy cores the timings scatter tenfold).
CPU_THREADS = 1


def mode_settings(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """`WanPipeline.generate` settings of one mode."""
    if mode == "few-step":
        return RECIPE.settings()
    plain = {"steps": args.steps, "guide_scale": args.guide_scale, "shift": args.shift, "solver": args.solver}
    return plain if mode == "baseline" else {**plain, "cache": f"{mode}:{DEFAULT_THRESHOLDS[mode]:g}"}


def build_pipeline(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[WanPipeline, str]:
    """(the pipeline, a description of its text encoder)."""
    if args.text_encoder == "narrow":
        from gpu_generate import random_pipeline

        pipe = random_pipeline(args.preset, device, seed=args.seed, dtype=dtype)
        params = sum(p.numel() for p in pipe.text_encoder.model.parameters())
        return pipe, (
            f"narrow random umT5 ({params / 1e9:.2f}B params: the real width, 2 layers, as gpu_generate.py "
            "--narrow-text-encoder); DiT filled by gpu_step.build_random"
        )
    pipe = WanPipeline.from_config(args.preset, seed=args.seed, device=device, dtype=dtype)
    params = sum(p.numel() for p in pipe.text_encoder.model.parameters())
    return pipe, f"the preset's random umT5 as from_config builds it ({params / 1e6:.2f}M params)"


class ForwardCounter:
    """Counts the calls of a module (a forward pre-hook) and the samples they carried (the batch)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = self.samples = 0
        self.handle = module.register_forward_pre_hook(self._seen)

    def _seen(self, module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        self.calls += 1
        x = inputs[0] if inputs else None
        self.samples += x.shape[0] if isinstance(x, torch.Tensor) else len(x) if isinstance(x, list) else 1

    def reset(self) -> None:
        self.calls = self.samples = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _psnr(mse: float) -> float | None:
    """dB, for pixels in [0, 1]; None for identical videos."""
    return None if mse == 0 else round(10 * math.log10(1 / mse), 2)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-t2v")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 GPU, fp32 CPU")
    p.add_argument("--size", default=None, help="W*H (default: the preset's: 64*48 tiny, 832*480 1.3B)")
    p.add_argument("--frame-num", "--frame_num", type=int, default=None,
                   help=f"frames (default: the preset's when tiny, else {FULL_FRAME_NUM})")  # fmt: skip
    p.add_argument("--steps", type=int, default=50, help="steps of the baseline and the caches")
    p.add_argument("--guide-scale", type=float, default=5.0, help="CFG scale of the baseline and the caches")
    p.add_argument("--shift", type=float, default=None, help="default: the preset's for the size")
    p.add_argument("--solver", default=None, help="default: the preset's (unipc)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed videos per mode: median ({TINY_REPEATS} tiny, {FULL_REPEATS})")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of each mode's warm-up (0: none)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    p.add_argument("--text-encoder", choices=["auto", "preset", "narrow"], default="auto",
                   help="auto: the preset's on tiny presets, narrow on full-size ones")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch's CPU threads (default {CPU_THREADS} for tiny presets on CPU)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        p.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    args.modes = [m for m in MODES if m in modes]  # the baseline first: the others are compared with it
    tiny = get_preset(args.preset).tiny
    if args.text_encoder == "auto":
        args.text_encoder = "preset" if tiny else "narrow"
    if args.frame_num is None:
        args.frame_num = get_preset(args.preset).sampling.frame_num if tiny else FULL_FRAME_NUM
    if args.repeats is None:
        args.repeats = TINY_REPEATS if tiny else FULL_REPEATS
    if args.threads is None and tiny and torch.device(args.device).type == "cpu":
        args.threads = CPU_THREADS
    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (`argv`: its command line, default `sys.argv[1:]`); prints, and returns the JSON."""
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _run(args, device, dtype)
    finally:
        torch.set_num_threads(threads)  # as it was (the GPU suite runs more in this process)


def _run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    start = time.perf_counter()
    pipe, text_encoder = build_pipeline(args, device, dtype)
    build_s = time.perf_counter() - start
    size = parse_size(args.size) if args.size else pipe.preset.sampling.size
    frames = args.frame_num
    shape = latent_shape(frames, size[0], size[1], pipe.vae.z_dim, pipe.vae.stride)  # [16, T, h, w]
    patch = pipe.dit.cfg.patch_size
    tokens = math.prod(n // p for n, p in zip(shape[1:], patch, strict=True))
    settings = {mode: mode_settings(mode, args) for mode in args.modes}
    lora = None
    if "few-step" in args.modes:
        sd = random_lora_state_dict(pipe.dit, rank=LORA_RANK, seed=LORA_SEED)
        lora = LoraSet.of((lora_from_state_dict(sd, name="random stand-in for a distilled LoRA"), 1.0))
    counter = ForwardCounter(pipe.dit)

    def generate(mode: str, steps: int | None = None) -> torch.Tensor:
        """One video of `mode` ([3, F, H, W] in [-1, 1]); `steps` replaces its steps (the warm-up)."""
        pipe.use_loras(lora if mode == "few-step" else None)  # outside the timing: merged once per switch
        given = {**settings[mode], **({"steps": steps} if steps else {})}
        with torch.no_grad():
            return pipe.generate(args.prompt, seed=args.seed, size=size, frame_num=frames, progress=False,
                                 batch_cfg=True, **given)  # fmt: skip

    cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"fast_modes: {args.preset} {size[0]}x{size[1]}x{frames} (latents {list(shape)}, {tokens} tokens) "
          f"on {device_name} ({str(dtype).removeprefix('torch.')}); built in {build_s:.1f} s; text encoder: "
          f"{text_encoder}", file=sys.stderr)  # fmt: skip
    if args.warmup_steps > 0:  # kernels chosen, allocator grown, RoPE tables made: at each mode's shapes
        begin = time.perf_counter()
        for mode in args.modes:
            generate(mode, min(args.warmup_steps, settings[mode]["steps"]))
        warm_s = time.perf_counter() - begin
        print(f"warm-up ({args.warmup_steps} steps a mode): {warm_s:.1f} s", file=sys.stderr)

    samples: dict[str, list[float]] = {mode: [] for mode in args.modes}
    counts: dict[str, dict[str, Any]] = {}
    videos: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):  # the modes alternate, so drift in the machine's load hits all alike
        for mode in args.modes:
            pipe.use_loras(lora if mode == "few-step" else None)
            counter.reset()
            _sync(device)
            begin = time.perf_counter()
            video = generate(mode)
            _sync(device)
            samples[mode].append(time.perf_counter() - begin)
            cache = pipe.last_cache_counts
            row = {
                "dit_forwards": counter.calls,
                "dit_batch": counter.samples // max(counter.calls, 1),
                "dit_forwards_skipped": cache.skipped if cache else 0,
                "cache_counts": cache.as_dict() if cache else None,
            }
            if counts.setdefault(mode, row) != row:  # the same seed and settings: the same decisions
                counts[mode]["varied_between_repeats"] = True
            videos.setdefault(mode, video.float().cpu())
    counter.handle.remove()
    pipe.use_loras(None)

    base_seconds = statistics.median(samples["baseline"]) if "baseline" in samples else None
    base_video = videos.get("baseline")
    rows: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        seconds = statistics.median(samples[mode])
        row: dict[str, Any] = {"settings": {k: v for k, v in settings[mode].items() if v is not None},
                               **counts[mode]}  # fmt: skip
        row["effective_full_forwards"] = row["dit_forwards"] - row["dit_forwards_skipped"]
        row["seconds"] = round(seconds, 4)
        row["seconds_samples"] = [round(s, 4) for s in samples[mode]]
        row["speedup_vs_baseline"] = round(base_seconds / seconds, 3) if base_seconds else None
        if base_video is not None:
            diff = (videos[mode] - base_video).abs() / 2  # pixels in [0, 1]
            row["max_abs_diff_vs_baseline"] = diff.max().item()
            row["mean_abs_diff_vs_baseline"] = diff.mean().item()
            row["psnr_vs_baseline_db"] = _psnr(diff.square().mean().item())
        if mode == "few-step":
            row["lora"] = (f"random LoRA (rank {LORA_RANK}, self-attention q/k/v/o, strength 1, seed "
                           f"{LORA_SEED}) merged with use_loras, standing in for a step/CFG-distilled LoRA; "
                           "its pixel difference from the baseline includes the LoRA's")  # fmt: skip
            row["recipe"] = RECIPE.about
        if mode in ("fbcache", "magcache"):
            row["threshold"] = DEFAULT_THRESHOLDS[mode]
        rows[mode] = row

    result: dict[str, Any] = {
        "benchmark": "fast_modes",
        "preset": args.preset,
        "device": str(device),
        "device_name": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "size": list(size),
        "frame_num": frames,
        "latent_shape": list(shape),
        "tokens": tokens,
        "steps": args.steps,
        "guide_scale": args.guide_scale,
        "batch_cfg": True,
        "seed": args.seed,
        "repeats": args.repeats,
        "warmup_steps": args.warmup_steps,
        "text_encoder": text_encoder,
        "build_s": round(build_s, 1),
        "modes": rows,
        "diff_units": "pixels in [0, 1]; the same seed and prompt as the baseline",
        "weights": "random: the steps a cache skips depend on the weights, so its forwards and pixel cost "
        "are not the trained model's; the baseline's and the few-step recipe's forwards are",
    }
    if not cuda:
        result["note"] = "CPU run: seconds show the script works and the relative costs, not GPU figures"
    if not get_preset(args.preset).tiny and frames != pipe.preset.sampling.frame_num:
        full = pipe.preset.sampling.frame_num
        result["note_shapes"] = (f"{frames} frames, not the preset's {full}, to keep the run short"
                                 ": seconds per video scale up at the full length")  # fmt: skip

    print(f"{'mode':<10} {'steps':>5} {'cfg':>4} {'calls':>6} {'batch':>5} {'skipped':>7} {'full':>5} "
          f"{'s/video':>8} {'speed-up':>8} {'max|d|':>8} {'mean|d|':>8}", file=sys.stderr)  # fmt: skip
    for mode, row in rows.items():
        s = row["settings"]
        speedup = f"{row['speedup_vs_baseline']:.2f}x" if row["speedup_vs_baseline"] else "-"
        dmax = f"{row['max_abs_diff_vs_baseline']:.4f}" if "max_abs_diff_vs_baseline" in row else "-"
        dmean = f"{row['mean_abs_diff_vs_baseline']:.4f}" if "mean_abs_diff_vs_baseline" in row else "-"
        print(f"{mode:<10} {s['steps']:>5} {s['guide_scale']:>4g} {row['dit_forwards']:>6} "
              f"{row['dit_batch']:>5} {row['dit_forwards_skipped']:>7} {row['effective_full_forwards']:>5} "
              f"{row['seconds']:>8.3f} {speedup:>8} {dmax:>8} {dmean:>8}", file=sys.stderr)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    emit(result)
    return result


if __name__ == "__main__":
    main()
