"""Ring attention over a process group, with log-sum-exp merging in fp32.

Rank ``i`` of a ring of ``R`` holds query block ``i`` and key/value block ``i`` of the sequence. In ``R``
steps each rank attends its queries to every K/V block: at step ``s`` it holds the block of rank
``(i - s) mod R``, starts sending it to rank ``i + 1`` and receiving the next one from rank ``i - 1`` (one
``batch_isend_irecv``), computes attention on the block it holds while the transfer runs, then waits.
Partial outputs are merged with their log-sum-exp in fp32, so the result equals softmax attention over the
concatenated sequence.

Padding, two ways:

- ``num_keys`` (a Python int): the concatenated keys are real up to ``num_keys`` and padding after it, alike
  in every batch row. This is the context-parallel padding (`context_parallel.py` knows the token count on
  the host), so every block's real key count is host arithmetic: padded keys are sliced off before the
  kernel and an all-padding block is skipped. Nothing waits on the device.
- ``key_mask`` ([B, Lk_local] bool, True = a real key), any mask: it travels around the ring with its K/V
  block and reaches the kernel as an additive bias (see below). Also free of host syncs.

Per-block attention: `block_attention_kernel` (the default) runs PyTorch's fused kernels, which return the
log-sum-exp: on a GPU `_scaled_dot_product_flash_attention` (sm80+, fp16 / bf16, no bias) and
`_scaled_dot_product_efficient_attention` otherwise; on the CPU `_scaled_dot_product_flash_attention_for_cpu`.
Called directly, these skip what `F.scaled_dot_product_attention` does around them on CUDA, so it is done
here (torch 2.x constraints, from its kernel checks):

- head dim: the flash kernel needs a multiple of 8 (<= 256); the memory-efficient kernel needs every stride
  of q / k / v but the last (and the head dim) to be a multiple of 8 elements in fp16 / bf16 (4 in fp32).
  q, k and v are zero-padded to a head dim multiple of 8 for the GPU kernels (zeros change no score and give
  zero output columns, sliced off), with the scale of the true head dim;
- bias: the memory-efficient kernel needs the bias's batch, head and query strides to be multiples of 8
  (fp16 / bf16; 4 in fp32) whenever that dimension is above 1, and its pointer 16-byte aligned. The bias is
  allocated with its key dimension padded to a multiple of 16 and sliced, so its batch stride is a multiple
  of 16 for any key count, and broadcast (stride 0) over heads and queries.

`block_attention_reference` is the exact fp32 computation the kernels are tested against. The GPU kernels
are looked up in `BLOCK_KERNELS` by name, so tests can put checking stand-ins there and run this module's
GPU path on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from .ulysses import group_size

__all__ = [
    "BIAS_ALIGN",
    "BLOCK_KERNELS",
    "HEAD_DIM_ALIGN",
    "BlockAttention",
    "FusedAttention",
    "block_attention_kernel",
    "block_attention_reference",
    "merge_partial",
    "pick_block_kernel",
    "ring_attention",
]

# (q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, D], key_mask [B, Lk] bool | None)
#     -> (out fp32 [B, Lq, H, D], lse fp32 [B, H, Lq])
BlockAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]

# One fused kernel call: (q [B, H, Lq, Dp], k [B, H, Lk, Dp], v [B, H, Lk, Dp], bias [B, H, Lq, Lk] | None,
# scale) -> (out [B, H, Lq, Dp] in q's dtype, lse fp32 [B, H, >= Lq]: rows past Lq are ignored).
FusedAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], tuple[torch.Tensor, torch.Tensor]
]

HEAD_DIM_ALIGN = 8  # the GPU kernels get a head dim that is a multiple of this (zero-padded)
BIAS_ALIGN = 16  # elements: the bias's key dimension is allocated padded to a multiple of this
_HALF = (torch.float16, torch.bfloat16)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _flash_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA flash attention (no bias): [B, H, L, Dp] inputs -> (out [B, H, Lq, Dp], lse fp32 [B, H, Lq])."""
    if bias is not None:
        raise ValueError("the flash kernel takes no bias")
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
    return out, lse


def _efficient_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA memory-efficient attention: [B, H, L, Dp] inputs, bias [B, H, Lq, Lk] or None
    -> (out [B, H, Lq, Dp], lse fp32 [B, H, round_up(Lq, 32)]: the kernel pads its log-sum-exp rows)."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)
    return out, lse


