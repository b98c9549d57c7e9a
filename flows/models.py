"""Which weights a job runs on, how they are identified, and one loaded pipeline per process.

A job's identity includes its model's fingerprint, so that a video made with other weights is never
taken for this one. A checkpoint directory is fingerprinted from its file names and sizes, the full text
of its small files (configs, index) and three 1 MiB samples of each large file (start, middle, end): cheap
on a 60 GB checkpoint, yet different for two fine-tunes of the same shapes. The tiny presets without a
checkpoint run on seeded random weights, fingerprinted by preset and seed.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.group_protocol import MEMORY_KEYS
from wan.configs import RANDOM_WEIGHTS_SEED, get_preset

__all__ = [
    "MEMORY_KEYS",
    "ModelSource",
    "checkpoint_fingerprint",
    "clear_pipelines",
    "load_pipeline",
    "memory_options",
    "model_source",
    "pipeline_loads",
]

RANDOM_SEED = RANDOM_WEIGHTS_SEED
_SAMPLE = 1 << 20
_SMALL_FILE = 4 << 20


@dataclass(frozen=True)
class ModelSource:
    """A preset (`model`) and where its weights come from: a checkpoint directory, or random weights."""

    model: str
    ckpt_dir: str | None
    fingerprint: str

    @property
    def task(self) -> str:
        return get_preset(self.model).task

    def describe(self) -> dict[str, Any]:
        """For the catalog's model registry and the sidecars."""
        return {"model": self.model, "task": self.task, "fingerprint": self.fingerprint,
                "weights": self.ckpt_dir or f"random (seed {RANDOM_SEED})"}  # fmt: skip


def model_source(model: str, ckpt_dir: str | os.PathLike | None = None) -> ModelSource:
    """Resolve a preset name and optional checkpoint directory; ValueError says what is missing."""
    get_preset(model)  # unknown names fail here, listing the known ones
    if ckpt_dir is None:
        if not model.startswith("tiny-"):
            raise ValueError(
                f"model {model!r} needs its weights: pass --ckpt-dir (or set WANFLOW_CHECKPOINTS) to a "
                "Wan2.1 checkpoint directory; only the tiny-* presets run on random weights"
            )
        return ModelSource(model, None, f"random:{model}:seed{RANDOM_SEED}")
    path = Path(ckpt_dir).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(ckpt_dir)!r} for model {model!r} does not exist")
    from wan.checkpoints import detect_layout

    try:  # names the files a directory without weights lacks, before any run starts
        detect_layout(path)
    except Exception as exc:
        raise ValueError(f"checkpoint for model {model!r}: {exc}") from None
    return ModelSource(model, str(path), checkpoint_fingerprint(path))


_fingerprints: dict[tuple[str, int, int], str] = {}


def checkpoint_fingerprint(ckpt_dir: str | os.PathLike) -> str:
    """'ckpt:<sha256>' of a checkpoint directory's names, sizes, small files and samples of large ones."""
    root = Path(ckpt_dir)
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in _fingerprints:
            _fingerprints[memo] = _file_digest(path, stat.st_size)
        digest.update(
            f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{_fingerprints[memo]}\n".encode()
        )
    return f"ckpt:{digest.hexdigest()}"


