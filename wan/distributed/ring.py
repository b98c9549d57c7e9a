"""Ring attention over a process group, with log-sum-exp merging in fp32.

Rank ``i`` of a ring of ``R`` holds query block ``i`` and key/value block ``i`` of the sequence. In ``R``
steps each rank attends its queries to every K/V block: at step ``s`` it holds the block of rank
``(i - s) mod R``, starts sending it to rank ``i + 1`` and receiving the next one from rank ``i - 1`` (one
``batch_isend_irecv``), computes attention on the block it holds while the transfer runs, then waits.
Partial outputs are merged with their log-sum-exp in fp32, so the result equals softmax attention over the
concatenated sequence.

Padding: ``key_mask`` ([B, Lk_local] bool, True = a real key) travels around the ring with its K/V block;
masked keys are never attended to.

Per-block attention: `block_attention_kernel` (the default) runs PyTorch's fused flash-attention kernels,
which return the log-sum-exp: `_scaled_dot_product_flash_attention` on a GPU (fp16 / bf16), the
memory-efficient kernel there otherwise, and the fused CPU kernel on the CPU. `block_attention_reference`
is the exact fp32 computation it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .ulysses import group_size

__all__ = [
    "BlockAttention",
    "block_attention_kernel",
    "block_attention_reference",
    "merge_partial",
    "ring_attention",
]

# (q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, D], key_mask [B, Lk] bool | None)
#     -> (out fp32 [B, Lq, H, D], lse fp32 [B, H, Lq])
BlockAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]


def block_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of one block in fp32, scale 1/sqrt(D), returning its log-sum-exp.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D], key_mask: [B, Lk] bool (True = attend) or None
    -> out: fp32 [B, Lq, H, D], lse: fp32 [B, H, Lq]. A query with no unmasked key gets out 0, lse -inf.
    """
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(nan=0.0)  # rows of all -inf: 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out, lse


def _real_prefix(key_mask: torch.Tensor) -> int | None:
    """How many keys are real when `key_mask` [B, Lk] is the same run of True then False in every row (the
    context-parallel padding is); None for any other mask."""
    first = key_mask[0]
    n = int(first.sum())
    if bool(first[:n].all()) and bool((key_mask == first).all()):
        return n
    return None


def block_attention_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's softmax attention through a fused kernel that returns its log-sum-exp.

    Same contract as `block_attention_reference`: q [B, Lq, H, D], k and v [B, Lk, H, D], key_mask [B, Lk]
    bool or None -> (out fp32 [B, Lq, H, D], lse fp32 [B, H, Lq]). A padding mask (real keys first, the
    same in every row) is applied by leaving the padded keys out, so every kernel can take it; another mask
    goes to the kernel as an additive bias (the CPU and memory-efficient kernels).
    """
    b, lq, h, _ = q.shape
    bias = None
    if key_mask is not None:
        n_real = _real_prefix(key_mask)
        if n_real == 0:
            empty = torch.full((b, h, lq), float("-inf"), device=q.device)
            return torch.zeros(q.shape, dtype=torch.float32, device=q.device), empty
        if n_real is not None:
            k, v = k[:, :n_real], v[:, :n_real]
        elif not bool(key_mask.any(dim=1).all()):  # a row with no key at all: kernels would give NaN
            return block_attention_reference(q, k, v, key_mask)
        else:
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :].expand(b, h, lq, -1)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    if q.device.type == "cuda":
        flash_ok = torch.cuda.get_device_capability(q.device)[0] >= 8  # flash kernels need sm80+
        if bias is None and flash_ok and q.dtype in (torch.float16, torch.bfloat16):
            out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)
        else:
            out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
                qt, kt, vt, bias, compute_log_sumexp=True
            )
            lse = lse[..., :lq]  # the kernel pads its log-sum-exp rows to a multiple of 32
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, attn_mask=bias)
    return out.transpose(1, 2).float(), lse.float()


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two normalised partial attentions over disjoint key sets (all fp32).

    out, block_out: [B, Lq, H, D]; lse, block_lse: [B, H, Lq] -> merged (out [B, Lq, H, D], lse [B, H, Lq]).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    empty = torch.isneginf(new_lse)  # no key seen yet on either side: keep 0 instead of NaN
    w_old = torch.where(empty, 0.0, torch.exp(lse - new_lse)).transpose(1, 2)[..., None]
    w_new = torch.where(empty, 0.0, torch.exp(block_lse - new_lse)).transpose(1, 2)[..., None]
    return out * w_old + block_out * w_new, new_lse


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: ProcessGroup | None,
    *,
    key_mask: torch.Tensor | None = None,
    block_attention: BlockAttention = block_attention_kernel,
) -> torch.Tensor:
    """Softmax attention of this rank's queries over the keys of every rank in the ring ``group``.

    q: [B, Lq, H, D] this rank's query block; k, v: [B, Lk, H, D] this rank's K/V block (``Lk`` the same on
    every rank); key_mask: [B, Lk] bool, True = a real key (None: all real) -> [B, Lq, H, D] in q's dtype.
    Equals ``attention(q, cat(k_0..k_{R-1}), cat(v_0..v_{R-1}))`` with masked keys left out. Collective over
    ``group``; ``group=None`` or one rank: plain (masked) attention on the local block.
    """
    ring = group_size(group)
    b, lk = k.shape[:2]
    if key_mask is not None and key_mask.shape != (b, lk):
        raise ValueError(f"ring_attention: key_mask must be [B, Lk] = {[b, lk]}, got {list(key_mask.shape)}")
    if ring == 1:
        out, _ = block_attention(q, k, v, key_mask)
        return out.to(q.dtype)

    me = dist.get_rank(group)
    send_to = dist.get_global_rank(group, (me + 1) % ring)
    recv_from = dist.get_global_rank(group, (me - 1) % ring)
    kv = torch.stack([k, v]).contiguous()  # [2, B, Lk, H, D]: one message per step
    mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()  # gloo has no bool P2P

    out = lse = None
    for step in range(ring):
        requests = []
        if step < ring - 1:  # start moving the next block before computing on this one
            next_kv, next_mask = torch.empty_like(kv), None if mask is None else torch.empty_like(mask)
            ops = [
                dist.P2POp(dist.isend, kv, send_to, group),
                dist.P2POp(dist.irecv, next_kv, recv_from, group),
            ]
            if mask is not None:
                ops += [
                    dist.P2POp(dist.isend, mask, send_to, group),
                    dist.P2POp(dist.irecv, next_mask, recv_from, group),
                ]
            requests = dist.batch_isend_irecv(ops)
        block_out, block_lse = block_attention(q, kv[0], kv[1], None if mask is None else mask.bool())
        if out is None:
            out, lse = block_out, block_lse
        else:
            out, lse = merge_partial(out, lse, block_out, block_lse)
        for request in requests:
            request.wait()
        if step < ring - 1:
            kv, mask = next_kv, next_mask
    return out.to(q.dtype)
