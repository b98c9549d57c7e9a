"""The one attention entry point of the DiT.

Every attention in `wan/model.py` calls `attention(q, k, v)`. It runs PyTorch's scaled-dot-product
attention, which picks the fastest kernel available (flash / memory-efficient / cuDNN on a GPU,
a fused CPU kernel otherwise). Context parallelism (`wan/distributed/context_parallel.py`) hands the
self-attentions its own function of the same signature for each forward, through the model's generic
`sequence_sharding` hook; the model code knows nothing of meshes.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["AttentionOp", "attention"]


class AttentionOp(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim), no mask.

    q: [B, Lq, N, D], k and v: [B, Lk, N, D] -> [B, Lq, N, D].
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
