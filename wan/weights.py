"""Reading weight files and loading them strictly, with errors that say what and where.

Every loader in `wan/` goes through here: `read_state_dict` understands the files the official and
diffusers checkpoints ship (`.safetensors`, sharded `.safetensors` with an `.index.json`, `.pth`),
and `load_strict` checks a state dict against a module and reports *every* missing key, unexpected
key and shape mismatch in one error that names the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "CheckpointError", "check_state_dict", "load_strict", "read_state_dict", "restore_meta_buffers",
    "tensor_shape",
]  # fmt: skip

_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the architecture."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weight file into a CPU state dict.

    `path` is a `.safetensors` file, a `.safetensors.index.json` shard index (every shard it names is
    read), or a `.pth`/`.pt`/`.bin` file holding a state dict (optionally under a `state_dict` key).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    name = path.name
    try:
        if name.endswith(".index.json"):
            return _read_sharded(path)
        if name.endswith(".safetensors"):
            return load_file(str(path), device="cpu")
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a shard index with a 'weight_map' ({exc})") from exc
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard!r} listed in the index is missing")
        tensors = load_file(str(shard_path), device="cpu")
        listed = {k for k, v in weight_map.items() if v == shard}
        absent = sorted(listed - tensors.keys())
        if absent:
            raise CheckpointError(
                f"{shard_path}: keys listed in {index_path.name} are not in the shard: {_clip(absent)}"
            )
        out.update(tensors)
    return out


def _clip(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def tensor_shape(
    sd: Mapping[str, torch.Tensor], key: str, ndim: int, *, source: str, needed_for: str
) -> tuple[int, ...]:
    """The shape of `sd[key]`, which must have `ndim` dimensions; a `CheckpointError` naming `source`, the key
    and what it is `needed_for` (e.g. "to infer the umT5 config") when it is missing or has another rank."""
    if key not in sd:
        raise CheckpointError(f"{source}: missing key {key!r} (needed {needed_for})")
    dims = tuple(sd[key].shape)
    if len(dims) != ndim:
        raise CheckpointError(f"{source}: {key!r} should have {ndim} dims, found shape {dims}")
    return dims


def restore_meta_buffers(module: nn.Module) -> None:
    """Make again, on the CPU, the buffers no state dict holds (transformers' non-persistent `position_ids`:
    0..N-1; `token_type_ids`: zeros), which a model built on the meta device and loaded with `assign` leaves
    on the meta device; then RuntimeError if any parameter or buffer is still there."""
    for owner in module.modules():
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer.is_meta:
                if name == "position_ids":
                    value = torch.arange(buffer.shape[-1]).expand(buffer.shape)
                else:
                    value = torch.zeros(buffer.shape)
                owner.register_buffer(name, value.to(buffer.dtype), persistent=False)
    meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device after loading: {', '.join(meta)}")


def check_state_dict(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    """Raise one `CheckpointError` listing every missing key, unexpected key and shape mismatch.

    `expected` maps key -> shape; `source` names the file (or directory) in the message.
    """
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    wrong = sorted(
        f"{k}: expected {tuple(expected[k])}, found {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_clip(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_clip(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_clip(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model:\n  " + "\n  ".join(problems))


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Validate `state_dict` against `module`'s own keys and shapes, then load it (copying values).

    Works for modules built on the meta device too (`assign=True` then materialises them).
    """
    own = module.state_dict()
    check_state_dict({k: v.shape for k, v in own.items()}, state_dict, source)
    on_meta = any(p.is_meta for p in own.values())
    if on_meta:
        dtypes = {k: v.dtype for k, v in own.items()}
        state_dict = {k: v.to(dtypes[k]) for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=on_meta)
    return module
