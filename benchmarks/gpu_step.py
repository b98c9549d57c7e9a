"""One DiT forward on one GPU: seconds, achieved TFLOP/s, share of the GPU's bf16 peak, peak memory.

    python benchmarks/gpu_step.py                 # GPU: t2v-1.3B at 480P and t2v-14B at 720P, bf16
    python benchmarks/gpu_step.py --device cpu    # CPU: each model's width, 2 blocks, grid 3x16x24, fp32

Random weights, batch 1 (`--batch 2`: the conditional and unconditional passes in one forward, as the
pipeline samples with CFG). Full sizes on a GPU: t2v-1.3B at 832x480x81 (latents [16, 21, 60, 104],
32,760 tokens) and t2v-14B at 1280x720x81 ([16, 21, 90, 160], 75,600 tokens), in bf16 with the time
path and modulation in float32 (`WanModel.cast`, as the pipeline runs). The model is built on the
meta device and materialised on the target device (no slow CPU init; the 14B is ~28.6 GB in bf16),
then filled in place: normal(0, 0.02) everywhere except norms (weights 1, biases 0).

Seconds: the median of `--repeats` forwards after `--warmup` ones, each between `torch.cuda.synchronize`
calls. FLOPs are counted from the config (`forward_flops`: matmuls only, 2 per multiply-add) and
divided by that median. The dense bf16 peak of the GPU is looked up by device name (`PEAK_BF16_TFLOPS`,
vendor datasheet figures without sparsity: assumptions, override with `--peak-tflops`). Peak memory:
`torch.cuda.max_memory_allocated` over one forward, weights included. On the CPU the shapes are cut
down (see `--layers`, `--grid`) and the figures are GFLOP/s of this CPU, not a GPU prediction.

`--compile` compiles each block (`nn.Module.compile`) during the warm-up (give it `--warmup 3`); inductor
does not generate code for the complex-number RoPE product, which stays an eager op inside the graph.

Prints one summary line per model, then one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import time
from typing import Any

import torch
from common import emit, peak_memory

from wan.configs import DiTConfig, get_preset
from wan.model import WanModel

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets. Assumptions: the
# clock a given card sustains may be lower. First match wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.4),  # SXM (HBM3)
    (("H200",), 989.4),
    (("A100",), 312.0),
    (("L40S",), 362.0),
    (("4090",), 165.2),
)

# Which preset each model name means, and the latent grid [T, H, W] of its full-size benchmark video.
MODELS: dict[str, tuple[str, tuple[int, int, int], str]] = {
    "1.3B": ("t2v-1.3B", (21, 60, 104), "832x480x81"),
    "14B": ("t2v-14B", (21, 90, 160), "1280x720x81"),
}
CPU_GRID = (3, 16, 24)
CPU_LAYERS = 2


def peak_tflops_for(name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None when not in the table."""
    upper = name.upper()
    for keys, tflops in PEAK_BF16_TFLOPS:
        if all(k in upper for k in keys):
            return tflops
    return None


