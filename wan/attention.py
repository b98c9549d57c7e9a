"""The one attention entry point of the DiT.

Every attention in `wan/model.py` calls `attention(q, k, v)`, which takes the fastest kernel at hand:

- flash-attn (`flash_attn_func`) when the package is installed, the tensors are on an Ampere or newer GPU
  in fp16 / bf16 and the head dim is one it supports: it takes our `[B, L, H, D]` layout as is;
- otherwise PyTorch's scaled-dot-product attention, which itself picks flash, cuDNN or memory-efficient
  kernels on a GPU and a fused kernel on the CPU.

`WAN_ATTENTION=sdpa` (read once, at the first attention) keeps flash-attn out even when installed, for
benchmarks and comparisons. Context
parallelism (`wan/distributed/context_parallel.py`) hands the self-attentions its own function of the same
signature for each forward, through the model's generic `sequence_sharding` hook; the model code knows
nothing of meshes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["AttentionOp", "attention", "attention_backend"]


class AttentionOp(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@functools.cache
def _flash_attn() -> Callable[..., torch.Tensor] | None:
    """flash-attn's `flash_attn_func` when installed and importable (it needs CUDA), else None."""
    if os.environ.get("WAN_ATTENTION", "").lower() == "sdpa" or not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another torch / CUDA
        return None
    return flash_attn_func


def attention_backend(q: torch.Tensor) -> str:
    """Which backend `attention` uses for tensors like `q` [B, L, H, D]: "flash_attn" or "sdpa"."""
    usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    if usable and _flash_attn() is not None and torch.cuda.get_device_capability(q.device)[0] >= 8:
        return "flash_attn"  # flash-attn 2 runs on Ampere (sm80) and newer
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim), no mask.

    q: [B, Lq, N, D], k and v: [B, Lk, N, D] -> [B, Lq, N, D].
    """
    if attention_backend(q) == "flash_attn":
        return _flash_attn()(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
