"""One video on many processes: context parallelism, CFG parallelism and ZeRO-3, as a plan over modules.

    torchrun --nproc_per_node 8 -m wan.generate ... --ulysses_size 4 --ring_size 1 --cfg_parallel --dit_zero3

`ParallelConfig` says how a video is spread; `build_plan(config, num_heads)` makes the `ParallelPlan` this
rank follows (the context mesh, its CFG branch, the validated DeepSpeed config), and each concern applies on
its own, to modules: `apply_context_parallel(dit, plan.mesh)`, `apply_cfg_parallel(...)` (the branch
groups, inside `build_plan`), `apply_zero3(module, plan)`. This package knows no pipeline:
`wan.pipeline.WanPipeline.distribute(plan)` places a pipeline's parts by a plan (`parallelize(config)` does
both steps).

The world of W processes is laid out as ``cfg x ring x ulysses`` (ranks in that order, Ulysses fastest):

- CFG parallelism (``cfg_parallel``, 2 halves): ranks ``[0, W/2)`` run the conditional DiT pass and ranks
  ``[W/2, W)`` the unconditional one, at the same time; rank r and rank r + W/2 swap their velocities
  (one all-gather of a latent-sized tensor per step) and every rank applies the guidance and the solver
  step itself, so all ranks keep identical latents.
- Each half is a `ContextMesh` of ``ulysses_size x ring_size`` ranks splitting the token sequence.
- ZeRO-3 (``dit_zero3`` / ``t5_zero3``) shards those models' weights over all W ranks.

Every rank loads the same weights and runs the same sampling loop; rank 0 alone decodes and writes the
video (`WanPipeline.is_writer`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .mesh import ContextMesh, validate_mesh

__all__ = [
    "CfgSplit",
    "ParallelConfig",
    "ParallelPlan",
    "apply_cfg_parallel",
    "apply_zero3",
    "auto_config",
    "build_plan",
    "init_distributed",
    "local_device",
    "resolve_config",
    "world",
    "zero3_parts",
]


@dataclass(frozen=True)
class ParallelConfig:
    """How one video is spread over the world (the `wan.generate` flags of the same names)."""

    ulysses_size: int = 1
    ring_size: int = 1
    cfg_parallel: bool = False
    dit_zero3: bool = False
    t5_zero3: bool = False
    deepspeed_config: str | None = None  # a DeepSpeed JSON file; None: `wan.distributed.zero3.DEFAULT_CONFIG`

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def zero3(self) -> bool:
        return self.dit_zero3 or self.t5_zero3

    @property
    def zero3_parts(self) -> list[str]:
        """The pipeline parts ZeRO-3 shards (`WanPipeline(defer=)` names)."""
        return zero3_parts(self.dit_zero3, self.t5_zero3)

    def replicas(self, world_size: int) -> int:
        """How many copies of the context mesh the world holds: the CFG halves, or with ZeRO-3 alone (no
        context or CFG parallelism) every rank, each running the whole forward on its gathered weights."""
        if self.zero3 and self.cfg_size * self.ulysses_size * self.ring_size == 1:
            return world_size
        return self.cfg_size

    def validate(self, world_size: int, num_heads: int | None = None) -> None:
        """`ValueError` naming the flags when the layout does not fit `world_size` processes or the heads."""
        replicas = self.replicas(world_size)
        validate_mesh(self.ulysses_size, self.ring_size, world_size, num_heads, replicas=replicas)
        if self.zero3 and world_size == 1:
            raise ValueError("ZeRO-3 (--dit_zero3 / --t5_zero3) shards weights over several processes: "
                             "launch with torchrun --nproc_per_node N, N > 1")  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """For logs and the catalog's record of a run."""
        return {
            "ulysses_size": self.ulysses_size,
            "ring_size": self.ring_size,
            "cfg_parallel": self.cfg_parallel,
            "dit_zero3": self.dit_zero3,
            "t5_zero3": self.t5_zero3,
        }


def zero3_parts(dit_zero3: bool, t5_zero3: bool) -> list[str]:
    """The pipeline parts ZeRO-3 shards, by `WanPipeline(defer=)` name: "dit", "text_encoder"."""
    return [name for name, on in (("dit", dit_zero3), ("text_encoder", t5_zero3)) if on]


