"""One process of a worker group: `torchrun --nproc_per_node N -m flows.group_worker <GroupSpec argv>`,
started by `flows.group.WorkerGroup` for a shard whose jobs each run on N GPUs.

Every rank loads the model once and spreads it with `WanPipeline.parallelize`. Rank 0
connects back to the shard's flow process (address and key in `WANFLOW_GROUP_ADDRESS` /
`WANFLOW_GROUP_AUTHKEY`) and serves its requests, in the messages of `flows.group_protocol`:

- `AskSettings` and `AskVideoSize`: answered (`Answer`) by rank 0 alone;
- `UseLoras`: broadcast to every rank, each merging the set into its DiT; rank 0 answers;
- `Generate`: broadcast to every rank, sampled together; rank 0 decodes and sends the frames back chunk by
  chunk (`Chunk`, uint8 [n, H, W, 3]), then `Done`;
- `Stop`: every rank leaves.

A bad request is answered `Failed` (a bad request, not retried) and the group carries on. Any other
failure ends the process, and torchrun ends the whole group; the flow side sees the connection close.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from multiprocessing.connection import Client
from typing import Any

import torch
import torch.distributed as dist

from flows.group_protocol import (
    ADDRESS_ENV,
    AUTHKEY_ENV,
    Answer,
    AskSettings,
    AskVideoSize,
    Chunk,
    Done,
    Failed,
    Generate,
    GroupSpec,
    Ready,
    Stop,
    UseLoras,
)

IDLE_TIMEOUT_S = 7 * 24 * 3600.0


def layout(spec: GroupSpec, world_size: int, num_heads: int) -> Any:
    """The group's `ParallelConfig`: the sizes given, the rest chosen (`resolve_config`)."""
    from wan.distributed.parallel import resolve_config

    return resolve_config(world_size, num_heads, **spec.layout())


def load(spec: GroupSpec) -> Any:
    """The pipeline on this rank's device, parallelised over the group."""
    from wan.configs import RANDOM_WEIGHTS_SEED
    from wan.distributed.parallel import local_device, zero3_parts
    from wan.pipeline import MemoryOptions, WanPipeline

    device = local_device()
    dtype = getattr(torch, spec.dtype) if spec.dtype else None
    memory = MemoryOptions.parse(**spec.memory())
    defer = zero3_parts(spec.dit_zero3, spec.t5_zero3)  # sharded onto the GPUs later
    if spec.ckpt_dir is None:
        pipe = WanPipeline.from_config(
            spec.model, seed=RANDOM_WEIGHTS_SEED, device=device, dtype=dtype, memory=memory, defer=defer
        )
    else:
        pipe = WanPipeline.from_pretrained(
            spec.ckpt_dir, task=spec.model, device=device, dtype=dtype, memory=memory, defer=defer
        )
    return pipe.parallelize(layout(spec, dist.get_world_size(), pipe.dit.cfg.num_heads))


def _answer(pipe: Any, message: AskSettings | AskVideoSize) -> Answer:
    """A rank-0-only request: settings resolution or a video size."""
    from wan.pipeline import GenerationSettings

    if isinstance(message, AskSettings):
        return Answer(dataclasses.asdict(pipe.settings(**message.kwargs)))
    image = torch.zeros(3, message.height, message.width)
    return Answer(pipe.video_size(GenerationSettings.from_dict(message.settings), image))


def _generate(pipe: Any, request: Generate, conn: Any) -> None:
    """Every rank: sample `request` together; rank 0 streams the frames to `conn`."""
    pipe.reset_peak_memory()
    stream = pipe.generate_stream(request.prompt, seed=request.seed, progress=False,
                                  **request.images, **request.settings)  # fmt: skip
    for chunk in stream:  # rank 0 only gets chunks
        conn.send(Chunk(chunk.numpy()))


def _use_loras(pipe: Any, message: UseLoras, conn: Any) -> None:
    """Every rank: merge the set (a file that does not fit fails alike on every rank, before any change)."""
    try:
        changed = pipe.use_loras(message.loras())
    except (ValueError, TypeError) as exc:
        if conn is not None:
            conn.send(Failed(str(exc)))
        return
    if conn is not None:
        conn.send(Answer(changed))


def serve(pipe: Any, conn: Any | None) -> None:
    """The request loop; `conn` is the flow's connection on rank 0 and None elsewhere."""
    rank = dist.get_rank()
    while True:
        box: list[Any] = [None]
        if rank == 0:
            message = conn.recv()
            while isinstance(message, AskSettings | AskVideoSize):
                try:
                    conn.send(_answer(pipe, message))
                except (ValueError, TypeError) as exc:  # a bad request: answered, the group lives on
                    conn.send(Failed(str(exc)))
                message = conn.recv()
            box[0] = message
        dist.broadcast_object_list(box, src=0)
        message = box[0]
        if isinstance(message, Stop):
            return
        if isinstance(message, UseLoras):
            _use_loras(pipe, message, conn)
            continue
        if not isinstance(message, Generate):
            raise RuntimeError(f"worker group: unexpected request {type(message).__name__}")
        try:
            _generate(pipe, message, conn)
        except (ValueError, TypeError) as exc:  # raised on every rank alike, before any collective
            if rank == 0:
                conn.send(Failed(str(exc)))
            continue
        if rank == 0:
            counts = pipe.last_cache_counts
            kept = pipe.last_latents if message.settings.get("keep_latents") else None
            conn.send(Done(pipe.peak_memory_bytes, None if counts is None else counts.as_dict(),
                           None if kept is None else kept.numpy(),
                           None if kept is None else pipe.latents_metadata()))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    spec = GroupSpec.from_argv(argv)
    from wan.distributed.parallel import init_distributed

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()))
    # Ranks other than 0 wait in a broadcast for the next job, however long the shard stays idle.
    rank, world_size = init_distributed(timeout_s=IDLE_TIMEOUT_S)
    start = time.perf_counter()
    pipe = load(spec)
    conn = None
    if rank == 0:
        key = bytes.fromhex(os.environ[AUTHKEY_ENV])
        conn = Client(os.environ[ADDRESS_ENV], family="AF_UNIX", authkey=key)
        pids = [None] * world_size
        dist.all_gather_object(pids, os.getpid())
        conn.send(Ready({"pids": pids, "device": str(pipe.device), "dtype": str(pipe.dtype),
                         "layout": pipe.parallel.config.describe(), "world_size": world_size,
                         "load_seconds": round(time.perf_counter() - start, 2)}))  # fmt: skip
    else:
        dist.all_gather_object([None] * world_size, os.getpid())
    serve(pipe, conn)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
