"""Ulysses all-to-all: sequence shards with all heads <-> the whole sequence with a share of the heads.

Inside a group of ``U`` ranks, rank ``i`` holds tokens ``[i*Ls, (i+1)*Ls)`` of a sequence of ``L = U*Ls``.
``seq_to_heads`` gives rank ``i`` heads ``[i*H/U, (i+1)*H/U)`` of all ``L`` tokens; ``heads_to_seq`` is the
inverse. Pure data movement (exact, any dtype); not differentiable (inference). ``group=None`` or a group of
one rank: the input is returned unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["group_size", "heads_to_seq", "seq_to_heads"]


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in ``group``; ``None`` means no parallelism (1)."""
    return 1 if group is None else dist.get_world_size(group)


def seq_to_heads(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """x: [B, L/U, H, D] (sequence shard, all heads) -> [B, L, H/U, D] (all tokens, a head share)."""
    u = group_size(group)
    if u == 1:
        return x
    b, ls, h, d = x.shape
    if h % u != 0:
        raise ValueError(f"seq_to_heads: {h} heads are not divisible by the Ulysses group size {u}")
    # Chunk j of dim 0 (heads share j) goes to rank j.
    send = x.reshape(b, ls, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv chunk i: sequence shard i, our heads share: [U, B, Ls, H/U, D] -> [B, U*Ls, H/U, D].
    return recv.permute(1, 0, 2, 3, 4).reshape(b, u * ls, h // u, d)


def heads_to_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """x: [B, L, H/U, D] (all tokens, a head share) -> [B, L/U, H, D] (its sequence shard, all heads)."""
    u = group_size(group)
    if u == 1:
        return x
    b, seq, hs, d = x.shape
    if seq % u != 0:
        raise ValueError(
            f"heads_to_seq: sequence length {seq} is not divisible by the Ulysses group size {u}"
        )
    # Chunk j of dim 0 (sequence shard j) goes to rank j.
    send = x.reshape(b, u, seq // u, hs, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv chunk i: heads share i of our shard: [U, B, Ls, Hs, D] -> [B, Ls, U*Hs, D].
    return recv.permute(1, 2, 0, 3, 4).reshape(b, seq // u, u * hs, d)
