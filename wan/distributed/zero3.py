"""DeepSpeed ZeRO-3 for inference: a module's weights sharded over every rank, gathered per layer on use.

    handle = shard_zero3(pipe.dit, config)     # every rank, same module, same config
    pipe.dit(...)                              # forwards gather each block's weights just in time
    partition_fraction(pipe.dit)               # ~ 1 / world_size: the share of the weights this rank holds

No optimizer is made: `deepspeed.initialize` with ZeRO stage 3 and no optimizer installs DeepSpeed's
parameter-offload hooks only (gather before a submodule's forward, release after), so a forward costs one
all-gather of each layer's weights and each rank keeps ~1/N of them between uses. The hooks run inside
`nn.Module.__call__`; the model code is unchanged, and combines freely with context parallelism (the
gathers are over the whole world, the attention collectives over the mesh's groups; every rank runs the
same modules in the same order, which both need).

Dtypes are the module's own: `shard_zero3` never casts (the pipeline has already made the DiT bf16 with
its time path and modulation tables fp32), so the configs here leave DeepSpeed's fp16/bf16 off.

The default configuration is `DEFAULT_CONFIG`; `infra/deepspeed/zero3-inference.json` is the tuned one the
GPU pool passes (`--deepspeed_config`, `WANFLOW_DEEPSPEED_CONFIG`). `load_config` checks either and names
the file and key of anything wrong.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_CONFIG",
    "Zero3Handle",
    "Zero3Stats",
    "load_config",
    "partition_fraction",
    "partition_stats",
    "shard_zero3",
    "validate_config",
]

# Inference only: no optimizer, scheduler or gradients; DeepSpeed insists on a micro-batch size anyway.
DEFAULT_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "stage3_prefetch_bucket_size": 50_000_000,
        # Parameters smaller than this stay whole on every rank (norm weights, biases): gathering them
        # costs more than it saves. 0 would shard every one.
        "stage3_param_persistence_threshold": 100_000,
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
        # DeepSpeed would otherwise replace torch.nn.functional.linear process-wide with its own (a
        # training memory saving), changing the rounding of every linear layer, sharded or not.
        "memory_efficient_linear": False,
    },
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}

_TRAINING_KEYS = ("optimizer", "scheduler", "gradient_accumulation_steps", "gradient_clipping")
_PRECISION_KEYS = ("fp16", "bf16", "amp")


def validate_config(config: Any, source: str = "the ZeRO-3 config") -> dict[str, Any]:
    """Check an inference ZeRO-3 config and return a copy with the required defaults filled in.

    Raises `ValueError` naming `source` and the key: not a JSON object; `zero_optimization.stage` not 3;
    training-only keys (optimizer, scheduler, ...); fp16/bf16/amp enabled (the module keeps its own dtypes);
    offload devices other than none/cpu/nvme; non-integer bucket sizes.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    out = copy.deepcopy(config)
    zero = out.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"{source}: 'zero_optimization' must be an object, got {type(zero).__name__}")
    stage = zero.setdefault("stage", 3)
    if stage != 3:
        raise ValueError(f"{source}: 'zero_optimization.stage' must be 3 (weight sharding), got {stage!r}")
    for key in _TRAINING_KEYS:
        if key in out:
            raise ValueError(f"{source}: {key!r} is a training setting; inference takes none (remove it)")
    for key in _PRECISION_KEYS:
        section = out.get(key)
        if isinstance(section, dict) and section.get("enabled"):
            raise ValueError(
                f"{source}: '{key}.enabled' must be false: the pipeline sets the DiT's dtype itself "
                "(--dtype), keeping its time path in float32, and DeepSpeed would cast it all"
            )
    counts = ("_size", "_threshold", "_parameters", "_distance")
    for key, value in zero.items():
        sized = key.startswith("stage3_") and key.endswith(counts)
        if sized and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise ValueError(f"{source}: 'zero_optimization.{key}' must be a number >= 0, got {value!r}")
    for key in ("offload_param", "offload_optimizer"):
        section = zero.get(key)
        if section is None:
            continue
        device = section.get("device", "none") if isinstance(section, dict) else section
        if device not in ("none", "cpu", "nvme"):
            raise ValueError(
                f"{source}: 'zero_optimization.{key}.device' must be none, cpu or nvme, got {device!r}"
            )
    if zero.setdefault("memory_efficient_linear", False):
        raise ValueError(
            f"{source}: 'zero_optimization.memory_efficient_linear' must be false: DeepSpeed would replace "
            "torch.nn.functional.linear in the whole process (a training memory saving)"
        )
    out.setdefault("train_micro_batch_size_per_gpu", 1)
    return out


