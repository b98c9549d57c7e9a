"""Context parallelism on the whole DiT: the sharded forward in 2 and 4 gloo processes equals one process.

The parent builds the tiny t2v and i2v DiTs (fixed seed), their inputs and the single-process outputs; each
rank loads the same weights, runs every layout of its world size for every case and saves its outputs (every
rank gets the whole output); the parent compares. One spawn per world size covers all cases.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from distributed_utils import run_gloo
from twins import randomise_dit

from wan.configs import get_preset
from wan.distributed import ContextMesh
from wan.distributed.context_parallel import apply_context_parallel, remove_context_parallel
from wan.model import WanModel

B = 2
# Latent grids [F, H, W] with patch (1, 2, 2): L = 16 tokens (divisible by 2 and 4) and L = 27 (neither).
GRIDS = {"L16": (2, 4, 8), "L27": (3, 6, 6)}
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(2, 2), (4, 1), (1, 4)]}  # (ulysses_size, ring_size)
TOL = 1e-5


def _build(preset: str) -> WanModel:
    torch.manual_seed(0)
    model = WanModel(get_preset(preset).dit).eval()
    randomise_dit(model, 1)
    return model


def _cases() -> dict:
    """name -> (preset, forward inputs): t2v at both token counts, i2v (CLIP features) at the uneven one."""
    g = torch.Generator().manual_seed(2)
    cases = {}
    for preset, grids in (("tiny-t2v", ("L16", "L27")), ("tiny-i2v", ("L27",))):
        cfg = get_preset(preset).dit
        for grid in grids:
            x = torch.randn(B, cfg.in_dim, *GRIDS[grid], generator=g)
            t = torch.tensor([999.0, 420.0])
            context = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
            context[:, 7:] = 0  # zero-padded text
            clip = None if cfg.image_dim is None else torch.randn(B, 5, cfg.image_dim, generator=g)
            cases[f"{preset}/{grid}"] = (preset, (x, t, context, clip))
    return cases


def _worker(rank: int, world_size: int, workdir: Path) -> None:
    data = torch.load(workdir / "inputs.pt")
    models = {}
    for preset, state in data["weights"].items():
        models[preset] = WanModel(get_preset(preset).dit).eval()
        models[preset].load_state_dict(state)
    results = {}
    with torch.no_grad():
        for ulysses, ring in LAYOUTS[world_size]:
            mesh = ContextMesh.build(ulysses, ring, num_heads=4)
            for name, (preset, inputs) in data["cases"].items():
                model = apply_context_parallel(models[preset], mesh)
                results[f"u{ulysses}r{ring}/{name}"] = model(*inputs)
                remove_context_parallel(model)
        # Removing it restores the one-process forward exactly.
        preset, inputs = data["cases"]["tiny-t2v/L27"]
        results["removed"] = models[preset](*inputs)
    torch.save(results, workdir / f"rank{rank}.pt")


def _run(world_size: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    workdir = tmp_path_factory.mktemp(f"cp_world{world_size}")
    models = {preset: _build(preset) for preset in ("tiny-t2v", "tiny-i2v")}
    cases = _cases()
    with torch.no_grad():
        reference = {name: models[preset](*inputs) for name, (preset, inputs) in cases.items()}
    weights = {preset: model.state_dict() for preset, model in models.items()}
    torch.save({"weights": weights, "cases": cases}, workdir / "inputs.pt")
    start = time.perf_counter()
    ranks = run_gloo(_worker, world_size, workdir)
    print(f"world {world_size}: {time.perf_counter() - start:.1f} s")
    return reference, ranks


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _run(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run(4, tmp_path_factory)


def _check(reference: dict, ranks: list[dict], ulysses: int, ring: int) -> None:
    for name, expected in reference.items():
        for rank, res in enumerate(ranks):
            out = res[f"u{ulysses}r{ring}/{name}"]
            diff = (out - expected).abs().max().item()
            print(f"u{ulysses}r{ring} {name} rank {rank}: max diff {diff:.2e}")
            assert out.shape == expected.shape and diff <= TOL, (name, rank, diff)
    torch.testing.assert_close(ranks[0]["removed"], reference["tiny-t2v/L27"], atol=TOL, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize(("ulysses", "ring"), LAYOUTS[2])
def test_dit_context_parallel_world2(world2, ulysses, ring):
    _check(*world2, ulysses=ulysses, ring=ring)


@pytest.mark.distributed
@pytest.mark.parametrize(("ulysses", "ring"), LAYOUTS[4])
def test_dit_context_parallel_world4(world4, ulysses, ring):
    _check(*world4, ulysses=ulysses, ring=ring)


def test_single_mesh_forward_is_unchanged():
    """A 1x1 mesh (no process group) runs the hook's path and gives the plain forward's output."""
    model = _build("tiny-t2v")
    _, inputs = _cases()["tiny-t2v/L27"]
    with torch.no_grad():
        expected = model(*inputs)
        sharded = apply_context_parallel(model, ContextMesh.single())(*inputs)
        assert model.sequence_sharding is not None
        restored = remove_context_parallel(model)(*inputs)
    assert model.sequence_sharding is None
    torch.testing.assert_close(sharded, expected, atol=TOL, rtol=0)
    assert torch.equal(restored, expected)


def test_heads_not_divisible_by_ulysses():
    model = _build("tiny-t2v")  # 4 heads
    mesh = ContextMesh(ulysses_size=8, ring_size=1, rank=0, ulysses_group=None, ring_group=None)
    with pytest.raises(ValueError, match="4 attention heads are not divisible by ulysses_size 8"):
        apply_context_parallel(model, mesh)
    assert model.sequence_sharding is None
