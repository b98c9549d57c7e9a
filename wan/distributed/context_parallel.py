"""Context parallelism for a `WanModel`: its token sequence split over the processes of a `ContextMesh`.

`apply_context_parallel(model, mesh)` sets the model's `sequence_sharding` hook (the model code does not
change). Per forward, with W = mesh.world_size and L tokens:

- after patch embedding the tokens [B, L, C] are padded at the end to Lp = ceil(L / W) * W and rank r keeps
  the contiguous block r of Lp / W tokens; RoPE rows are the block's global positions (padding rotates by 1);
- every block's self-attention runs Ulysses, then ring attention, told the number of real tokens L (a Python
  int: every K/V block's real keys are host arithmetic, nothing waits on the GPU), so padded keys are never
  attended and results equal the unsharded model for any L;
- cross-attention (against the replicated text / image context), the time modulation and the head are per
  token or per sample and run locally;
- the head's output [B, Lp / W, P] is gathered over the mesh and the padding dropped before unpatchify.

Every rank of the mesh must run the same forward (same inputs) at the same time: the ops are collective.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from wan.attention import AttentionOp
from wan.model import WanModel

from .mesh import ContextMesh, context_attention, validate_mesh
from .ulysses import group_size

__all__ = ["ContextParallelSharding", "apply_context_parallel", "remove_context_parallel"]


def _all_gather_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """x: [B, Ls, ...] -> [B, G*Ls, ...]: the group's shards laid end to end in group-rank order."""
    g = group_size(group)
    if g == 1:
        return x
    local = x.contiguous()
    parts = [torch.empty_like(local) for _ in range(g)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=1)


class ContextParallelSharding:
    """The `SequenceSharding` of `WanModel` for one rank of a `ContextMesh` (see the module docstring)."""

    def __init__(self, mesh: ContextMesh) -> None:
        self.mesh = mesh
        self._cached_for: torch.Tensor | None = None  # the rope table itself
        self._cache: torch.Tensor | None = None

    def _local_rope(self, rope: torch.Tensor) -> torch.Tensor:
        """rope: complex [L, D/2] -> this shard's rows [Lp/W, D/2] (padding rows: angle 0).

        Kept for the next call with the same table (every sampling step reuses the model's cached rope).
        """
        if self._cached_for is rope and self._cache is not None:
            return self._cache  # the table is held here, so `is` cannot match a new table at an old address
        w, r = self.mesh.world_size, self.mesh.rank
        length = rope.shape[0]
        local = -(-length // w)
        start = r * local
        rows = torch.ones(local, rope.shape[1], dtype=rope.dtype, device=rope.device)
        n_real = max(0, min(length - start, local))
        rows[:n_real] = rope[start : start + n_real]
        self._cached_for, self._cache = rope, rows
        return rows

    def shard(
        self, tokens: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionOp]:
        """tokens: [B, L, C]; rope: complex [L, D/2] -> (tokens [B, Lp/W, C], rope [Lp/W, D/2], attn op)."""
        w, r = self.mesh.world_size, self.mesh.rank
        length = tokens.shape[1]
        if rope.shape[0] != length:
            raise ValueError(f"rope has {rope.shape[0]} rows for {length} tokens")
        padded = -(-length // w) * w
        local = padded // w
        if padded != length:
            tokens = F.pad(tokens, (0, 0, 0, padded - length))  # zeros at the end: [B, Lp, C]
        tokens_local = tokens[:, r * local : (r + 1) * local]
        num_keys = length if padded != length else None
        op = functools.partial(context_attention, mesh=self.mesh, num_keys=num_keys)
        return tokens_local, self._local_rope(rope), op

    def gather(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """tokens: [B, Lp/W, P] this rank's rows -> [B, length, P] on every rank (padding dropped).

        Gathers inside the Ulysses group (contiguous ranks: contiguous blocks), then across the ring group
        (strided ranks: one Ulysses group's block each, in order), so only the mesh's own groups are used.
        """
        out = _all_gather_seq(tokens, self.mesh.ulysses_group)
        out = _all_gather_seq(out, self.mesh.ring_group)
        return out[:, :length]


def apply_context_parallel(model: WanModel, mesh: ContextMesh) -> WanModel:
    """Split `model`'s token sequence over `mesh` (in place; returns the model).

    Every rank builds the same model (same weights) and calls this with its own mesh; forwards are then
    collective over the mesh and every rank gets the whole output. Raises `ValueError` when the model's
    heads are not divisible by `mesh.ulysses_size`.
    """
    validate_mesh(mesh.ulysses_size, mesh.ring_size, mesh.world_size, model.cfg.num_heads)
    model.sequence_sharding = ContextParallelSharding(mesh)
    return model


def remove_context_parallel(model: WanModel) -> WanModel:
    """Undo `apply_context_parallel`: the model runs on one process again (in place; returns the model)."""
    model.sequence_sharding = None
    return model