def load_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The config at `path` (JSON), validated; `DEFAULT_CONFIG` when `path` is None."""
    if path is None:
        return validate_config(DEFAULT_CONFIG, "DEFAULT_CONFIG")
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ValueError(f"ZeRO-3 config {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"ZeRO-3 config {str(path)!r}, line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None
    return validate_config(data, f"ZeRO-3 config {str(path)!r}")


@dataclass
class Zero3Handle:
    """What `shard_zero3` made: keep it alive as long as the module is used (it owns the hooks)."""

    module: torch.nn.Module
    engine: Any

    def release(self) -> None:
        """Remove the hooks and free the shards (the module is unusable afterwards)."""
        self.engine.destroy()


@dataclass(frozen=True)
class Zero3Stats:
    """Parameter counts of a ZeRO-3 sharded module, as DeepSpeed's partition metadata records them."""

    total: int  # every parameter's full size (`ds_numel`)
    local: int  # what this rank holds between uses (`ds_tensor`)
    persistent: int  # parameters below the persistence threshold, kept whole on every rank

    @property
    def fraction(self) -> float:
        return self.local / self.total if self.total else 0.0


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory collective op (~45 s of g++) when its comm
    backend starts, and probes every op's compiler first; ZeRO-3 over torch.distributed uses neither. Mark
    the op unavailable before DeepSpeed looks (its op table is created on first access, so setting it
    first is a supported override, not a patch of its code)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def shard_zero3(module: torch.nn.Module, config: dict[str, Any] | None = None) -> Zero3Handle:
    """Shard `module`'s parameters over every rank of the default process group with ZeRO stage 3.

    Collective: every rank calls it with the same module (same shapes) and config. The module may be on
    the CPU (a pipeline built with `defer=`): its parameters move to this rank's device (`cuda:LOCAL_RANK`,
    or the CPU) one at a time as they are partitioned, so the whole module never stands on the GPU. Only
    this rank's shard stays; no dtype is changed. The module is returned in `handle.module`.
    `config`: a DeepSpeed config (validated; `DEFAULT_CONFIG` when None). Needs `torch.distributed`.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("ZeRO-3 needs torch.distributed: launch with torchrun (--nproc_per_node N)")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    config = validate_config(DEFAULT_CONFIG if config is None else config)
    _skip_cpu_shm_build()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_init_required=False)
    module.requires_grad_(False)
    # Partition first, one parameter at a time: each goes to this rank's device, is broadcast from rank 0
    # and cut to its shard, so a module still on the CPU never stands whole on the GPU. `initialize` then
    # finds it partitioned and leaves its placement alone; the buffers follow the parameters.
    deepspeed.zero.Init(module=module, config_dict_or_path=config)
    device = torch.device(get_accelerator().current_device_name())
    for buffer in module.buffers():
        buffer.data = buffer.data.to(device)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return Zero3Handle(module=engine.module, engine=engine)


def partition_stats(module: torch.nn.Module) -> Zero3Stats:
    """Counts from DeepSpeed's partition metadata (`ds_numel`, `ds_tensor`, `ds_persist`) of `module`."""
    total = local = persistent = 0
    for name, param in module.named_parameters():
        if not hasattr(param, "ds_numel"):
            raise ValueError(f"parameter {name!r} is not ZeRO-3 partitioned (no ds_numel)")
        total += param.ds_numel
        if getattr(param, "ds_persist", False):
            persistent += param.ds_numel
            local += param.ds_numel
        else:
            local += param.ds_tensor.numel()
    return Zero3Stats(total=total, local=local, persistent=persistent)


def partition_fraction(module: torch.nn.Module) -> float:
    """The share of `module`'s parameters this rank holds between uses (about 1/world size)."""
    return partition_stats(module).fraction
