"""Context-parallel building blocks (mesh, Ulysses all-to-all, ring attention) in 2 and 4 gloo processes.

The parent makes the full tensors and the reference (one-process attention); each rank loads them, takes its
sequence shard, runs the distributed op and saves its shard of the result; the parent gathers and compares.
One spawn per world size runs every layout of that size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed_utils import run_gloo
from test_gpu_true_ring import HostSyncCounter

from wan.distributed import ContextMesh, context_attention, heads_to_seq, ring_attention, seq_to_heads
from wan.distributed.context_parallel import ContextParallelSharding
from wan.distributed.mesh import validate_mesh
from wan.distributed.ring import block_attention_kernel, block_attention_reference

B, H, D = 2, 4, 8
SHARD = 6  # tokens per rank in the divisible case


def _layouts(world_size: int) -> list[tuple[int, int]]:
    """(ulysses_size, ring_size) layouts tested for a world size."""
    return {2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)]}[world_size]


def _make_inputs(world_size: int) -> dict:
    """Full q, k, v: an even case [B, W*SHARD, H, D]; a padded one (token count not divisible by W; the
    two batch entries of different true length, padded at the end to a multiple of W and masked); and the
    context-parallel padding, known on the host: ``num_keys`` real tokens alike in every row, at the full
    length (the last rank's block all padding) and at the sharding's length ``cp_len``."""
    g = torch.Generator().manual_seed(world_size)
    full = [torch.randn(B, world_size * SHARD, H, D, generator=g) for _ in range(3)]
    lengths = [world_size * SHARD - 3, world_size * SHARD - 7]
    mask = torch.arange(world_size * SHARD)[None, :] < torch.tensor(lengths)[:, None]  # [B, Lp]
    padded = [torch.randn(B, world_size * SHARD, H, D, generator=g) * mask[..., None, None] for _ in range(3)]
    cp_len = 4 * world_size + 1  # padded by the sharding to ceil(cp_len / W) * W
    cp_padded = -(-cp_len // world_size) * world_size
    cp = [torch.zeros(B, cp_padded, H, D) for _ in range(3)]
    for t in cp:
        t[:, :cp_len] = torch.randn(B, cp_len, H, D, generator=g)
    return {
        "full": full,
        "padded": padded,
        "mask": mask,
        "lengths": lengths,
        "num_keys": (world_size - 1) * SHARD - 1,
        "cp": cp,
        "cp_len": cp_len,
    }


def _shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """x: [B, L, ...] -> rank's contiguous [B, L/W, ...] shard."""
    return x.chunk(world_size, dim=1)[rank].contiguous()


def _worker(rank: int, world_size: int, workdir: Path) -> None:
    inputs = torch.load(workdir / "inputs.pt")
    results = {}
    for ulysses, ring in _layouts(world_size):
        mesh = ContextMesh.build(ulysses, ring, num_heads=H)
        assert (mesh.ulysses_rank, mesh.ring_rank) == (rank % ulysses, rank // ulysses)
        q, k, v = (_shard(t, rank, world_size) for t in inputs["full"])
        pq, pk, pv = (_shard(t, rank, world_size) for t in inputs["padded"])
        mask = _shard(inputs["mask"], rank, world_size)
        key = f"u{ulysses}r{ring}"
        syncs = HostSyncCounter()
        if ring == 1:  # pure Ulysses: the all-to-all itself
            heads = seq_to_heads(q, mesh.ulysses_group)
            results[f"{key}/seq_to_heads"] = heads
            results[f"{key}/round_trip"] = heads_to_seq(heads, mesh.ulysses_group)
        if ulysses == 1:  # pure ring: ring_attention directly
            results[f"{key}/attn"] = ring_attention(q, k, v, mesh.ring_group)
            with syncs:
                results[f"{key}/attn_masked"] = ring_attention(pq, pk, pv, mesh.ring_group, key_mask=mask)
                results[f"{key}/attn_num_keys"] = ring_attention(
                    q, k, v, mesh.ring_group, num_keys=inputs["num_keys"]
                )
        else:
            results[f"{key}/attn"] = context_attention(q, k, v, mesh)
            with syncs:
                results[f"{key}/attn_masked"] = context_attention(pq, pk, pv, mesh, key_mask=mask)
        # The model's path: the sharding's attention op, told the real token count on the host.
        tokens = torch.zeros(B, inputs["cp_len"], 1)
        rope = torch.ones(inputs["cp_len"], 1, dtype=torch.complex64)
        _, _, op = ContextParallelSharding(mesh).shard(tokens, rope)
        with syncs:
            results[f"{key}/attn_cp"] = op(*(_shard(t, rank, world_size) for t in inputs["cp"]))
        results[f"{key}/syncs"] = syncs.ops
    torch.save(results, workdir / f"rank{rank}.pt")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One-process attention: [B, L, H, D] -> [B, L, H, D]."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )


def _run(world_size: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    workdir = tmp_path_factory.mktemp(f"world{world_size}")
    inputs = _make_inputs(world_size)
    torch.save(inputs, workdir / "inputs.pt")
    return inputs, run_gloo(_worker, world_size, workdir)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _run(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run(4, tmp_path_factory)


def _check_ulysses(inputs: dict, ranks: list[dict], world_size: int) -> None:
    q = inputs["full"][0]
    share = H // world_size
    for rank, res in enumerate(ranks):
        key = f"u{world_size}r1"
        assert torch.equal(res[f"{key}/seq_to_heads"], q[:, :, rank * share : (rank + 1) * share])
        assert torch.equal(res[f"{key}/round_trip"], _shard(q, rank, world_size))


def _check_attention(inputs: dict, ranks: list[dict], ulysses: int, ring: int) -> None:
    key = f"u{ulysses}r{ring}"
    out = torch.cat([res[f"{key}/attn"] for res in ranks], dim=1)
    torch.testing.assert_close(out, _reference(*inputs["full"]), atol=1e-5, rtol=0)

    masked = torch.cat([res[f"{key}/attn_masked"] for res in ranks], dim=1)
    assert torch.isfinite(masked).all()
    for b, n in enumerate(inputs["lengths"]):  # padded keys left out: equals attention over the real tokens
        q, k, v = (t[b : b + 1, :n] for t in inputs["padded"])
        torch.testing.assert_close(masked[b : b + 1, :n], _reference(q, k, v), atol=1e-5, rtol=0)

    if ulysses == 1:  # padding as a host int: the keys after num_keys left out, every query answered
        n = inputs["num_keys"]
        q, k, v = inputs["full"]
        out = torch.cat([res[f"{key}/attn_num_keys"] for res in ranks], dim=1)
        torch.testing.assert_close(out, _reference(q, k[:, :n], v[:, :n]), atol=1e-5, rtol=0)

    n = inputs["cp_len"]
    out = torch.cat([res[f"{key}/attn_cp"] for res in ranks], dim=1)[:, :n]
    q, k, v = (t[:, :n] for t in inputs["cp"])
    torch.testing.assert_close(out, _reference(q, k, v), atol=1e-5, rtol=0)

    # No ring or context-parallel step with padding waits on the device.
    assert [res[f"{key}/syncs"] for res in ranks] == [[]] * len(ranks)


@pytest.mark.distributed
def test_ulysses_world2(world2):
    _check_ulysses(*world2, world_size=2)


@pytest.mark.distributed
@pytest.mark.parametrize(("ulysses", "ring"), [(2, 1), (1, 2)])
def test_attention_world2(world2, ulysses, ring):
    _check_attention(*world2, ulysses=ulysses, ring=ring)


@pytest.mark.distributed
def test_ulysses_world4(world4):
    _check_ulysses(*world4, world_size=4)


@pytest.mark.distributed
@pytest.mark.parametrize(("ulysses", "ring"), [(4, 1), (1, 4), (2, 2)])
def test_attention_world4(world4, ulysses, ring):
    _check_attention(*world4, ulysses=ulysses, ring=ring)


def test_mesh_world_size_mismatch():
    with pytest.raises(
        ValueError, match=r"ulysses_size 2 \* ring_size 3 = 6 must equal the world size 4 \(the number"
    ):
        validate_mesh(2, 3, 4)
    with pytest.raises(ValueError, match=r"ring_size 1 \* cfg-parallel halves 2 = 8 must equal the world"):
        validate_mesh(4, 1, 4, replicas=2)
    validate_mesh(2, 1, 4, num_heads=12, replicas=2)
    with pytest.raises(ValueError, match="must equal the world size 1"):
        ContextMesh.build(2, 1)  # no process group: a world of one


def test_mesh_heads_not_divisible_suggests_ring():
    with pytest.raises(
        ValueError, match=r"12 attention heads are not divisible by ulysses_size 8.*ulysses 4 x ring 2"
    ):
        validate_mesh(8, 1, 8, num_heads=12)
    validate_mesh(4, 2, 8, num_heads=12)
    with pytest.raises(ValueError, match=r"ulysses 2 x ring 2 for 4 processes"):  # per CFG half
        validate_mesh(4, 1, 8, num_heads=6, replicas=2)


def test_single_mesh_is_plain_attention():
    mesh = ContextMesh.build(1, 1, num_heads=H)
    assert mesh == ContextMesh.single() and mesh.world_size == 1
    q, k, v = (torch.randn(B, 5, H, D) for _ in range(3))
    assert seq_to_heads(q, mesh.ulysses_group) is q and heads_to_seq(q, mesh.ulysses_group) is q
    torch.testing.assert_close(context_attention(q, k, v, mesh), _reference(q, k, v), atol=1e-5, rtol=0)
    mask = torch.tensor([[True, True, True, False, False]] * B)
    expected = _reference(q, k[:, :3], v[:, :3])
    torch.testing.assert_close(ring_attention(q, k, v, None, key_mask=mask), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "padding", "all padding", "scattered", "empty row"])
def test_block_kernel_matches_the_reference(dtype, mask):
    """The fused kernel's output and log-sum-exp equal the exact fp32 block attention (CPU kernel here;
    the GPU kernels share the code path but for the kernel call)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 6, H, D, generator=g).to(dtype) for _ in range(3))
    masks = {
        "none": None,
        "padding": torch.tensor([[True] * 4 + [False] * 2] * 2),
        "all padding": torch.zeros(2, 6, dtype=torch.bool),
        "scattered": torch.tensor([[True, False, True, True, False, True], [False, True] * 3]),
        "empty row": torch.tensor([[True] * 6, [False] * 6]),
    }
    key_mask = masks[mask]
    out, lse = block_attention_kernel(q, k, v, key_mask)
    ref_out, ref_lse = block_attention_reference(q, k, v, key_mask)
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == (2, H, 6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=0)
