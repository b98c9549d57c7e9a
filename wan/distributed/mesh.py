"""The 2-D context-parallel process mesh: ``ring_size x ulysses_size`` over the default group.

Global rank ``r`` sits at ring position ``r // U`` and Ulysses position ``r % U`` (``U = ulysses_size``):

- Ulysses group ``p`` = ranks ``[p*U, (p+1)*U)``: contiguous, meant to live inside one node (all-to-all).
- Ring group ``u`` = ranks ``{u, u+U, u+2U, ...}``: strided, meant to span nodes (point-to-point).

The token sequence is split into ``world_size`` equal shards, shard ``r`` on rank ``r``. After the Ulysses
all-to-all, the ``U`` ranks of Ulysses group ``p`` all hold the contiguous block ``p`` of ``L / R`` tokens
(``R = ring_size``), each with its own share ``u`` of the heads; the ranks of ring group ``u`` then hold the
same heads and blocks ``0 .. R-1`` in ring order, so ring attention over them sees the whole sequence.

A group of size 1 is not created: its attribute is ``None`` and the collectives treat it as a no-op. A 1x1
mesh (``ContextMesh.single()``) therefore makes every context-parallel op a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .ring import ring_attention
from .ulysses import group_size, heads_to_seq, seq_to_heads

__all__ = ["ContextMesh", "context_attention", "validate_mesh"]


def validate_mesh(
    ulysses_size: int, ring_size: int, world_size: int, num_heads: int | None = None, replicas: int = 1
) -> None:
    """Raise ``ValueError`` with a clear message when the layout cannot work.

    Checks: sizes positive, ``replicas * ulysses_size * ring_size == world_size`` (``replicas`` = 2 with
    CFG parallelism: one mesh per half of the world), and (when given) ``num_heads`` divisible by
    ``ulysses_size``.
    """
    if ulysses_size < 1 or ring_size < 1:
        raise ValueError(
            f"ulysses_size and ring_size must be >= 1, got ulysses {ulysses_size}, ring {ring_size}"
        )
    if replicas * ulysses_size * ring_size != world_size:
        factors = [f"ulysses_size {ulysses_size}", f"ring_size {ring_size}"]
        factors += [f"cfg-parallel halves {replicas}"] if replicas > 1 else []
        raise ValueError(
            f"context-parallel mesh: {' * '.join(factors)} = {replicas * ulysses_size * ring_size} must "
            f"equal the world size {world_size} (the number of processes, torchrun --nproc_per_node)"
        )
    if num_heads is not None and num_heads % ulysses_size != 0:
        per_mesh = world_size // replicas
        fits = [u for u in range(1, per_mesh + 1) if per_mesh % u == 0 and num_heads % u == 0]
        best = max(fits)
        raise ValueError(
            f"context-parallel mesh: the model's {num_heads} attention heads are not divisible by "
            f"ulysses_size {ulysses_size}; use more ring instead, e.g. ulysses {best} x ring "
            f"{per_mesh // best} for {per_mesh} processes"
        )


@dataclass(frozen=True)
class ContextMesh:
    """This rank's place in the ``ring_size x ulysses_size`` mesh and its two process groups.

    ``ulysses_group`` / ``ring_group`` are ``None`` when that dimension has size 1 (no communication).
    """

    ulysses_size: int
    ring_size: int
    rank: int  # inside the mesh (with replicas, the global rank modulo the mesh size): the shard index
    ulysses_group: ProcessGroup | None
    ring_group: ProcessGroup | None

    @property
    def world_size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def ulysses_rank(self) -> int:
        """Position inside the Ulysses group = which share of the heads this rank owns after all-to-all."""
        return self.rank % self.ulysses_size

    @property
    def ring_rank(self) -> int:
        """Position inside the ring group = which ``L / ring_size`` block of tokens (after all-to-all)."""
        return self.rank // self.ulysses_size

    @classmethod
    def single(cls) -> ContextMesh:
        """The degenerate 1x1 mesh of one process: every context-parallel op is a no-op."""
        return cls(ulysses_size=1, ring_size=1, rank=0, ulysses_group=None, ring_group=None)

    @classmethod
    def build(
        cls, ulysses_size: int, ring_size: int, num_heads: int | None = None, *, replicas: int = 1
    ) -> ContextMesh:
        """Build the mesh over the default process group (or the 1x1 mesh when none is initialised).

        ``replicas`` > 1 splits the world into that many contiguous blocks of ``ulysses_size * ring_size``
        ranks, each its own mesh (CFG parallelism: one per guidance branch); this rank gets its block's.
        Collective: every rank must call it with the same arguments, in the same order relative to other
        ``dist.new_group`` calls, since every rank creates every group.
        """
        initialized = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialized else 1
        rank = dist.get_rank() if initialized else 0
        validate_mesh(ulysses_size, ring_size, world_size, num_heads, replicas)
        size = ulysses_size * ring_size
        if size == 1:
            return cls.single()

        ulysses_group = ring_group = None
        for block in range(replicas):
            base = block * size
            if ulysses_size > 1:
                for p in range(ring_size):
                    ranks = list(range(base + p * ulysses_size, base + (p + 1) * ulysses_size))
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        ulysses_group = group
            if ring_size > 1:
                for u in range(ulysses_size):
                    ranks = list(range(base + u, base + size, ulysses_size))
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        ring_group = group
        return cls(ulysses_size, ring_size, rank % size, ulysses_group, ring_group)


def _gather_key_mask(key_mask: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """key_mask: [B, Ls] bool of this rank's shard -> [B, U*Ls] bool of the Ulysses group's whole block."""
    u = group_size(group)
    if u == 1:
        return key_mask
    local = key_mask.to(torch.uint8).contiguous()
    parts = [torch.empty_like(local) for _ in range(u)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=1).bool()


def context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mesh: ContextMesh,
    *,
    key_mask: torch.Tensor | None = None,
    num_keys: int | None = None,
) -> torch.Tensor:
    """Self-attention over the whole sequence from this rank's sequence shard: Ulysses, then ring.

    q, k, v: [B, L/W, H, D] shard ``mesh.rank`` of the sequence (W = world size, all heads)
    -> [B, L/W, H, D]: this shard's rows of softmax attention over all L tokens, padding left out.
    Padding is said either as `num_keys`, a host int: the first `num_keys` tokens of the whole sequence are
    real (the sharding knows it; no mask travels, no host sync), or as `key_mask` [B, L/W] bool for the same
    shard, True = a real token (gathered in the Ulysses group). Collective over the whole mesh. After the
    Ulysses all-to-all the ring blocks are the contiguous L/R blocks in ring order, so `num_keys` counts the
    real keys of the ring's concatenated blocks too.
    """
    group = mesh.ulysses_group
    q, k, v = (seq_to_heads(t, group) for t in (q, k, v))  # [B, L/R, H/U, D]
    if key_mask is not None:
        key_mask = _gather_key_mask(key_mask, group)  # [B, L/R]
    out = ring_attention(q, k, v, mesh.ring_group, key_mask=key_mask, num_keys=num_keys)
    return heads_to_seq(out, group)
