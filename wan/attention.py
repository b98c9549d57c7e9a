"""The attention kernels of the DiT, and the choice among them.

Every attention in `wan/model.py` is softmax attention with scale 1/sqrt(head_dim), no mask, on
q [B, Lq, N, D], k and v [B, Lk, N, D] -> [B, Lq, N, D]. Four kernels compute it; which one runs depends on
the device, the dtype and the head width (`choose_kernel`), and on what is installed:

- "fa3": FlashAttention-3 (`flash_attn_interface.flash_attn_func`), on Hopper (sm90) in fp16 / bf16 with a
  head width that is a multiple of 8, up to 256, when the package imports;
- "sdpa-cudnn/flash": PyTorch's scaled-dot-product attention told to try its cuDNN kernel first, then its
  flash kernel (then memory-efficient, then math), on Hopper in fp16 / bf16. Left to itself SDPA takes its
  flash kernel (FlashAttention-2) first; cuDNN's attention is the faster one on sm90;
- "flash_attn": flash-attn 2 (`flash_attn.flash_attn_func`) on Ampere (sm80) and newer in fp16 / bf16,
  head width up to 256, when the package imports (on Hopper only when neither of the above can run);
- "sdpa": PyTorch's scaled-dot-product attention as it chooses (a fused kernel on the CPU). The CPU always
  takes this one.

The choice is made outside the code that `torch.compile` traces: `resolve_attention` (cached per device,
dtype and head width) returns a plain function, which `WanModel.forward` resolves once per forward and hands
to every block. The kernels themselves hold nothing that graph-breaks: no environment reads, imports or
device queries. `attention(q, k, v)` resolves and calls in one step, for eager callers.

`WAN_ATTENTION` (read once, at the first resolution; `reset_attention_cache` reads it again) asks for one
kernel by name ("fa3", "sdpa-cudnn/flash", "flash_attn", "sdpa"; "auto" or unset: the order above). A kernel
that cannot run the tensors at hand (on the CPU, in float32, not installed) gives way to the automatic choice;
`WAN_ATTENTION=sdpa` keeps the flash packages and the backend priority out, for comparisons.

Context parallelism (`wan/distributed/context_parallel.py`) hands the self-attentions its own function of
the same signature for each forward, through the model's generic `sequence_sharding` hook; the model code
knows nothing of meshes.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Collection
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "KERNELS",
    "AttentionOp",
    "attention",
    "attention_backend",
    "attention_kernel",
    "available_kernels",
    "choose_kernel",
    "get_kernel",
    "kernel_name",
    "reset_attention_cache",
    "resolve_attention",
    "sdpa",
]

# Every kernel name, fastest first where more than one can run.
KERNELS = ("fa3", "sdpa-cudnn/flash", "flash_attn", "sdpa")
_HALF = (torch.float16, torch.bfloat16)


class AttentionOp(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's scaled-dot-product attention in our layout.

    q [B, Lq, N, D], k, v [B, Lk, N, D] -> [B, Lq, N, D].
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_cudnn_flash_op() -> AttentionOp | None:
    """SDPA with the backend priority cuDNN, flash, memory-efficient, math (None: this torch's `sdpa_kernel`
    takes no priority order)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return None
    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]

    def sdpa_cudnn_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Lq, N, D], k, v [B, Lk, N, D] -> [B, Lq, N, D], cuDNN's kernel first."""
        with sdpa_kernel(order, set_priority=True):
            return sdpa(q, k, v)

    return sdpa_cudnn_flash


