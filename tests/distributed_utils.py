"""Helpers for tests that run several gloo processes on the CPU (spawned by `torch.multiprocessing`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[[int, int, Path], None], workdir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, Path(workdir))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[[int, int, Path], None], world_size: int, workdir: Path) -> list[dict]:
    """Run ``fn(rank, world_size, workdir)`` in ``world_size`` gloo processes; each rank must save a dict to
    ``workdir / f"rank{rank}.pt"``. Returns those dicts in rank order (a failing rank raises here).

    ``fn`` must be a module-level function (spawned processes import it by name).
    """
    mp.spawn(_entry, args=(world_size, free_port(), fn, str(workdir)), nprocs=world_size, join=True)
    return [torch.load(workdir / f"rank{r}.pt") for r in range(world_size)]