def _file_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _SMALL_FILE:
            h.update(f.read())
        else:
            for offset in (0, size // 2, size - _SAMPLE):
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def memory_options(
    values: dict[str, Any] | None, where: str = "memory", *, partial: bool = False
) -> dict[str, Any]:
    """Check GPU-memory options ({"offload_model": bool, "t5_cpu": bool, "vae_tiling": "32:8"}); returns
    them normalised (`MemoryOptions.describe()`), ValueError naming the key otherwise. `partial`: only the
    keys given come back (a run's overrides of its workers' own settings)."""
    from wan.pipeline import MemoryOptions

    values = dict(values or {})
    unknown = sorted(set(values) - set(MEMORY_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: unknown option {', '.join(map(repr, unknown))}; known: {', '.join(MEMORY_KEYS)}"
        )
    for key in ("offload_model", "t5_cpu"):
        if not isinstance(values.get(key, False), bool):
            raise ValueError(f"{where}.{key}: expected true or false, got {values[key]!r}")
    tiling = values.get("vae_tiling")
    try:
        options = MemoryOptions.parse(values.get("offload_model"), values.get("t5_cpu"),
                                      None if tiling is None else str(tiling))  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None
    described = options.describe()
    return {key: described[key] for key in values} if partial else described


_pipelines: dict[tuple, Any] = {}
_lock = threading.Lock()
_loads = 0  # pipelines this process has built (each reads its checkpoint once)


def pipeline_loads() -> int:
    """How many pipelines (or worker groups) this process has built: each read its weights once."""
    return _loads


def load_pipeline(
    source: ModelSource, *, device: str | None = None, dtype: str | None = None, gpus_per_job: int = 1,
    layout: dict[str, Any] | None = None, memory: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """The `WanPipeline` for `source`, loaded once per process and kept for every later job.

    `memory`: GPU-memory options (`memory_options`: offload_model, t5_cpu, vae_tiling).

    With `gpus_per_job` > 1, a `flows.group.GroupPipeline`: a `torchrun` group of that many processes
    (one GPU each) holding the model, laid out by `layout` (`Settings.parallel_layout()`), started once.
    """
    global _loads
    memory = memory_options(memory)
    key = (source.model, source.ckpt_dir, device, dtype, gpus_per_job, tuple(sorted((layout or {}).items())),
           tuple(sorted(memory.items())))  # fmt: skip
    with _lock:
        if key not in _pipelines:
            import torch

            # One model in memory at a time: a worker serves one shard's model. Free the old one first.
            _release_all()
            _loads += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if gpus_per_job > 1:
                from flows.group import GroupPipeline, WorkerGroup

                check_group_layout(source, gpus_per_job, layout or {}, memory)

                group = WorkerGroup(source.model, source.ckpt_dir, gpus_per_job, dtype=dtype,
                                    layout={**(layout or {}), **memory})  # fmt: skip
                _pipelines[key] = GroupPipeline(group)
                return _pipelines[key]

            from wan.pipeline import MemoryOptions, WanPipeline

            torch_dtype = getattr(torch, dtype) if dtype else None
            options = MemoryOptions.parse(**memory)
            if source.ckpt_dir is None:
                pipe = WanPipeline.from_config(
                    source.model, seed=RANDOM_SEED, device=device, dtype=torch_dtype, memory=options
                )
            else:
                pipe = WanPipeline.from_pretrained(
                    source.ckpt_dir, task=source.model, device=device, dtype=torch_dtype, memory=options
                )
            _pipelines[key] = pipe
        return _pipelines[key]


_scorers: dict[tuple[str, str], Any] = {}


def load_clip_scorer(path: str, device: str | None = None, gpus_per_job: int = 1) -> Any:
    """The `wan.clip_score.ClipScorer` of the CLIP file at `path` (or in the folder `path`), loaded once per
    process: on `device` (default: "cuda" on a worker with one GPU per job, else the CPU; a worker group's
    GPUs belong to its processes), fp16 on a GPU, fp32 on the CPU. CheckpointError names what is wrong."""
    import torch

    from wan.checkpoints import CLIP_FILE
    from wan.clip_score import ClipScorer

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / CLIP_FILE
    if device is None:
        device = "cuda" if torch.cuda.is_available() and gpus_per_job == 1 else "cpu"
    key = (str(file.resolve()), device)
    with _lock:
        if key not in _scorers:
            _scorers.clear()  # one at a time
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
            _scorers[key] = ClipScorer.from_official(file, dtype=dtype, device=device)
        return _scorers[key]


def check_group_layout(
    source: ModelSource, gpus_per_job: int, layout: dict[str, Any], memory: dict[str, Any]
) -> None:
    """Refuse a worker group's layout here, with a clear ValueError, before any process starts: the
    sizes against `gpus_per_job` and the heads, the DeepSpeed config, and the memory options ZeRO-3
    excludes."""
    from wan.distributed.parallel import resolve_config

    config = resolve_config(
        gpus_per_job, get_preset(source.model).dit.num_heads, ulysses_size=layout.get("ulysses_size"),
        ring_size=layout.get("ring_size"), cfg_parallel=layout.get("cfg_parallel"),
        dit_zero3=bool(layout.get("dit_zero3")), t5_zero3=bool(layout.get("t5_zero3")),
        deepspeed_config=layout.get("deepspeed_config"),
    )  # fmt: skip
    if config.zero3:
        from wan.distributed.zero3 import load_config

        load_config(config.deepspeed_config)
        if memory.get("offload_model"):
            raise ValueError(
                "WANFLOW_OFFLOAD_MODEL cannot be combined with ZeRO-3 (WANFLOW_DIT_ZERO3, WANFLOW_T5_ZERO3): "
                "it shards the weights over the group's GPUs instead"
            )
    if config.t5_zero3 and memory.get("t5_cpu"):
        raise ValueError("WANFLOW_T5_CPU and WANFLOW_T5_ZERO3 exclude each other")


def _release_all() -> None:
    """Drop every cached pipeline; worker groups are stopped (their processes hold the weights)."""
    for pipe in _pipelines.values():
        group = getattr(pipe, "group", None)
        if group is not None:
            group.close()
    _pipelines.clear()


def clear_pipelines() -> None:
    """Drop the cached pipelines (tests; or to free memory between models)."""
    with _lock:
        _release_all()


atexit.register(clear_pipelines)
