"""Context parallelism: bytes each rank sends per DiT forward, and a scaling model of the step time.

    python benchmarks/context_parallel.py                        # CPU: ~30 s on 2 cores
    python benchmarks/context_parallel.py --nvlink-gbps 370 --ib-gbps 45 --overlap 0.5
    python benchmarks/context_parallel.py --measure-gpu          # CUDA: time one t2v-14B block at 720P

Three parts:

1. Bytes sent per rank per forward, by `comm_bytes_per_rank` (formulas from `wan/distributed/*`) and
   measured: the tiny t2v DiT runs under context parallelism in 2 and 4 gloo processes (Ulysses, ring and
   2-D layouts, with and without padding) while this script's workers count what `all_to_all_single`,
   `batch_isend_irecv` and `all_gather` send (the real ops still run). Measured must equal the formula.
2. The same formula for t2v-14B at 1280x720x81 (75,600 tokens), bf16, batch 1, on 8, 16 and 64 GPUs.
3. A scaling model: one GPU's forward time split into attention, per-token linear work and work every
   rank repeats, plus communication over NVLink (Ulysses, inside a node) and InfiniBand (ring, when the
   mesh spans nodes; overlapped with the block attention) -> per-step and per-video seconds on N GPUs,
   compared with the official Wan 2.1 H100 table (287.9 s on 8 GPUs). The one-GPU forward comes from that
   table (1837.9 s) unless `--measure-gpu` times one t2v-14B block on this machine's GPU.

Prints a summary, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import emit, interleaved_times

from wan.configs import DiTConfig, get_preset
from wan.distributed import ContextMesh
from wan.distributed.context_parallel import apply_context_parallel, remove_context_parallel
from wan.model import AttentionBlock, WanModel
from wan.rope import rope_frequencies

# Official Wan 2.1 README table, H800/H100, T2V-14B 720P, total seconds per video by GPU count.
OFFICIAL_H100_SECONDS = {1: 1837.9, 2: 945.1, 4: 497.0, 8: 287.9}
STEPS = 50  # official t2v sampling steps; CFG makes 2 DiT forwards per step

# Tiny measurement: layouts (ulysses, ring) per world size and cases (batch, latent grid [F, H, W]).
TINY_LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)]}
TINY_CASES = {"B1-L16": (1, (2, 4, 8)), "B2-L27": (2, (3, 6, 6))}  # L = 16 (no padding), 27 (padded)
CATEGORIES = ("ulysses_a2a", "ulysses_mask", "ring_kv", "ring_mask", "gather", "other")


# ----------------------------------------------------------------------------------------------------------
# Bytes per rank: the formula


@dataclasses.dataclass(frozen=True)
class CommBytes:
    """Bytes one rank sends in one DiT forward, by what carries them."""

    ulysses_a2a: int = 0  # all-to-all of q, k, v (in) and the attention output (back), every layer
    ulysses_mask: int = 0  # key masks gathered in the Ulysses group: none (padding is known on the host)
    ring_kv: int = 0  # K and V blocks passed around the ring, R - 1 sends per layer
    ring_mask: int = 0  # key mask blocks travelling with them: none (each rank knows the padding)
    gather: int = 0  # the head output gathered over the mesh, once per forward
    other: int = 0  # any other collective (must stay 0)

    @property
    def ulysses(self) -> int:
        return self.ulysses_a2a + self.ulysses_mask

    @property
    def ring(self) -> int:
        return self.ring_kv + self.ring_mask

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


def padded_tokens(tokens: int, world: int) -> int:
    """The sequence length after padding to a multiple of the mesh size (`ContextParallelSharding.shard`)."""
    return -(-tokens // world) * world


def comm_bytes_per_rank(
    cfg: DiTConfig,
    tokens: int,
    batch: int,
    ulysses: int,
    ring: int,
    dtype_bytes: int,
    out_dtype_bytes: int | None = None,
) -> CommBytes:
    """Bytes sent by one rank of a `ulysses x ring` mesh in one forward of `cfg` on `tokens` tokens.

    W = ulysses * ring; Lp = tokens padded to a multiple of W (no mask travels with padding: every rank
    knows from the sharding how many keys are real); every rank holds Ls = Lp / W tokens; H heads of D
    channels; `dtype_bytes` is the activation dtype (q, k, v, the attention output; the weights' dtype),
    `out_dtype_bytes` the head output's (float32: the head runs in float32, as officially). Per layer:

    - Ulysses: `all_to_all_single` of q, k, v [B, Ls, H, D] and of the output [B, Lp/R, H/U, D] (same size);
      each keeps 1/U of it and sends (U - 1)/U;
    - ring: R - 1 sends of the stacked K/V block [2, B, Lp/R, H/U, D];

    then once: the head output [B, Ls, P] (P = out_dim * prod(patch)) all-gathered in the Ulysses group
    ((U - 1) sends of [B, Ls, P]) and then in the ring group ((R - 1) sends of [B, U*Ls, P]).
    """
    if cfg.num_heads % ulysses:
        raise ValueError(f"{cfg.num_heads} heads are not divisible by ulysses {ulysses}")
    out_dtype_bytes = 4 if out_dtype_bytes is None else out_dtype_bytes
    world = ulysses * ring
    lp = padded_tokens(tokens, world)
    local = lp // world
    heads, d, layers = cfg.num_heads, cfg.head_dim, cfg.num_layers
    shard = batch * local * heads * d * dtype_bytes  # one of q, k, v, out: [B, Ls, H, D]
    kv_block = 2 * batch * (lp // ring) * (heads // ulysses) * d * dtype_bytes  # [2, B, Lp/R, H/U, D]
    p = cfg.out_dim * math.prod(cfg.patch_size)
    head_shard = batch * local * p * out_dtype_bytes  # [B, Ls, P]
    return CommBytes(
        ulysses_a2a=layers * 4 * (shard // ulysses) * (ulysses - 1),
        ring_kv=layers * (ring - 1) * kv_block,
        gather=head_shard * (ulysses - 1) + head_shard * ulysses * (ring - 1),
    )


# ----------------------------------------------------------------------------------------------------------
# Bytes per rank: measured in gloo workers


class CommCounter:
    """Counts the bytes this process sends through `torch.distributed` while installed.

    Replaces `all_to_all_single`, `all_gather` and `batch_isend_irecv` (and, as `other`, the remaining
    collectives and `send`) on the `torch.distributed` module with wrappers that count, then call the
    real function. `wan.distributed` looks them up there on every call, so its ops are counted.
    Categories follow `CommBytes`: uint8 tensors are key masks, the rest activations.
    """

    WRAPPED_OTHERS = ("all_reduce", "broadcast", "all_to_all", "all_gather_into_tensor", "send")

    def __init__(self) -> None:
        self.sent: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self._real: dict[str, Callable[..., Any]] = {}

    def reset(self) -> None:
        self.sent = dict.fromkeys(CATEGORIES, 0)

    def install(self) -> None:
        real = self._real
        for name in ("all_to_all_single", "all_gather", "batch_isend_irecv", *self.WRAPPED_OTHERS):
            real[name] = getattr(dist, name)
        a2a_signature = inspect.signature(real["all_to_all_single"])
        real_isend = dist.isend

        def all_to_all_single(*args: Any, **kwargs: Any) -> Any:
            bound = a2a_signature.bind(*args, **kwargs)
            x: torch.Tensor = bound.arguments["input"]
            group = bound.arguments.get("group")
            size, me = dist.get_world_size(group), dist.get_rank(group)
            splits = bound.arguments.get("input_split_sizes")
            # What stays here: split `me` (its rows when sizes are given, else 1/size of the input).
            own = x.nbytes // x.shape[0] * splits[me] if splits else x.nbytes // size
            self.sent["ulysses_a2a"] += x.nbytes - own
            return real["all_to_all_single"](*args, **kwargs)

        def all_gather(
            tensor_list: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            key = "ulysses_mask" if tensor.dtype == torch.uint8 else "gather"
            self.sent[key] += tensor.nbytes * (len(tensor_list) - 1)  # to every other rank of the group
            return real["all_gather"](tensor_list, tensor, *args, **kwargs)

        def batch_isend_irecv(ops: list[dist.P2POp]) -> Any:
            for op in ops:
                if op.op is real_isend:
                    key = "ring_mask" if op.tensor.dtype == torch.uint8 else "ring_kv"
                    self.sent[key] += op.tensor.nbytes
            return real["batch_isend_irecv"](ops)

        def other(name: str) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                self.sent["other"] += sum(t.nbytes for t in tensors) or 1
                return real[name](*args, **kwargs)

            return wrapper

        dist.all_to_all_single = all_to_all_single
        dist.all_gather = all_gather
        dist.batch_isend_irecv = batch_isend_irecv
        for name in self.WRAPPED_OTHERS:
            setattr(dist, name, other(name))

    def uninstall(self) -> None:
        for name, fn in self._real.items():
            setattr(dist, name, fn)
        self._real = {}


def _measure_worker(rank: int, world_size: int, workdir: Path) -> None:
    """One gloo rank: for every layout of this world size and every case, count one forward's bytes."""
    data = torch.load(workdir / "inputs.pt")
    model = WanModel(get_preset("tiny-t2v").dit).eval()
    model.load_state_dict(data["weights"])
    counter = CommCounter()
    results: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for ulysses, ring in TINY_LAYOUTS[world_size]:
            mesh = ContextMesh.build(ulysses, ring, num_heads=model.cfg.num_heads)
            apply_context_parallel(model, mesh)
            for case, inputs in data["cases"].items():
                counter.install()
                try:
                    model(*inputs)
                finally:
                    counter.uninstall()
                results[f"u{ulysses}r{ring}/{case}"] = counter.sent
                counter.reset()
            remove_context_parallel(model)
    torch.save(results, workdir / f"rank{rank}.pt")


def _spawn_entry(rank: int, world_size: int, workdir: str) -> None:
    torch.set_num_threads(1)
    store = Path(workdir) / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        _measure_worker(rank, world_size, Path(workdir))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure_tiny() -> dict[str, dict[str, Any]]:
    """Count the bytes of the tiny t2v DiT's context-parallel forwards in 2 and 4 gloo processes.

    Returns layout/case -> {"tokens", "measured": the non-zero `CommBytes` categories (the same on every
    rank), "analytic_total": `comm_bytes_per_rank`'s total}; raises `AssertionError` when any category of
    any rank differs from the formula.
    """
    cfg = get_preset("tiny-t2v").dit
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    cases = {}
    for name, (batch, grid) in TINY_CASES.items():
        x = torch.randn(batch, cfg.in_dim, *grid, generator=g)
        t = torch.linspace(999.0, 100.0, batch)
        context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
        cases[name] = (x, t, context)
    out: dict[str, dict[str, Any]] = {}
    for world_size in TINY_LAYOUTS:
        with tempfile.TemporaryDirectory(prefix="cp_bytes_") as tmp:
            workdir = Path(tmp)
            torch.save({"weights": model.state_dict(), "cases": cases}, workdir / "inputs.pt")
            mp.spawn(_spawn_entry, args=(world_size, str(workdir)), nprocs=world_size, join=True)
            ranks = [torch.load(workdir / f"rank{r}.pt") for r in range(world_size)]
        for key in ranks[0]:
            (ulysses, ring), case = _parse_layout(key.split("/")[0]), key.split("/")[1]
            batch, grid = TINY_CASES[case]
            tokens = math.prod(n // p for n, p in zip(grid, cfg.patch_size, strict=True))
            expected = dataclasses.asdict(comm_bytes_per_rank(cfg, tokens, batch, ulysses, ring, 4))
            for r, res in enumerate(ranks):
                if res[key] != expected:
                    raise AssertionError(f"{key} rank {r}: measured {res[key]} != analytic {expected}")
            nonzero = {k: v for k, v in ranks[0][key].items() if v}  # the same on every rank
            out[key] = {"tokens": tokens, "measured": nonzero, "analytic_total": sum(expected.values())}
    return out


def _parse_layout(name: str) -> tuple[int, int]:
    """'u2r4' -> (2, 4)."""
    u, r = name[1:].split("r")
    return int(u), int(r)


# ----------------------------------------------------------------------------------------------------------
# FLOPs and single-device times


def block_flops(cfg: DiTConfig, tokens: int) -> dict[str, int]:
    """FLOPs of one DiT block for batch 1 (2 per multiply-add), by how the sequence split divides them.

    - attention: self-attention QK^T and PV, 4 L^2 dim (what Ulysses + ring divide by W);
    - linear: per-token work, divided by W: q, k, v, o (8 L dim^2), the cross-attention q and o
      (4 L dim^2) and its core against the Lc text tokens (4 L Lc dim), the FFN (4 L dim ffn_dim);
    - replicated: the cross-attention k and v of the text (4 Lc dim^2), the same on every rank.
    """
    n, lc, dim = tokens, cfg.text_len, cfg.dim
    return {
        "attention": 4 * n * n * dim,
        "linear": 12 * n * dim**2 + 4 * n * lc * dim + 4 * n * dim * cfg.ffn_dim,
        "replicated": 4 * lc * dim**2,
    }


def forward_flops(cfg: DiTConfig, tokens: int) -> dict[str, float]:
    """FLOPs of one DiT forward for batch 1: `block_flops` times the layers, plus the head (linear) and
    the text and patch embeddings (replicated: the patch embedding runs before the split)."""
    per_layer = block_flops(cfg, tokens)
    out = {k: float(v * cfg.num_layers) for k, v in per_layer.items()}
    patch = math.prod(cfg.patch_size)
    out["linear"] += 2 * tokens * cfg.dim * cfg.out_dim * patch
    out["replicated"] += 2 * cfg.text_len * (cfg.text_dim + cfg.dim) * cfg.dim
    out["replicated"] += 2 * tokens * cfg.in_dim * patch * cfg.dim
    return out


@dataclasses.dataclass(frozen=True)
class SingleDeviceTimes:
    """Seconds of one DiT forward on one GPU, split by how context parallelism divides the work."""

    attention: float  # self-attention cores of all layers: divided by W
    linear: float  # per-token work of all layers: divided by W
    replicated: float  # repeated on every rank
    source: str

    @property
    def total(self) -> float:
        return self.attention + self.linear + self.replicated

    def rescaled(self, total: float, source: str) -> SingleDeviceTimes:
        """The same split, `total` seconds in all."""
        k = total / self.total
        return SingleDeviceTimes(self.attention * k, self.linear * k, self.replicated * k, source)

    def with_attention_share(self, share: float) -> SingleDeviceTimes:
        """The same total with `share` of it in attention (linear and replicated keep their ratio)."""
        rest = (1 - share) * self.total / (self.linear + self.replicated)
        source = f"{self.source}, attention share {share}"
        return SingleDeviceTimes(share * self.total, self.linear * rest, self.replicated * rest, source)


def split_by_flops(seconds: float, flops: dict[str, float], source: str) -> SingleDeviceTimes:
    """`seconds` shared out in proportion to the FLOPs (the same achieved FLOP rate for every part)."""
    total = sum(flops.values())
    return SingleDeviceTimes(
        attention=seconds * flops["attention"] / total,
        linear=seconds * flops["linear"] / total,
        replicated=seconds * flops["replicated"] / total,
        source=source,
    )


def time_block(
    cfg: DiTConfig, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Median seconds of one DiT block's parts on one device, random weights and inputs, batch 1.

    grid: the token grid [f, h, w] after patching (L = f*h*w tokens). "attention": the self-attention
    core on q, k, v [1, L, H, D] (`wan.attention.attention`); "linear": the whole block with that core
    replaced by returning v (norms, modulation, q/k/v/o, RoPE, cross-attention, FFN).
    """
    from wan.attention import attention

    tokens = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    block = AttentionBlock(cfg).eval().requires_grad_(False).to(device, dtype)
    x = torch.randn(1, tokens, cfg.dim, generator=g).to(device)  # float32 residual stream
    e0 = torch.randn(1, 6, cfg.dim, generator=g).mul_(0.1).to(device)
    ctx = torch.randn(1, cfg.text_len, cfg.dim, generator=g).to(device, dtype)
    rope = rope_frequencies(grid, cfg.head_dim, device=device)
    q, k, v = (
        torch.randn(1, tokens, cfg.num_heads, cfg.head_dim, generator=g).to(device, dtype) for _ in "qkv"
    )

    def skip_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v

    with torch.no_grad():
        fns = {"attention": lambda: attention(q, k, v), "linear": lambda: block(x, e0, ctx, rope, skip_core)}
        for fn in fns.values():  # warm-up: kernels chosen, memory allocated
            fn()
        return interleaved_times(fns, repeats, device)


# ----------------------------------------------------------------------------------------------------------
# Scaling model


@dataclasses.dataclass(frozen=True)
class Links:
    """Per-GPU link bandwidths in bytes/s, one direction, and GPUs per node."""

    nvlink: float
    ib: float
    gpus_per_node: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """One video on `gpus` GPUs: `cfg` CFG halves (1 or 2), each a `ulysses x ring` mesh."""

    cfg: int
    ulysses: int
    ring: int

    @property
    def gpus(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def name(self) -> str:
        mesh = f"u{self.ulysses}r{self.ring}"
        return f"cfg2 x {mesh}" if self.cfg == 2 else mesh


def predict_forward(
    cfg: DiTConfig,
    tokens: int,
    times: SingleDeviceTimes,
    ulysses: int,
    ring: int,
    links: Links,
    overlap: float,
    dtype_bytes: int,
) -> dict[str, float]:
    """Seconds of one forward on a `ulysses x ring` mesh (contiguous ranks, nodes of `gpus_per_node`).

    compute = (attention + linear) * (Lp/L) / W + replicated: padded tokens and queries are computed, padded
    keys are left out by the ring's block attention. Ulysses traffic runs inside the node over NVLink and
    is not overlapped. The ring runs over NVLink when the mesh fits in a node, else over InfiniBand (a ring
    group's slowest hop); each of its R - 1 steps per layer sends one K/V block while the previous block's
    attention (attention per layer and rank / R) computes, and only max(0, transfer - overlap * compute)
    shows. The head gather is not overlapped.
    """
    world = ulysses * ring
    lp = padded_tokens(tokens, world)
    pad = lp / tokens
    attention = times.attention * pad / world
    compute = attention + times.linear * pad / world + times.replicated
    b = comm_bytes_per_rank(cfg, tokens, 1, ulysses, ring, dtype_bytes)
    ulysses_bw = links.nvlink if ulysses <= links.gpus_per_node else links.ib
    ring_bw = links.nvlink if world <= links.gpus_per_node else links.ib
    ulysses_s = b.ulysses / ulysses_bw
    ring_exposed = 0.0
    if ring > 1:
        per_step_bytes = b.ring / (cfg.num_layers * (ring - 1))
        transfer = per_step_bytes / ring_bw
        block_compute = attention / cfg.num_layers / ring
        ring_exposed = cfg.num_layers * (ring - 1) * max(0.0, transfer - overlap * block_compute)
    head_bytes = b.gather // (world - 1) if world > 1 else 0  # one [B, Ls, P] shard
    gather_s = head_bytes * (ulysses - 1) / ulysses_bw + head_bytes * ulysses * (ring - 1) / ring_bw
    return {
        "compute": compute,
        "ulysses_comm": ulysses_s,
        "ring_comm_raw": b.ring / ring_bw,
        "ring_exposed": ring_exposed,
        "gather": gather_s,
        "total": compute + ulysses_s + ring_exposed + gather_s,
    }


def candidate_layouts(gpus: int, num_heads: int, gpus_per_node: int) -> list[Layout]:
    """The layouts of `gpus` worth comparing: CFG passes in turn or on two halves, each mesh with Ulysses
    inside a node (the largest size dividing the mesh and the heads, at most a node) and ring across nodes.

    Other splits (more ring inside a node) are left out on purpose: the model counts only bandwidth, so an
    overlapped ring inside a node would look free, while in practice its smaller attention blocks, merges
    and per-step synchronisation cost more than Ulysses' all-to-all (its bytes are still tabulated).
    """
    out = []
    for cfg in (1, 2):
        if gpus % cfg:
            continue
        mesh = gpus // cfg
        u = max(u for u in range(1, min(mesh, gpus_per_node) + 1) if mesh % u == 0 and num_heads % u == 0)
        out.append(Layout(cfg, u, mesh // u))
    return out


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    cfg: DiTConfig
    tokens: int
    latent_elements: int  # one velocity [C, F, H, W]: what CFG halves swap each step (float32)
    params: int
    times: SingleDeviceTimes
    links: Links
    overlap: float
    dtype_bytes: int
    overhead: float  # seconds per video outside the DiT (text encoder, VAE decode, transfers)
    zero3: bool


def predict_video(m: ModelInputs, layout: Layout) -> dict[str, Any]:
    """Per-forward, per-step and per-video seconds of `layout`: 50 steps of 2 forwards (cond, uncond),
    run one after the other on the whole world or, with CFG halves, at once on each half, which then swap
    their velocities (one float32 latent each way)."""
    mesh = layout.ulysses * layout.ring
    fwd = predict_forward(
        m.cfg, m.tokens, m.times, layout.ulysses, layout.ring, m.links, m.overlap, m.dtype_bytes
    )
    crosses_nodes = layout.gpus > m.links.gpus_per_node
    # ZeRO-3 over the whole world: each rank sends its 1/N of the bf16 weights to the N - 1 others, once
    # per forward, prefetched during compute: only what exceeds the forward's compute shows.
    n = layout.gpus
    zero3_bytes = m.params * m.dtype_bytes * (n - 1) // n if n > 1 else 0
    zero3_s = zero3_bytes / (m.links.ib if crosses_nodes else m.links.nvlink)
    zero3_exposed = max(0.0, zero3_s - fwd["compute"]) if m.zero3 else 0.0
    forward = fwd["total"] + zero3_exposed
    if layout.cfg == 2:
        exchange = m.latent_elements * 4 / (m.links.ib if crosses_nodes else m.links.nvlink)
        step = forward + exchange
    else:
        step = 2 * forward
    comm = fwd["ulysses_comm"] + fwd["ring_exposed"] + fwd["gather"] + zero3_exposed
    return {
        "layout": layout.name,
        "gpus": layout.gpus,
        "mesh_gpus": mesh,
        "forward_s": forward,
        "forward_compute_s": fwd["compute"],
        "forward_comm_exposed_s": comm,
        "ring_comm_raw_s": fwd["ring_comm_raw"],
        "zero3_gather_s": zero3_s,
        "step_s": step,
        "video_s": STEPS * step + m.overhead,
    }


def count_params(cfg: DiTConfig) -> int:
    """Parameters of the DiT, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = WanModel(cfg)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------


# Driver


def _round(row: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}


def single_device_times(
    args: argparse.Namespace, cfg: DiTConfig, grid: tuple[int, int, int], flops: dict[str, float]
) -> tuple[SingleDeviceTimes, dict[str, Any]]:
    """The one-GPU forward the predictions start from, and the block timing done here.

    On a CUDA GPU (`--measure-gpu`): one `cfg` block at full size in bf16, times its layers; the block's
    non-attention time is split between linear and replicated by FLOPs. Otherwise: the official 1-GPU
    time less the overhead, over 100 forwards, split by FLOPs; a t2v-1.3B block at `--cpu-tokens` tokens is
    timed on the CPU only to exercise the timing code. `--single-forward-seconds` and
    `--attention-fraction` then override the total and the attention share.
    """
    use_gpu = torch.cuda.is_available() if args.measure_gpu is None else args.measure_gpu
    if use_gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--measure-gpu needs a CUDA device")
        device = torch.device("cuda")
        block_cfg, block_grid, dtype = cfg, grid, torch.bfloat16
        timing = {"device": torch.cuda.get_device_name(device), "preset": args.preset}
    else:
        device, dtype = torch.device("cpu"), torch.float32
        block_cfg = get_preset("t2v-1.3B").dit
        side = max(1, round(math.sqrt(args.cpu_tokens / 4)))
        block_grid = (4, side, side)
        timing = {"device": "cpu", "preset": "t2v-1.3B"}
    block_tokens = math.prod(block_grid)
    t = time_block(block_cfg, block_grid, device, dtype, args.repeats)
    per_layer = block_flops(block_cfg, block_tokens)
    timing |= {
        "tokens": block_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_s_per_layer": round(t["attention"], 5),
        "rest_s_per_layer": round(t["linear"], 5),
        "attention_share_measured": round(t["attention"] / (t["attention"] + t["linear"]), 4),
        "attention_share_flops": round(per_layer["attention"] / sum(per_layer.values()), 4),
    }
    if use_gpu:
        rep = per_layer["replicated"] / (per_layer["linear"] + per_layer["replicated"])
        layers = cfg.num_layers
        times = SingleDeviceTimes(
            attention=t["attention"] * layers,
            linear=t["linear"] * layers * (1 - rep),
            replicated=t["linear"] * layers * rep,
            source=f"measured: one block x {layers} layers on {timing['device']}",
        )
    else:
        timing["note"] = "exercises the timing code only; the predictions use the official time"
        forward = (OFFICIAL_H100_SECONDS[1] - args.overhead_seconds) / (2 * STEPS)
        times = split_by_flops(forward, flops, "official 1-GPU H100 time less overhead, split by FLOPs")
    if args.single_forward_seconds is not None:
        times = times.rescaled(args.single_forward_seconds, "--single-forward-seconds")
    if args.attention_fraction is not None:
        times = times.with_attention_share(args.attention_fraction)
    return times, timing


def predict_all(
    m: ModelInputs, gpu_counts: list[int]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], dict[str, Any]]:
    """For each GPU count: every candidate layout's prediction, the fastest one and, where the official
    table has the count, the layout the official runs used (CFG passes in turn, Ulysses over all GPUs)."""
    rows, best, official = {}, {}, {}
    for n in gpu_counts:
        layouts = candidate_layouts(n, m.cfg.num_heads, m.links.gpus_per_node)
        rows[str(n)] = [_round(predict_video(m, lay)) for lay in layouts]
        best[str(n)] = min(rows[str(n)], key=lambda r: r["video_s"])
        if n in OFFICIAL_H100_SECONDS and m.cfg.num_heads % n == 0:
            official[str(n)] = _round(predict_video(m, Layout(1, n, 1)))
    return rows, best, official


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (`argv`: its command line, default `sys.argv[1:]`); prints, and returns the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="t2v-14B")
    p.add_argument("--size", default="1280x720", help="video width x height in pixels")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--dtype-bytes", type=int, default=2, help="activation and weight bytes (bf16: 2)")
    p.add_argument("--gpus", default="1,2,4,8,16,64", help="GPU counts to predict, comma-separated")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="GB/s per GPU, one direction")
    p.add_argument("--ib-gbps", type=float, default=50.0, help="GB/s per GPU across nodes (400 Gb/s)")
    p.add_argument(
        "--overlap", type=float, default=0.8, help="share of a ring step's attention that hides its transfer"
    )
    p.add_argument(
        "--overhead-seconds",
        type=float,
        default=40.0,
        help="per video outside the DiT (text encoder, VAE decode, offload): an assumption, not measured",
    )
    p.add_argument(
        "--single-forward-seconds",
        type=float,
        default=None,
        help="one-GPU DiT forward (default: measured with --measure-gpu, else from the official 1-GPU time)",
    )
    p.add_argument(
        "--attention-fraction",
        type=float,
        default=None,
        help="share of that forward in self-attention (default: measured on a GPU, else by FLOPs)",
    )
    p.add_argument("--zero3", action="store_true", help="count ZeRO-3 weight gathers that exceed compute")
    p.add_argument(
        "--measure-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time one full-size block on this CUDA GPU (default: on when CUDA is available)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-tokens", type=int, default=1024, help="tokens of the CPU block timing")
    p.add_argument("--skip-measure", action="store_true", help="skip the gloo byte count")
    args = p.parse_args(argv)
    started = time.perf_counter()

    cfg = get_preset(args.preset).dit
    width, height = (int(s) for s in args.size.lower().split("x"))
    latent = ((args.frames - 1) // 4 + 1, height // 8, width // 8)
    grid = tuple(n // q for n, q in zip(latent, cfg.patch_size, strict=True))
    tokens = math.prod(grid)
    gpu_counts = [int(n) for n in args.gpus.split(",")]

    # 1. Bytes measured on the tiny model (gloo, CPU); raises if any differs from the formula.
    measured = {} if args.skip_measure else measure_tiny()
    if measured:
        print("Bytes sent per rank per forward, tiny-t2v (fp32, 2 layers) in gloo: measured == analytic")
        print(
            f"  {'layout/case':<16} {'tokens':>6} {'ulysses':>8} {'ring':>8} {'gather':>8} {'measured':>9} "
            f"{'analytic':>9}"
        )
        for key, row in measured.items():
            a = CommBytes(**row["measured"])
            print(
                f"  {key:<16} {row['tokens']:>6} {a.ulysses:>8} {a.ring:>8} {a.gather:>8} {a.total:>9} "
                f"{row['analytic_total']:>9}"
            )

    # 2. The formula at full size.
    print(
        f"\n{args.preset} {width}x{height}x{args.frames}: {tokens:,} tokens, batch 1, "
        f"{args.dtype_bytes}-byte activations: MB (1e6 bytes) sent per rank per forward"
    )
    print(f"  {'GPUs':>4} {'layout':<8} {'ulysses':>9} {'ring':>9} {'gather':>7} {'total':>9}")
    bytes_table: dict[str, dict[str, float]] = {}
    meshes = {m for n in gpu_counts for m in (n, n // 2) if m > 1}  # whole world or one CFG half
    for n in sorted(meshes | {8, 16, 64}):
        for u in (8, 4, 2, 1):
            if n % u or cfg.num_heads % u:
                continue
            b = comm_bytes_per_rank(cfg, tokens, 1, u, n // u, args.dtype_bytes)
            parts = {"ulysses": b.ulysses, "ring": b.ring, "gather": b.gather, "total": b.total}
            mb = bytes_table[f"u{u}r{n // u}"] = {k: round(v / 1e6, 2) for k, v in parts.items()}
            name = f"u{u}r{n // u}"
            print(
                f"  {n:>4} {name:<8} {mb['ulysses']:>9.1f} {mb['ring']:>9.1f} {mb['gather']:>7.2f} "
                f"{mb['total']:>9.1f}"
            )

    # 3. One GPU's forward.
    flops = forward_flops(cfg, tokens)
    times, timing = single_device_times(args, cfg, grid, flops)
    print(
        f"\nOne-GPU forward {times.total:.3f} s ({times.source}): attention {times.attention:.3f} s, "
        f"linear {times.linear:.3f} s, replicated {times.replicated:.4f} s"
    )
    pflop = {k: v / 1e15 for k, v in flops.items()}
    print(
        f"  PFLOP per forward: attention {pflop['attention']:.3f}, linear {pflop['linear']:.3f}, "
        f"replicated {pflop['replicated']:.4f} ({pflop['attention'] / sum(pflop.values()):.1%} attention)"
    )
    print(
        f"  block timed on {timing['device']} ({timing['preset']}, {timing['tokens']} tokens, "
        f"{timing['dtype']}): "
        f"attention {timing['attention_s_per_layer']} s + rest {timing['rest_s_per_layer']} s per layer; "
        f"attention share {timing['attention_share_measured']} measured, {timing['attention_share_flops']} "
        "by FLOPs"
    )

    # 4. Predictions.
    m = ModelInputs(
        cfg=cfg,
        tokens=tokens,
        latent_elements=cfg.out_dim * math.prod(latent),
        params=count_params(cfg),
        times=times,
        links=Links(args.nvlink_gbps * 1e9, args.ib_gbps * 1e9, args.gpus_per_node),
        overlap=args.overlap,
        dtype_bytes=args.dtype_bytes,
        overhead=args.overhead_seconds,
        zero3=args.zero3,
    )
    rows, best, official = predict_all(m, gpu_counts)
    print(
        f"\nPredicted per video: {STEPS} steps x 2 forwards + {args.overhead_seconds:g} s overhead; NVLink "
        f"{args.nvlink_gbps:g} GB/s, InfiniBand {args.ib_gbps:g} GB/s per GPU, "
        f"{args.gpus_per_node} GPUs a node, "
        f"ring overlap {args.overlap:g}{', ZeRO-3 gathers' if args.zero3 else ''}"
    )
    print(
        f"  {'GPUs':>4} {'layout':<15} {'fwd s':>7} {'comm s':>7} {'step s':>7} {'video s':>8} "
        f"{'official':>8} {'ratio':>6}"
    )
    for n in map(str, gpu_counts):
        shown = rows[n] + [official[n]] if n in official and official[n] not in rows[n] else rows[n]
        for r in shown:
            ref = OFFICIAL_H100_SECONDS[int(n)] if n in official and r == official[n] else None
            tail = f"{ref:>8.1f} {r['video_s'] / ref:>6.3f}" if ref else ""
            name = r["layout"] + ("*" if r is best[n] else "")
            print(
                f"  {n:>4} {name:<15} {r['forward_s']:>7.3f} {r['forward_comm_exposed_s']:>7.3f} "
                f"{r['step_s']:>7.3f} {r['video_s']:>8.1f} {tail}"
            )
    print(
        "  * fastest for that GPU count; with 'official': the official runs' layout (CFG passes in turn,\n"
        "    Ulysses over all GPUs); cfg2 x ...: the two CFG passes at once on two halves"
    )

    pred8 = official["8"]["video_s"] if "8" in official else None
    ratio = round(pred8 / OFFICIAL_H100_SECONDS[8], 4) if pred8 else None
    baseline = 2 * STEPS * times.total + args.overhead_seconds
    if pred8:
        print(
            f"\n8 x H100 (u8r1): predicted {pred8:.1f} s, official {OFFICIAL_H100_SECONDS[8]} s, "
            f"ratio {ratio}; "
            f"1-GPU baseline {baseline:.1f} s in the model, {OFFICIAL_H100_SECONDS[1]} s official"
        )
    result = {
        "benchmark": "context_parallel",
        "measured_tiny": measured,
        "t2v_14b_720p_mb_per_rank": bytes_table,
        "tokens": tokens,
        "flops_per_forward": flops,
        "single_gpu_forward_seconds": _round(dataclasses.asdict(times)),
        "single_gpu_video_seconds_model": round(baseline, 1),
        "block_timing": timing,
        "predicted_seconds": {n: round(r["video_s"], 1) for n, r in best.items()},
        "predicted_detail": best,  # per GPU count: the fastest layout: forward, comm, step, video s
        "predicted_official_layout_seconds": {n: round(r["video_s"], 1) for n, r in official.items()},
        "official_h100_seconds": {str(k): v for k, v in OFFICIAL_H100_SECONDS.items()},
        "official_8gpu_seconds": OFFICIAL_H100_SECONDS[8],
        "predicted_8gpu_seconds": round(pred8, 1) if pred8 else None,
        "prediction_ratio_8gpu": ratio,
        "inputs": {
            "preset": args.preset,
            "size": f"{width}x{height}x{args.frames}",
            "steps": STEPS,
            "forwards_per_step": 2,
            "dtype_bytes": args.dtype_bytes,
            "overhead_seconds": args.overhead_seconds,
            "nvlink_gbps": args.nvlink_gbps,
            "ib_gbps": args.ib_gbps,
            "gpus_per_node": args.gpus_per_node,
            "ring_overlap": args.overlap,
            "zero3": args.zero3,
            "dit_params": m.params,
        },
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