def _cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU kernel: [B, H, L, D] inputs (any head dim), bias [B, H, Lq, Lk] or None
    -> (out [B, H, Lq, D], lse fp32 [B, H, Lq])."""
    cpu_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = cpu_kernel(q, k, v, attn_mask=bias, scale=scale)
    return out, lse


# Looked up at every call, so a test can put a stand-in under a name.
BLOCK_KERNELS: dict[str, FusedAttention] = {"flash": _flash_cuda, "efficient": _efficient_cuda, "cpu": _cpu}


def pick_block_kernel(q: torch.Tensor, has_bias: bool) -> str:
    """The `BLOCK_KERNELS` name `block_attention_kernel` uses for q [B, Lq, H, D]: "cpu" off CUDA; "flash"
    on sm80+ in fp16 / bf16 without a bias and a (padded) head dim <= 256; "efficient" otherwise."""
    if q.device.type != "cuda":
        return "cpu"
    half = q.dtype in _HALF and _round_up(q.shape[-1], HEAD_DIM_ALIGN) <= 256
    if not has_bias and half and torch.cuda.get_device_capability(q.device)[0] >= 8:
        return "flash"
    return "efficient"


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


def _key_bias(
    key_mask: torch.Tensor, dtype: torch.dtype, heads: int, lq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """key_mask [B, Lk] bool -> (additive bias [B, H, Lq, Lk] in `dtype`, has_key [B] bool).

    The bias is a view of a [B, round_up(Lk, BIAS_ALIGN)] buffer, broadcast over heads and queries: strides
    (round_up(Lk, 16), 0, 0, 1), which the memory-efficient kernel accepts for any B and Lk. A row with no
    key at all gets a zero bias (the kernel's result stays finite) and is overwritten by the caller.
    """
    b, lk = key_mask.shape
    has_key = key_mask.any(dim=1)  # [B]
    blocked = ~(key_mask | ~has_key[:, None])  # [B, Lk]: masked keys of rows that have a key
    buffer = torch.zeros(b, _round_up(lk, BIAS_ALIGN), dtype=dtype, device=key_mask.device)
    bias = buffer[:, :lk].masked_fill_(blocked, float("-inf"))
    return bias[:, None, None, :].expand(b, heads, lq, lk), has_key


def block_attention_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's softmax attention through a fused kernel that returns its log-sum-exp.

    Same contract as `block_attention_reference`: q [B, Lq, H, D], k and v [B, Lk, H, D], key_mask [B, Lk]
    bool or None -> (out fp32 [B, Lq, H, D], lse fp32 [B, H, Lq]); a query with no unmasked key gets out 0,
    lse -inf. A mask reaches the kernel as an aligned additive bias (module docstring); the GPU kernels get
    the head dim zero-padded to a multiple of 8. ``kernel``: a `BLOCK_KERNELS` name (default:
    `pick_block_kernel`). No host synchronisation.
    """
    _, lq, h, d = q.shape
    name = kernel if kernel is not None else pick_block_kernel(q, key_mask is not None)
    bias = has_key = None
    if key_mask is not None:
        bias, has_key = _key_bias(key_mask, q.dtype, h, lq)
    if name != "cpu" and d % HEAD_DIM_ALIGN:
        pad = _round_up(d, HEAD_DIM_ALIGN) - d
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))  # [B, L, H, Dp], contiguous
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, Dp]
    out, lse = BLOCK_KERNELS[name](qt, kt, vt, bias, d**-0.5)
    out = out.transpose(1, 2)[..., :d].float()  # [B, Lq, H, D]
    lse = lse[..., :lq].float()  # the memory-efficient kernel pads its rows to a multiple of 32
    if has_key is not None:  # rows without any key: out 0, lse -inf (on the device, no sync)
        out = torch.where(has_key[:, None, None, None], out, 0.0)
        lse = torch.where(has_key[:, None, None], lse, float("-inf"))
    return out, lse


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


def _real_keys(num_keys: int | None, block: int, lk: int) -> int:
    """How many of block ``block``'s ``lk`` keys are real when the first ``num_keys`` of the concatenated
    keys are (None: all). Host arithmetic."""
    if num_keys is None:
        return lk
    return max(0, min(num_keys - block * lk, lk))


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: ProcessGroup | None,
    *,
    key_mask: torch.Tensor | None = None,
    num_keys: int | None = None,
    block_attention: BlockAttention = block_attention_kernel,
) -> torch.Tensor:
    """Softmax attention of this rank's queries over the keys of every rank in the ring ``group``.

    q: [B, Lq, H, D] this rank's query block; k, v: [B, Lk, H, D] this rank's K/V block (``Lk`` the same on
    every rank) -> [B, Lq, H, D] in q's dtype. Equals ``attention(q, cat(k_0..k_{R-1}), cat(v_0..v_{R-1}))``
    with padded keys left out, given either (not both) of:

    - key_mask: [B, Lk] bool for this rank's block, True = a real key;
    - num_keys: Python int, the first ``num_keys`` of the ``R * Lk`` concatenated keys are real and the rest
      padding, in every row (each block's share is computed on the host; no mask travels).

    A query that sees no real key at all gets 0. Collective over ``group``; ``group=None`` or one rank:
    plain (masked) attention on the local block. No host synchronisation.
    """
    ring = group_size(group)
    b, lk = k.shape[:2]
    if key_mask is not None and key_mask.shape != (b, lk):
        raise ValueError(f"ring_attention: key_mask must be [B, Lk] = {[b, lk]}, got {list(key_mask.shape)}")
    if num_keys is not None:
        if key_mask is not None:
            raise ValueError("ring_attention: give key_mask or num_keys, not both")
        if not 0 <= num_keys <= ring * lk:
            raise ValueError(f"ring_attention: num_keys must be in [0, {ring * lk}], got {num_keys}")
    me = 0 if ring == 1 else dist.get_rank(group)

    def attend(
        kb: torch.Tensor, vb: torch.Tensor, mask: torch.Tensor | None, block: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Attention on the K/V block of ring rank ``block``: (out, lse), or None when it has no real key."""
        n = _real_keys(num_keys, block, lk)
        if n == 0:
            return None
        if n < lk:
            kb, vb = kb[:, :n], vb[:, :n]
        return block_attention(q, kb, vb, mask)

    if ring == 1:
        result = attend(k, v, key_mask, 0)
        return torch.zeros_like(q) if result is None else result[0].to(q.dtype)

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
        result = attend(kv[0], kv[1], None if mask is None else mask.bool(), (me - step) % ring)
        if result is not None:
            if out is None:
                out, lse = result
            else:
                out, lse = merge_partial(out, lse, *result)
        for request in requests:
            request.wait()
        if step < ring - 1:
            kv, mask = next_kv, next_mask
    return torch.zeros_like(q) if out is None else out.to(q.dtype)
