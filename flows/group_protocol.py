"""What a worker group's two sides agree on: how a group is launched, and the messages they exchange.

The flow side (`flows.group.WorkerGroup`) starts `torchrun ... -m flows.group_worker <GroupSpec.to_argv()>`
with the address and key of its socket in the environment (`ADDRESS_ENV`, `AUTHKEY_ENV`); the worker reads
the spec back with `GroupSpec.from_argv`. Rank 0 then connects and the two talk in the dataclasses below,
pickled over a `multiprocessing.connection.Connection`:

    rank 0 -> flow:  Ready, then for each request: Answer | Failed, or Chunk... Done | Failed
    flow -> rank 0:  AskSettings | AskVideoSize (rank 0 answers alone), UseLoras (every rank merges, rank 0
                     answers), Generate (every rank samples), Stop

This module imports nothing of wanflow's: both sides (and the tests) import it without pulling the other in.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ADDRESS_ENV",
    "AUTHKEY_ENV",
    "MEMORY_KEYS",
    "Answer",
    "AskSettings",
    "AskVideoSize",
    "Chunk",
    "Done",
    "Failed",
    "Generate",
    "GroupSpec",
    "Ready",
    "Stop",
    "UseLoras",
]  # fmt: skip

ADDRESS_ENV = "WANFLOW_GROUP_ADDRESS"  # a Unix socket path (in a private directory)
AUTHKEY_ENV = "WANFLOW_GROUP_AUTHKEY"  # the HMAC key, hex

MEMORY_KEYS = ("offload_model", "t5_cpu", "vae_tiling")  # `wan.pipeline.MemoryOptions`, as settings name them
LAYOUT_KEYS = ("ulysses_size", "ring_size", "cfg_parallel", "dit_zero3", "t5_zero3", "deepspeed_config")
_CFG = {None: "auto", True: "on", False: "off"}  # cfg_parallel's three states on the command line


@dataclass(frozen=True)
class GroupSpec:
    """Everything a worker group's ranks need to load the model and lay it out: the model (a preset name),
    its checkpoint (None: random weights), the dtype name, the parallel layout (`wan.distributed.parallel.
    resolve_config` fills in what is None) and the GPU-memory options."""

    model: str
    ckpt_dir: str | None = None
    dtype: str | None = None
    ulysses_size: int | None = None
    ring_size: int | None = None
    cfg_parallel: bool | None = None  # None: chosen for the group
    dit_zero3: bool = False
    t5_zero3: bool = False
    deepspeed_config: str | None = None
    offload_model: bool = False
    t5_cpu: bool = False
    vae_tiling: str | None = None  # 'TILE[:OVERLAP]' (`wan.pipeline.parse_vae_tiling`)

    @classmethod
    def from_layout(
        cls, model: str, ckpt_dir: str | None = None, dtype: str | None = None,
        layout: dict[str, Any] | None = None,
    ) -> GroupSpec:  # fmt: skip
        """From a layout dict (`Settings.parallel_layout()` and memory options, as `flows.models` holds them);
        ValueError for a key that is neither."""
        layout = dict(layout or {})
        unknown = sorted(set(layout) - set(LAYOUT_KEYS) - set(MEMORY_KEYS))
        if unknown:
            raise ValueError(f"worker group layout: unknown key {', '.join(map(repr, unknown))}")
        values = {key: value for key, value in layout.items() if value is not None or key == "cfg_parallel"}
        for key in ("dit_zero3", "t5_zero3", "offload_model", "t5_cpu"):
            if key in values:
                values[key] = bool(values[key])
        return cls(model, ckpt_dir, dtype, **values)

    def layout(self) -> dict[str, Any]:
        """The parallel layout part (`resolve_config`'s keyword arguments)."""
        return {key: getattr(self, key) for key in LAYOUT_KEYS}

    def memory(self) -> dict[str, Any]:
        """The GPU-memory options part (`MemoryOptions.parse`'s keyword arguments)."""
        return {key: getattr(self, key) for key in MEMORY_KEYS}

    def to_argv(self) -> list[str]:
        """The worker's command-line arguments; `from_argv` reads them back into an equal spec. Flags come in
        the order of their names; false, unset and default values are left out (cfg_parallel always says
        which of its three states it is)."""
        argv = ["--model", self.model]
        for spec in sorted(dataclasses.fields(self), key=lambda f: f.name):
            value, flag = getattr(self, spec.name), "--" + spec.name.replace("_", "-")
            if spec.name == "model":
                continue
            if spec.name == "cfg_parallel":
                argv += [flag, _CFG[value]]
            elif value is True:
                argv.append(flag)
            elif value is not None and value is not False:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> GroupSpec:
        """The spec that `to_argv` wrote (argparse: `--help` and errors as usual)."""
        args = _parser().parse_args(argv)
        values = vars(args)
        values["cfg_parallel"] = {text: state for state, text in _CFG.items()}[values["cfg_parallel"]]
        return cls(**values)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.group_worker", description="one rank of a worker group")
    p.add_argument("--model", required=True, help="preset name")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory (default: random weights)")
    p.add_argument("--dtype", default=None, help="torch dtype name, e.g. bfloat16 (default: the device's)")
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses group size (default: chosen)")
    p.add_argument("--ring-size", type=int, default=None, help="ring attention size (default: chosen)")
    p.add_argument("--cfg-parallel", choices=list(_CFG.values()), default="auto",
                   help="split guidance's two passes across ranks (default: auto)")  # fmt: skip
    p.add_argument("--dit-zero3", action="store_true", help="shard the DiT's weights with ZeRO-3")
    p.add_argument("--t5-zero3", action="store_true", help="shard the text encoder's weights with ZeRO-3")
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed config JSON for ZeRO-3")
    p.add_argument("--offload-model", action="store_true", help="keep models on the CPU between uses")
    p.add_argument("--t5-cpu", action="store_true", help="run the text encoder on the CPU")
    p.add_argument("--vae-tiling", default=None, help="decode in tiles, TILE[:OVERLAP] (default: whole)")
    return p


# ----------------------------------------------------------------------------------------------- messages


@dataclass
class Ready:
    """Rank 0, once every rank has loaded the model: the ranks' pids, device, dtype, resolved layout, world
    size and load time."""

    info: dict[str, Any]


@dataclass
class AskSettings:
    """Resolve generation settings (`WanPipeline.settings` keyword arguments); answered by rank 0 alone."""

    kwargs: dict[str, Any]


@dataclass
class AskVideoSize:
    """The video size for resolved settings (a `GenerationSettings` as a dict) and an image of this size."""

    settings: dict[str, Any]
    height: int
    width: int


@dataclass
class Generate:
    """One video: every rank samples it; rank 0 decodes and streams the frames back. `images`: name ->
    uint8 array [H, W, 3]; `settings`: `WanPipeline.generate_stream` keyword arguments."""

    prompt: str
    seed: int
    images: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class UseLoras:
    """Every rank merges this LoRA set into its DiT (`WanPipeline.use_loras`); rank 0 answers whether the
    weights changed. `data`: a `wan.lora.LoraSet`, tensors included, as plain pickle bytes (`of`, `loras`):
    the connection's own pickler would hand tensors over as shared-memory handles, which a process of
    another session cannot open."""

    data: bytes

    @classmethod
    def of(cls, loras: Any) -> UseLoras:
        return cls(pickle.dumps(loras, protocol=pickle.HIGHEST_PROTOCOL))

    def loras(self) -> Any:
        return pickle.loads(self.data)


@dataclass
class Stop:
    """Every rank leaves its request loop."""


@dataclass
class Answer:
    """The answer to an `AskSettings` (a `GenerationSettings` as a dict) or an `AskVideoSize` ((W, H))."""

    value: Any


@dataclass
class Chunk:
    """Decoded frames of the video in flight: uint8 [n, H, W, 3]."""

    frames: np.ndarray


@dataclass
class Done:
    """The video in flight is finished; rank 0's peak GPU memory during it (None on the CPU), its step
    cache's counts ({"forwards", "skipped"}; None without a step cache), and, when the request kept them,
    its final latents (float32 [z, T, h, w]) with the metadata of their file."""

    peak_memory_bytes: int | None = None
    cache_counts: dict[str, int] | None = None
    latents: np.ndarray | None = None
    latents_metadata: dict[str, str] | None = None


@dataclass
class Failed:
    """A bad request (kind "value"): answered, not retried, and the group carries on."""

    message: str
    kind: str = "value"
