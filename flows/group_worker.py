"""One process of a worker group: `torchrun --nproc_per_node N -m flows.group_worker ...`, started by
`flows.group.WorkerGroup` for a shard whose jobs each run on N GPUs.

Every rank loads the model once and spreads it with `wan.distributed.parallel.parallelize`. Rank 0
connects back to the shard's flow process (address and key in `WANFLOW_GROUP_ADDRESS` /
`WANFLOW_GROUP_AUTHKEY`) and serves its requests:

- `("settings", kwargs)` and `("video_size", settings, (h, w))`: answered by rank 0 alone;
- `("generate", request)`: broadcast to every rank, sampled together; rank 0 decodes and sends the frames
  back chunk by chunk (`("chunk", uint8 [n, H, W, 3])`), then `("done",)`;
- `("stop",)`: every rank leaves.

A request error is answered `("error", kind, message)` (kind "value": a bad request, not retried) and the
group carries on. Any other failure ends the process, and torchrun ends the whole group; the flow side
sees the connection close.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from multiprocessing.connection import Client
from typing import Any

import torch
import torch.distributed as dist

ADDRESS_ENV = "WANFLOW_GROUP_ADDRESS"  # a Unix socket path (in a private directory)
IDLE_TIMEOUT_S = 7 * 24 * 3600.0
AUTHKEY_ENV = "WANFLOW_GROUP_AUTHKEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.group_worker")
    p.add_argument("--model", required=True, help="preset name")
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--ulysses-size", type=int, default=None)
    p.add_argument("--ring-size", type=int, default=None)
    p.add_argument("--cfg-parallel", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--dit-zero3", action="store_true")
    p.add_argument("--t5-zero3", action="store_true")
    p.add_argument("--deepspeed-config", default=None)
    p.add_argument("--offload-model", action="store_true")
    p.add_argument("--t5-cpu", action="store_true")
    p.add_argument("--vae-tiling", default=None)
    return p


def layout(args: argparse.Namespace, world_size: int, num_heads: int) -> Any:
    """The group's `ParallelConfig`: the sizes given, the rest chosen (`resolve_config`)."""
    from wan.distributed.parallel import resolve_config

    return resolve_config(
        world_size, num_heads, ulysses_size=args.ulysses_size, ring_size=args.ring_size,
        cfg_parallel={"auto": None, "on": True, "off": False}[args.cfg_parallel], dit_zero3=args.dit_zero3,
        t5_zero3=args.t5_zero3, deepspeed_config=args.deepspeed_config,
    )  # fmt: skip


def load(args: argparse.Namespace) -> Any:
    """The pipeline on this rank's device, parallelised over the group."""
    from wan.distributed.parallel import local_device, parallelize, zero3_parts
    from wan.pipeline import MemoryOptions, WanPipeline

    device = local_device()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    memory = MemoryOptions.parse(args.offload_model, args.t5_cpu, args.vae_tiling)
    defer = zero3_parts(args.dit_zero3, args.t5_zero3)  # sharded onto the GPUs later
    if args.ckpt_dir is None:
        from flows.models import RANDOM_SEED

        pipe = WanPipeline.from_config(
            args.model, seed=RANDOM_SEED, device=device, dtype=dtype, memory=memory, defer=defer
        )
    else:
        pipe = WanPipeline.from_pretrained(
            args.ckpt_dir, task=args.model, device=device, dtype=dtype, memory=memory, defer=defer
        )
    return parallelize(pipe, layout(args, dist.get_world_size(), pipe.dit.cfg.num_heads))


def _answer(pipe: Any, message: tuple) -> tuple:
    """A rank-0-only request: settings resolution or a video size."""
    from wan.pipeline import GenerationSettings

    if message[0] == "settings":
        return ("ok", dataclasses.asdict(pipe.settings(**message[1])))
    _, settings, (height, width) = message
    return ("ok", pipe.video_size(GenerationSettings(**settings), torch.zeros(3, height, width)))


def _generate(pipe: Any, request: dict[str, Any], conn: Any) -> None:
    """Every rank: sample `request` together; rank 0 streams the frames to `conn`."""
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    stream = pipe.generate_stream(request["prompt"], seed=request["seed"], progress=False,
                                  **request["images"], **request["settings"])  # fmt: skip
    for chunk in stream:  # rank 0 only gets chunks
        conn.send(("chunk", chunk.numpy()))


def serve(pipe: Any, conn: Any | None) -> None:
    """The request loop; `conn` is the flow's connection on rank 0 and None elsewhere."""
    rank = dist.get_rank()
    while True:
        box: list[Any] = [None]
        if rank == 0:
            message = conn.recv()
            while message[0] in ("settings", "video_size"):
                try:
                    conn.send(_answer(pipe, message))
                except (ValueError, TypeError) as exc:  # a bad request: answered, the group lives on
                    conn.send(("error", "value", str(exc)))
                message = conn.recv()
            box[0] = message
        dist.broadcast_object_list(box, src=0)
        message = box[0]
        if message[0] == "stop":
            return
        try:
            _generate(pipe, message[1], conn)
        except (ValueError, TypeError) as exc:  # raised on every rank alike, before any collective
            if rank == 0:
                conn.send(("error", "value", str(exc)))
            continue
        if rank == 0:
            peak = torch.cuda.max_memory_allocated(pipe.device) if pipe.device.type == "cuda" else None
            conn.send(("done", {"peak_memory_bytes": peak}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wan.distributed.parallel import init_distributed

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()))
    # Ranks other than 0 wait in a broadcast for the next job, however long the shard stays idle.
    rank, world_size = init_distributed(timeout_s=IDLE_TIMEOUT_S)
    start = time.perf_counter()
    pipe = load(args)
    conn = None
    if rank == 0:
        key = bytes.fromhex(os.environ[AUTHKEY_ENV])
        conn = Client(os.environ[ADDRESS_ENV], family="AF_UNIX", authkey=key)
        pids = [None] * world_size
        dist.all_gather_object(pids, os.getpid())
        conn.send(("ready", {"pids": pids, "device": str(pipe.device), "dtype": str(pipe.dtype),
                             "layout": pipe.parallel.config.describe(), "world_size": world_size,
                             "load_seconds": round(time.perf_counter() - start, 2)}))  # fmt: skip
    else:
        dist.all_gather_object([None] * world_size, os.getpid())
    serve(pipe, conn)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
