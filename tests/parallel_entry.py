"""Run under torchrun by `test_parallel_generate.py`: whole tiny generations with each parallel layout.

    torchrun --standalone --nproc_per_node 4 tests/parallel_entry.py --out DIR --case NAME [--case ...]

Every case builds the seeded tiny pipeline (the same weights the test's single process uses), spreads it
with `WanPipeline.parallelize` and streams one video with CFG on. Rank 0 saves the uint8
frames and the ZeRO-3 partition shares to DIR/NAME.pt; the other ranks check they got no frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from wan.distributed.parallel import ParallelConfig, init_distributed
from wan.pipeline import WanPipeline

SETTINGS = dict(size=(64, 48), frame_num=9, sampling_steps=6, guide_scale=5.0)
PROMPT = "a red fox runs through snow"
SEED = 11

# name -> (preset, ulysses, ring, cfg_parallel, zero3)
CASES = {
    "cp-2x2": ("tiny-t2v", 2, 2, False, False),
    "zero3": ("tiny-t2v", 1, 1, False, True),
    "cfg": ("tiny-t2v", 1, 1, True, False),
    "all": ("tiny-t2v", 2, 1, True, True),
    "i2v-all": ("tiny-i2v", 1, 2, True, True),
}


def picture(width: int = 80, height: int = 48) -> np.ndarray:
    """A smooth uint8 test picture [H, W, 3] (gradients)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx / width * 255, yy / height * 255, (xx + yy) % 64 * 4.0], axis=-1).astype(np.uint8)


def generate(pipe: WanPipeline) -> torch.Tensor:
    """The case's video as uint8 [F, H, W, 3] (empty [0] on ranks that do not decode)."""
    image = picture() if pipe.takes_images else None
    chunks = list(pipe.generate_stream(PROMPT, seed=SEED, image=image, progress=False, **SETTINGS))
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", action="append", choices=sorted(CASES), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, _ = init_distributed()
    # Shard every parameter, however small, so the tiny model's shares show the 1/N split.
    ds_config = args.out / "zero3-all.json"
    if rank == 0:
        ds_config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    dist.barrier()
    for name in args.case:
        preset, ulysses, ring, cfg, zero3 = CASES[name]
        config = ParallelConfig(ulysses, ring, cfg, dit_zero3=zero3, t5_zero3=zero3,
                                deepspeed_config=str(ds_config))  # fmt: skip
        defer = ["dit", "text_encoder"] if zero3 else []  # left on the CPU until ZeRO-3 shards them
        pipe = WanPipeline.from_config(preset, seed=0, device="cpu", defer=defer).parallelize(config)
        frames = generate(pipe)
        shares = {}
        if zero3:
            from wan.distributed.zero3 import partition_stats

            for part, module in (("dit", pipe.dit), ("t5", pipe.text_encoder.model)):
                stats = partition_stats(module)
                shares[part] = (stats.local, stats.total)
        if rank == 0:
            torch.save({"frames": frames, "shares": shares}, args.out / f"{name}.pt")
        elif frames.numel():
            sys.exit(f"rank {rank} decoded frames: only rank 0 should")
        for handle in pipe.parallel.zero3:
            handle.release()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
