"""VAE decode: our streaming `decode_stream` against diffusers' `AutoencoderKLWan.decode`, one process.

    python benchmarks/vae_decode.py                         # CPU: 3 latent frames of 64x96 pixels
    python benchmarks/vae_decode.py --device cuda --latent-frames 21 --height 480 --width 832

Both models are the full-size architecture with the same random weights and decode the same latents.
Our chunks are consumed and dropped as they come (what the pipeline does with them), diffusers
returns the whole video. Memory: the peak growth of our decode above what was held before it, for
the video and for one 4x longer; streaming should keep the two equal. On the CPU the allocator is set
to hand big blocks back to the OS (see `common.allocator_returns_memory`) for both models' runs alike.

Prints a summary, then one JSON object: seconds each, ratio ours/diffusers, peak bytes short/long.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch
from common import allocator_returns_memory, emit, interleaved_times, peak_memory, rss_now, vae_twins


def peak_growth(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes `fn` needed above what was held before it.

    CPU: the kernel's own RSS high-water mark (VmHWM, reset through /proc/self/clear_refs by
    `common.peak_memory`) minus the RSS just before, so no short-lived peak is missed the way a
    sampling thread could miss it; tracemalloc would not see torch's allocations at all.
    CUDA: the caching allocator's peak minus what was allocated before.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    else:
        allocator_returns_memory()
        before = rss_now()
    _, peak = peak_memory(fn, device)
    return peak - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent-frames", type=int, default=3, help="latent frames of the short video")
    p.add_argument("--height", type=int, default=64, help="pixel rows (multiple of 8)")
    p.add_argument("--width", type=int, default=96, help="pixel columns (multiple of 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        allocator_returns_memory()  # before anything is allocated, or early frees stay on the heap
    ours, ref = vae_twins(0)
    g = torch.Generator().manual_seed(2)  # the latents
    ours.to(device)
    ref.to(device)

    h, w = args.height // 8, args.width // 8
    short = torch.randn(1, 16, args.latent_frames, h, w, generator=g).to(device)
    long = torch.randn(1, 16, 4 * args.latent_frames, h, w, generator=g).to(device)
    mean = torch.tensor(ref.config.latents_mean, device=device).view(1, 16, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std, device=device).view(1, 16, 1, 1, 1)

    def run_ours(z: torch.Tensor = short) -> None:
        with torch.no_grad():
            for chunk in ours.decode_stream(z):
                del chunk

    def run_ref() -> None:
        with torch.no_grad():
            ref.decode(short * std + mean)

    with torch.no_grad():  # warm-up (kernel selection, first-touch allocations) and a parity check
        warm = short[:, :, :2]
        diff = (ours.decode(warm) - ref.decode(warm * std + mean).sample).abs().max().item()
    # Memory first, before diffusers' full-video tensors have fragmented the heap; the smaller of two
    # runs, since allocator noise (fragmentation, per-thread arenas) only ever adds to a peak.
    peak_short = min(peak_growth(run_ours, device) for _ in range(2))
    peak_long = min(peak_growth(lambda: run_ours(long), device) for _ in range(2))
    times = interleaved_times({"ours": run_ours, "diffusers": run_ref}, args.repeats, device)

    frames = 1 + 4 * (args.latent_frames - 1)
    result = {
        "benchmark": "vae_decode",
        "device": str(device),
        "ours": "wan.vae.WanVAE.decode_stream",
        "reference": "diffusers.AutoencoderKLWan.decode",
        "latents_short": [16, args.latent_frames, h, w],
        "latents_long": [16, 4 * args.latent_frames, h, w],
        "seconds_ours": round(times["ours"], 4),
        "seconds_diffusers": round(times["diffusers"], 4),
        "time_ratio": round(times["ours"] / times["diffusers"], 3),
        "peak_bytes_short": peak_short,
        "peak_bytes_long": peak_long,
        "peak_ratio": round(peak_long / peak_short, 3),
        "max_abs_diff": diff,
        "torch": torch.__version__,
    }
    print(
        f"VAE decode, {frames} frames of {args.width}x{args.height} on {device}, median of {args.repeats}: "
        f"ours {times['ours']:.2f}s, diffusers {times['diffusers']:.2f}s, ratio {result['time_ratio']}\n"
        f"peak growth of ours: {peak_short / 2**20:.1f} MiB for {args.latent_frames} latent frames, "
        f"{peak_long / 2**20:.1f} MiB for {4 * args.latent_frames} (ratio {result['peak_ratio']}); "
        f"max |ours - diffusers| on the warm-up {diff:.2e}"
    )
    emit(result)


if __name__ == "__main__":
    main()