def auto_config(
    world_size: int, num_heads: int, *, cfg_parallel: bool = True, **zero3: Any
) -> ParallelConfig:
    """A layout for `world_size` processes: CFG halves when the world is even (and `cfg_parallel`), then
    the largest Ulysses group that divides both the rest and the heads, the remainder as ring."""
    cfg = 2 if cfg_parallel and world_size % 2 == 0 else 1
    per_mesh = world_size // cfg
    ulysses = max(u for u in range(1, per_mesh + 1) if per_mesh % u == 0 and num_heads % u == 0)
    return ParallelConfig(ulysses, per_mesh // ulysses, cfg == 2, **zero3)


def resolve_config(
    world_size: int,
    num_heads: int,
    *,
    ulysses_size: int | None = None,
    ring_size: int | None = None,
    cfg_parallel: bool | None = None,
    **zero3: Any,
) -> ParallelConfig:
    """The layout for `world_size` processes from partial choices, validated (ValueError otherwise).

    Nothing given: `auto_config`. `cfg_parallel` None means on when the processes left after the given
    sizes are even; a size left None takes what remains. `zero3`: dit_zero3, t5_zero3, deepspeed_config.
    """
    if ulysses_size is None and ring_size is None:
        config = auto_config(world_size, num_heads, cfg_parallel=cfg_parallel is not False, **zero3)
    else:
        known = (ulysses_size or 1) * (ring_size or 1)
        rest = world_size // known if world_size % known == 0 else 0
        cfg = cfg_parallel if cfg_parallel is not None else rest % 2 == 0 and rest > 0
        fill = max(1, rest // (2 if cfg else 1))  # what the size left unset takes
        ulysses = ulysses_size if ulysses_size is not None else fill
        ring = ring_size if ring_size is not None else fill
        config = ParallelConfig(ulysses, ring, bool(cfg), **zero3)
    config.validate(world_size, num_heads)
    return config


@dataclass
class CfgSplit:
    """This rank's guidance branch under CFG parallelism and the group that swaps velocities.

    branch 0: the conditional pass (the prompt); branch 1: the unconditional one (the negative prompt).
    """

    branch: int
    group: Any  # the 2-rank ProcessGroup {r, r + W/2}

    def exchange(self, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """velocity: [B, C, T, H, W] of this rank's branch -> (v_cond, v_uncond), both on every rank."""
        local = velocity.contiguous()
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local, group=self.group)  # group rank 0 holds branch 0
        return parts[0], parts[1]


@dataclass
class ParallelPlan:
    """How this rank takes part in one video: the layout, its place in the world, the context mesh of its
    half, its CFG branch (None without CFG parallelism) and the DeepSpeed config of the ZeRO-3 parts (None
    without ZeRO-3). Kept on a distributed pipeline as `pipe.parallel`, with the ZeRO-3 handles, which
    must live as long as the sharded modules."""

    config: ParallelConfig
    rank: int
    world_size: int
    mesh: ContextMesh
    cfg: CfgSplit | None
    zero3_config: dict[str, Any] | None = None
    zero3: list[Any] = field(default_factory=list)  # `Zero3Handle`s of the modules sharded by `apply_zero3`


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), once.

    NCCL with one GPU per process (`cuda:LOCAL_RANK`) when CUDA is there, gloo on the CPU. Without
    torchrun's variables (one plain process) nothing is initialised. Returns (rank, world size).
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def local_device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_plan(config: ParallelConfig, num_heads: int) -> ParallelPlan:
    """This rank's `ParallelPlan` for `config` over the default process group, for a DiT of `num_heads`.

    Collective: every rank calls it with the same config. Raises `ValueError` for a layout that does not fit
    the world or the heads, or an invalid DeepSpeed config, before any collective.
    """
    rank, world_size = world()
    config.validate(world_size, num_heads)
    zero3_config = None
    if config.zero3:
        from .zero3 import load_config

        zero3_config = load_config(config.deepspeed_config)  # a bad file fails before any collective
    mesh = ContextMesh.build(
        config.ulysses_size, config.ring_size, num_heads, replicas=config.replicas(world_size)
    )
    cfg = apply_cfg_parallel(rank, world_size) if config.cfg_parallel else None
    return ParallelPlan(config, rank, world_size, mesh, cfg, zero3_config)


def apply_cfg_parallel(rank: int, world_size: int) -> CfgSplit:
    """Pair rank r with rank r + W/2 (branch 0: the conditional pass, branch 1: the unconditional one);
    this rank's `CfgSplit`. Collective: every rank creates every pair's group, in the same order."""
    half = world_size // 2
    split = None
    for r in range(half):
        group = dist.new_group([r, r + half])
        if rank in (r, r + half):
            split = CfgSplit(branch=rank // half, group=group)
    assert split is not None, f"rank {rank} is in no CFG pair of a world of {world_size}"
    return split


def apply_zero3(module: torch.nn.Module, plan: ParallelPlan) -> Any:
    """Shard `module`'s weights over the world with DeepSpeed ZeRO-3 as `plan` says; the handle is kept on
    the plan (it must outlive the module's use) and returned."""
    from .zero3 import shard_zero3

    assert plan.zero3_config is not None, "the plan has no ZeRO-3 parts"
    handle = shard_zero3(module, plan.zero3_config)
    plan.zero3.append(handle)
    return handle
