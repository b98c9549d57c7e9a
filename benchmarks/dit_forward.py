"""DiT forward: ours against diffusers' WanTransformer3DModel, same weights and inputs, one process.

    python benchmarks/dit_forward.py                       # CPU: 1.3B width, 2 blocks, small video
    python benchmarks/dit_forward.py --device cuda --layers 30 --frames 21 --height 60 --width 104

Prints a summary, then one JSON object (seconds each, ratio ours/diffusers, peak memory each).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

import torch
from common import emit, interleaved_times, peak_memory

from wan.configs import get_preset
from wan.dit_keys import diffusers_transformer_config, dit_state_dict_to_diffusers
from wan.model import WanModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="t2v-1.3B")
    p.add_argument("--layers", type=int, default=2, help="blocks (the full 1.3B has 30)")
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--height", type=int, default=30, help="latent rows")
    p.add_argument("--width", type=int, default=52, help="latent columns")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    args = p.parse_args()

    from diffusers import WanTransformer3DModel

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset(args.preset).dit, num_layers=args.layers)
    ours = WanModel(cfg).eval().requires_grad_(False)
    ref = WanTransformer3DModel(**diffusers_transformer_config(cfg)).eval().requires_grad_(False)
    ref.load_state_dict(dit_state_dict_to_diffusers(ours.state_dict()))
    ours.to(device, dtype)
    ref.to(device, dtype)
    gc.collect()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_dim, args.frames, args.height, args.width, generator=g).to(
        device, dtype
    )
    ctx = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype)
    t = torch.full((args.batch,), 937, device=device)

    def run_ours():
        with torch.no_grad():
            return ours(x, t, ctx)

    def run_ref():
        with torch.no_grad():
            return ref(x, t, ctx, return_dict=False)[0]

    out_ours, peak_ours = peak_memory(run_ours, device)
    out_ref, peak_ref = peak_memory(run_ref, device)
    diff = (out_ours.float() - out_ref.float()).abs().max().item()
    times = interleaved_times({"ours": run_ours, "diffusers": run_ref}, args.repeats, device)
    tokens = args.frames * args.height * args.width // 4
    result = {
        "benchmark": "dit_forward",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "preset": args.preset,
        "layers": args.layers,
        "tokens": tokens,
        "batch": args.batch,
        "seconds_ours": round(times["ours"], 4),
        "seconds_diffusers": round(times["diffusers"], 4),
        "time_ratio": round(times["ours"] / times["diffusers"], 3),
        "peak_bytes_ours": peak_ours,
        "peak_bytes_diffusers": peak_ref,
        "max_abs_diff": diff,
        "torch": torch.__version__,
    }
    print(
        f"DiT forward, {tokens} tokens x {args.layers} blocks on {device} ({result['dtype']}): "
        f"ours {times['ours']:.3f}s, diffusers {times['diffusers']:.3f}s, ratio {result['time_ratio']}"
    )
    emit(result)


if __name__ == "__main__":
    main()
