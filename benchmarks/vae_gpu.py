"""VAE decode of a whole 81-frame video: ours (whole frames, and tiled) against diffusers' `AutoencoderKLWan`.

    python benchmarks/vae_gpu.py               # GPU: latents [1,16,21,60,104] (480P), [1,16,21,90,160] (720P)
    python benchmarks/vae_gpu.py --device cpu  # CPU: reduced latents [1, 16, 3, 8, 12], tiles of 6:2 cells

Both are the full-size Wan 2.1 VAE in float32 (as the pipelines run it) with the same random weights (the
RMSNorm gammas and the attention output projection made non-trivial, as in `vae_decode.py`) and decode
the same normalised latents (diffusers gets them de-normalised with the same per-channel statistics, as
its pipeline hands them over). Variants:
- ours: `WanVAE.decode(latents)`, whole frames (exact);
- ours_tiled: `WanVAE.decode(latents, VAETiling(tile, overlap))` (default 32:8 latent cells = 256 px tiles
  every 192 px; blended seams, close to but not equal to the whole-frame decode);
- diffusers: `AutoencoderKLWan.decode`, its tiling off (its default);
- diffusers_tiled (`--diffusers-tiling`): `enable_tiling` with the same tile and stride in pixels.

Each decode is timed between CUDA syncs after one warm-up decode of two latent frames per variant; with
`--repeats` > 1 the variants alternate and the medians are reported. Only the running model sits on the
GPU (the other waits on the CPU), so each peak (`torch.cuda.max_memory_allocated`) is its own weights,
activations and output video. On the CPU the peaks are the growth of process RSS and the shapes are cut
down: the figures only show that the script works.

Prints a summary, then one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import allocator_returns_memory, emit, measure, vae_twins

from wan.pipeline import parse_vae_tiling
from wan.vae import VAETiling

# Latent [h, w] of each video size (81 frames -> 21 latent frames); "reduced" is the CPU stand-in.
CASES: dict[str, tuple[int, int]] = {"480P": (60, 104), "720P": (90, 160), "reduced": (8, 12)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated of {', '.join(CASES)} (default: 480P,720P GPU; reduced CPU)",
    )
    p.add_argument("--latent-frames", type=int, default=None, help="default: 21 (81 frames) GPU, 3 CPU")
    p.add_argument(
        "--tiling", default=None, help="our tiles TILE:OVERLAP in latent cells (default 32:8 GPU, 6:2 CPU)"
    )
    p.add_argument(
        "--diffusers-tiling", action="store_true", help="also diffusers with tiling on, same tiles"
    )
    p.add_argument("--repeats", type=int, default=1, help="timed decodes per variant, alternating")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        allocator_returns_memory()  # before the big allocations, or early frees stay on the heap
    cases = [c.strip() for c in (args.cases or ("480P,720P" if gpu else "reduced")).split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    frames = args.latent_frames or (21 if gpu else 3)
    tiling = parse_vae_tiling(args.tiling or ("32:8" if gpu else "6:2"))
    assert isinstance(tiling, VAETiling)
    device_name = torch.cuda.get_device_name(device) if gpu else "cpu"

    ours, ref = vae_twins(args.seed)
    homes = {"ours": ours, "ours_tiled": ours, "diffusers": ref, "diffusers_tiled": ref}

    def place(active: str) -> None:
        """The running variant's model on the device, the other one on the CPU."""
        model = homes[active]
        (ref if model is ours else ours).to("cpu")
        model.to(device)
        if gpu:
            gc.collect()
            torch.cuda.empty_cache()

    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    sh = sw = 8
    print(
        f"VAE decode on {device_name} (float32), {frames} latent frames -> {1 + 4 * (frames - 1)} frames; "
        f"our tiles {tiling.tile}:{tiling.overlap} cells; median of {args.repeats}"
    )
    rows: dict[str, dict[str, Any]] = {}
    for case in cases:
        h, w = CASES[case]
        g = torch.Generator().manual_seed(args.seed + 2)
        z = torch.randn(1, 16, frames, h, w, generator=g)  # normalised latents [1, 16, T, h, w]
        z_ours, z_ref = z.to(device), (z * std + mean).to(device)  # diffusers takes them de-normalised

        def decoders(zo: torch.Tensor, zr: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
            """Each variant: () -> video [1, 3, 1 + 4(T-1), 8h, 8w] in [-1, 1]."""
            fns = {
                "ours": lambda: ours.decode(zo),
                "ours_tiled": lambda: ours.decode(zo, tiling),
                "diffusers": lambda: ref.decode(zr).sample,
            }
            if args.diffusers_tiling:
                fns["diffusers_tiled"] = lambda: ref.decode(zr).sample
            return fns

        def run(name: str, fn: Callable[[], torch.Tensor]) -> dict[str, Any]:
            place(name)
            if name == "diffusers_tiled":
                ref.enable_tiling(
                    tile_sample_min_height=tiling.tile * sh,
                    tile_sample_min_width=tiling.tile * sw,
                    tile_sample_stride_height=(tiling.tile - tiling.overlap) * sh,
                    tile_sample_stride_width=(tiling.tile - tiling.overlap) * sw,
                )
            try:
                with torch.no_grad():
                    return measure(fn, device)
            finally:
                ref.disable_tiling()

        start = time.perf_counter()
        for name, fn in decoders(z_ours[:, :, :2], z_ref[:, :, :2]).items():  # warm-up: 2 latent frames
            run(name, fn)
        warmup_s = time.perf_counter() - start
        samples: dict[str, list[dict[str, Any]]] = {}
        videos: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name, fn in decoders(z_ours, z_ref).items():
                sample = run(name, fn)
                videos.setdefault(name, sample.pop("video"))
                sample["seconds"] = round(sample["seconds"], 4)
                samples.setdefault(name, []).append(sample)
        seconds = {n: statistics.median(r["seconds"] for r in s) for n, s in samples.items()}
        peak = {n: max(r["peak"] for r in s) for n, s in samples.items()}
        above = {n: max(r["above_start"] for r in s) for n, s in samples.items()}
        diff = (videos["ours"] - videos["diffusers"]).abs().max().item()
        tiled_diff = (videos["ours_tiled"] - videos["ours"]).abs().max().item()
        row: dict[str, Any] = {
            "latents": [1, 16, frames, h, w],
            "video": [1, 3, 1 + 4 * (frames - 1), h * sh, w * sw],
            "tiles": len(tiling.starts(h)) * len(tiling.starts(w)),
            "seconds": {n: round(s, 4) for n, s in seconds.items()},
            "peak_bytes": peak,
            "peak_above_start_bytes": above,
            "time_ratio_ours_vs_diffusers": round(seconds["ours"] / seconds["diffusers"], 4),
            "time_ratio_tiled_vs_diffusers": round(seconds["ours_tiled"] / seconds["diffusers"], 4),
            "peak_ratio_ours_vs_diffusers": round(peak["ours"] / peak["diffusers"], 4),
            "peak_ratio_tiled_vs_diffusers": round(peak["ours_tiled"] / peak["diffusers"], 4),
            "max_abs_diff_ours_vs_diffusers": diff,
            "max_abs_diff_tiled_vs_whole": tiled_diff,
            "warmup_s": round(warmup_s, 2),
            "samples": samples,
        }
        if "diffusers_tiled" in videos:
            row["max_abs_diff_diffusers_tiled_vs_whole"] = (
                (videos["diffusers_tiled"] - videos["diffusers"]).abs().max().item()
            )
        rows[case] = row
        del videos, z_ours, z_ref
        mem = "GPU peak" if gpu else "peak RSS growth"
        shown = peak if gpu else above
        print(
            f"{case} latents {row['latents']} -> video {row['video'][2:]}: "
            + ", ".join(f"{n} {seconds[n]:.2f} s / {shown[n] / 2**30:.2f} GiB" for n in seconds)
            + f" ({mem}); ours/diffusers time {row['time_ratio_ours_vs_diffusers']}, "
            f"max |ours - diffusers| {diff:.2e}, max |tiled - whole| {tiled_diff:.2e}"
        )

    result: dict[str, Any] = {
        "benchmark": "vae_gpu",
        "device": str(device),
        "device_name": device_name,
        "dtype": "float32",
        "ours": "wan.vae.WanVAE.decode",
        "reference": "diffusers.AutoencoderKLWan.decode",
        "tiling": f"{tiling.tile}:{tiling.overlap}",
        "diffusers_tiling": args.diffusers_tiling,
        "repeats": args.repeats,
        "cases": rows,
        "torch": torch.__version__,
    }
    if not gpu:
        result["note"] = (
            "CPU run on reduced latents with small tiles: peaks are process RSS (peak_above_start_bytes: the "
            "growth during the decode); not a GPU figure"
        )
    emit(result)


if __name__ == "__main__":
    main()