def forward_flops(cfg: DiTConfig, grid: tuple[int, int, int], batch: int = 1) -> dict[str, int]:
    """FLOPs of one `WanModel` forward (2 per multiply-add), matrix products only, by part.

    grid: latent [T, H, W]; L = tokens after the (1, 2, 2) patch; Lc = text_len (512) context tokens;
    d = dim, f = ffn_dim. Per block (times `num_layers`):
      self_attn_proj  q, k, v, o on L tokens:                  4 * 2 L d^2
      self_attn_core  QK^T and PV over L x L:                  2 * 2 L^2 d
      cross_attn_proj q and o on L tokens:                     2 * 2 L d^2
      cross_attn_kv   k and v on the Lc (already embedded) text tokens: 2 * 2 Lc d^2
      cross_attn_core QK^T and PV over L x Lc:                 2 * 2 L Lc d
      ffn             d -> f -> d on L tokens:                 2 * 2 L d f
    Once: patch embedding (a Conv3d = a linear in_dim*prod(patch) -> d per token), text embedding
    (text_dim -> d -> d on Lc tokens), time embedding and projection (freq_dim -> d -> d -> 6d, one row
    per sample) and the head (d -> prod(patch)*out_dim per token). Norms, RoPE, softmax and the
    elementwise modulation are left out (a few per cent of the memory traffic, ~0 of the FLOPs).
    Every figure is multiplied by `batch`.
    """
    t, h, w = grid
    pt, ph, pw = cfg.patch_size
    patch = pt * ph * pw
    tokens = (t // pt) * (h // ph) * (w // pw)
    d, lc = cfg.dim, cfg.text_len
    per_block = {
        "self_attn_proj": 8 * tokens * d * d,
        "self_attn_core": 4 * tokens * tokens * d,
        "cross_attn_proj": 4 * tokens * d * d,
        "cross_attn_kv": 4 * lc * d * d,
        "cross_attn_core": 4 * tokens * lc * d,
        "ffn": 4 * tokens * d * cfg.ffn_dim,
    }
    out = {k: v * cfg.num_layers for k, v in per_block.items()}
    out["embeddings"] = (
        2 * tokens * cfg.in_dim * patch * d
        + 2 * lc * (cfg.text_dim * d + d * d)
        + 2 * (cfg.freq_dim * d + d * d + d * 6 * d)
    )
    out["head"] = 2 * tokens * d * patch * cfg.out_dim
    return {k: v * batch for k, v in out.items()}


def build_random(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanModel:
    """A `WanModel` straight on `device`, cast like the pipeline's (`WanModel.cast`), with random weights.

    Built on the meta device (no allocation, no init), materialised with `to_empty`, then filled in place
    from a generator on `device`: norm weights 1 and norm biases 0 (LayerNorm `norm3`, the q/k RMSNorms),
    every other parameter normal(0, 0.02) (matrices, biases, the [1, 6, C] modulation tables).
    """
    with torch.device("meta"):
        model = WanModel(cfg)
    model = model.cast(dtype).to_empty(device=device).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    key: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Time one forward of the model `key` ("1.3B" or "14B"); returns its JSON row."""
    preset, full_grid, video = MODELS[key]
    cpu = device.type == "cpu"
    base = get_preset(preset).dit
    layers = args.layers or (CPU_LAYERS if cpu else base.num_layers)
    cfg = dataclasses.replace(base, num_layers=layers)
    grid = tuple(int(n) for n in args.grid.split(",")) if args.grid else (CPU_GRID if cpu else full_grid)
    if len(grid) != 3:
        raise SystemExit(f"--grid must be T,H,W latent sizes, got {args.grid!r}")
    flops = forward_flops(cfg, grid, args.batch)
    total_flops = sum(flops.values())
    tokens = math.prod(grid) // math.prod(cfg.patch_size)

    start = time.perf_counter()
    model = build_random(cfg, device, dtype, seed=args.seed)
    _sync(device)
    build_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    if args.compile:
        for block in model.blocks:
            block.compile()

    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(args.batch, cfg.in_dim, *grid, generator=g, device=device)  # [B, 16, T, H, W]
    t = torch.full((args.batch,), 937.0, device=device)  # [B] timesteps (sigma * 1000)
    ctx = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=g, device=device).to(dtype)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x, t, ctx)  # [B, 16, T, H, W] float32

    start = time.perf_counter()
    for _ in range(args.warmup):  # kernel choice, allocator growth, RoPE table, torch.compile
        forward()
    _sync(device)
    warmup_s = time.perf_counter() - start
    out, peak = peak_memory(forward, device)
    finite = bool(torch.isfinite(out).all())
    del out
    samples = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        forward()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    seconds = statistics.median(samples)

    achieved = total_flops / seconds / 1e12
    row: dict[str, Any] = {
        "model": key,
        "preset": preset,
        "layers": layers,
        "full_layers": base.num_layers,
        "params": params,
        "video": video if grid == full_grid else None,
        "latent_grid": [cfg.in_dim, *grid],
        "tokens": tokens,
        "batch": args.batch,
        "seconds": round(seconds, 5),
        "seconds_min": round(min(samples), 5),
        "seconds_max": round(max(samples), 5),
        "flops": total_flops,
        "flops_by_part": flops,
        "attention_flop_share": round(flops["self_attn_core"] / total_flops, 4),
        "tflops_per_s": round(achieved, 3),
        "gflops_per_s": round(achieved * 1e3, 2),
        "peak_fraction": round(achieved / args.peak, 4) if args.peak else None,
        "peak_bytes": peak,
        "weight_bytes": weight_bytes,
        "build_s": round(build_s, 3),
        "warmup_s": round(warmup_s, 3),
        "output_finite": finite,
    }
    shape = f"{layers}/{base.num_layers} blocks, grid {list(grid)}, {tokens:,} tokens x batch {args.batch}"
    rate = f"{achieved:.1f} TFLOP/s" if not cpu else f"{achieved * 1e3:.1f} GFLOP/s"
    share = f" = {row['peak_fraction']:.1%} of {args.peak} peak" if args.peak else ""
    mem = "GPU peak" if device.type == "cuda" else "peak RSS"
    print(
        f"{preset} ({shape}): {seconds:.4f} s/forward (median of {args.repeats}), "
        f"{total_flops / 1e12:.2f} TFLOP -> {rate}{share}; {mem} {peak / 2**30:.2f} GiB "
        f"(weights {weight_bytes / 2**30:.2f} GiB)"
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1.3B,14B", help="comma-separated: 1.3B (480P), 14B (720P)")
    p.add_argument("--batch", type=int, default=1, help="2: CFG's two passes in one forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, else fp32")
    p.add_argument(
        "--layers", type=int, default=None, help=f"blocks (default: all on a GPU, {CPU_LAYERS} on CPU)"
    )
    p.add_argument(
        "--grid", default=None, help="latent T,H,W (default: the model's video on a GPU, 3,16,24 on the CPU)"
    )
    p.add_argument("--warmup", type=int, default=None, help="forwards before timing (default 2 GPU, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards (default 5 GPU, 3 CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (warm-up compiles)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("fp32" if cpu else "bf16")]
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if cpu else 5)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        table_peak = peak_tflops_for(device_name)
    else:
        device_name, table_peak = "cpu", None
    args.peak = args.peak_tflops or table_peak
    if device.type == "cuda" and args.peak is None:
        print(f"no bf16 peak known for {device_name!r}: pass --peak-tflops for the peak fraction")
    print(
        f"DiT forward on {device_name} ({str(dtype).removeprefix('torch.')}), batch {args.batch}, "
        f"warm-up {args.warmup}, median of {args.repeats}"
        + (", torch.compile per block" if args.compile else "")
    )
    if cpu:
        print("CPU run: reduced shapes in fp32; the rates are this CPU's, not a GPU figure")

    rows = []
    for key in keys:
        rows.append(bench_model(key, args, device, dtype))
        gc.collect()  # the model went out of scope with bench_model: hand its memory back
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result: dict[str, Any] = {
        "benchmark": "gpu_step",
        "device": str(device),
        "device_name": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "compile": args.compile,
        "peak_tflops": args.peak,
        "peak_tflops_source": "--peak-tflops"
        if args.peak_tflops
        else ("datasheet table (assumption)" if table_peak else None),
        "peak_table_tflops": {" ".join(k): v for k, v in PEAK_BF16_TFLOPS},
        "flop_count": "matmuls only, 2 per multiply-add (see forward_flops)",
        "models": {row["model"]: row for row in rows},
        "torch": torch.__version__,
    }
    if cpu:
        result["note"] = "CPU run on reduced shapes (fp32): GFLOP/s of this CPU, not a GPU figure"
    emit(result)


if __name__ == "__main__":
    main()