def _flash_attn_3_op() -> AttentionOp | None:
    """FlashAttention-3's `flash_attn_func` in our layout (None: `flash_attn_interface` does not import)."""
    try:
        from flash_attn_interface import flash_attn_func
    except Exception:  # not installed, or built for another torch / CUDA
        return None

    def fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Lq, N, D], k, v [B, Lk, N, D] (fp16 / bf16, on sm90) -> [B, Lq, N, D]."""
        out = flash_attn_func(q, k, v)
        # Its releases differ: some return (out, softmax_lse), later ones the output alone.
        return out[0] if isinstance(out, tuple) else out

    return fa3


def _flash_attn_2_op() -> AttentionOp | None:
    """flash-attn 2's `flash_attn_func`, which takes our layout as is (None: `flash_attn` does not import)."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another torch / CUDA
        return None

    def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Lq, N, D], k, v [B, Lk, N, D] (fp16 / bf16, sm80+) -> [B, Lq, N, D]."""
        return flash_attn_func(q, k, v)

    return flash_attn


@functools.cache
def _kernels() -> dict[str, AttentionOp]:
    """The kernels this process can call, by name (the imports are tried once)."""
    found: dict[str, AttentionOp | None] = {
        "fa3": _flash_attn_3_op(),
        "sdpa-cudnn/flash": _sdpa_cudnn_flash_op(),
        "flash_attn": _flash_attn_2_op(),
        "sdpa": sdpa,
    }
    return {name: op for name, op in found.items() if op is not None}


def available_kernels() -> frozenset[str]:
    """Names of the kernels this process can call (installed and importable), whatever the device."""
    return frozenset(_kernels())


def get_kernel(name: str) -> AttentionOp:
    """The function of kernel `name` (one of `available_kernels()`), whatever the tensors: for benchmarks
    that compare kernels. KeyError names the ones this process has."""
    kernels = _kernels()
    if name not in kernels:
        raise KeyError(f"attention kernel {name!r} is not available here; available: {sorted(kernels)}")
    return kernels[name]


@functools.cache
def _requested() -> str | None:
    """The kernel `WAN_ATTENTION` asks for (None: automatic); ValueError for an unknown name."""
    value = os.environ.get("WAN_ATTENTION", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in KERNELS:
        raise ValueError(f"WAN_ATTENTION={value!r}: expected auto or one of {', '.join(KERNELS)}")
    return value


def _usable(name: str, capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether kernel `name` runs tensors of `dtype` and `head_dim` on a device of compute `capability`
    (None: not a CUDA device)."""
    if name == "sdpa":
        return True
    if capability is None or dtype not in _HALF or head_dim > 256:
        return False
    if name == "fa3":
        return capability[0] == 9 and head_dim % 8 == 0
    if name == "sdpa-cudnn/flash":
        return capability[0] == 9
    return capability[0] >= 8  # flash_attn: FlashAttention-2 runs on Ampere and newer


def choose_kernel(
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    head_dim: int,
    available: Collection[str] | None = None,
    requested: str | None = None,
) -> str:
    """The kernel for tensors of `dtype` and `head_dim` on a device of CUDA compute `capability` (None: the
    CPU or another non-CUDA device), among the `available` names (None: `available_kernels()`).

    `requested`: a name from `KERNELS` tried first (`WAN_ATTENTION`); "sdpa" is taken as asked. Otherwise the
    first usable of fa3, sdpa-cudnn/flash, flash_attn, sdpa.
    """
    names = available_kernels() if available is None else frozenset(available) | {"sdpa"}
    if requested is not None and requested in names and _usable(requested, capability, dtype, head_dim):
        return requested
    return next(name for name in KERNELS if name in names and _usable(name, capability, dtype, head_dim))


def _device(device: torch.device | str) -> torch.device:
    """`device` with its index ("cuda" is the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.cache
def _capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability (9, 0) for sm90; None for any other kind of device."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def kernel_name(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel `resolve_attention` picks for q, k, v of `dtype` and `head_dim` on `device` (a name from
    `KERNELS`): what a benchmark or a sidecar records. Not for code under `torch.compile`."""
    return choose_kernel(_capability(_device(device)), dtype, head_dim, requested=_requested())


def attention_kernel(q: torch.Tensor) -> str:
    """The kernel that `attention` (and the DiT) uses for queries like `q` [B, L, N, D]."""
    return kernel_name(q.device, q.dtype, q.shape[-1])


attention_backend = attention_kernel  # the name of earlier releases


_resolved: dict[tuple[torch.device, torch.dtype, int], AttentionOp] = {}


def resolve_attention(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> AttentionOp:
    """The attention function for q, k, v of `dtype` and `head_dim` on `device` (`kernel_name` says which):
    q [B, Lq, N, D], k, v [B, Lk, N, D] -> [B, Lq, N, D]. Resolve it before a compiled region and pass it in:
    the function itself reads no environment, imports nothing and queries no device."""
    device = _device(device)
    key = (device, dtype, head_dim)
    op = _resolved.get(key)
    if op is None:
        op = _resolved[key] = _kernels()[kernel_name(device, dtype, head_dim)]
    return op


def reset_attention_cache() -> None:
    """Forget every choice: the next resolution imports, reads `WAN_ATTENTION` and queries devices again."""
    _resolved.clear()
    _kernels.cache_clear()
    _requested.cache_clear()
    _capability.cache_clear()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim), no mask, by the kernel `attention_kernel(q)` names.

    q: [B, Lq, N, D], k and v: [B, Lk, N, D] -> [B, Lq, N, D]. For eager code: under `torch.compile` pass a
    `resolve_attention` result in instead.
    """
    return resolve_attention(q.device, q.dtype, q.shape[-1])(q, k, v)
