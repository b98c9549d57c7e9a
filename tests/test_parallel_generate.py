"""Whole tiny generations under torchrun equal one process: context parallelism, ZeRO-3 and CFG parallelism
each alone and all together (pixel difference at most 1 after uint8 quantisation), and `wan.generate`'s
parallel flags.

`parallel_entry.py` runs the cases under `torchrun --standalone`; the single-process references come from
the same seeded tiny pipelines here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch
from parallel_entry import CASES, generate

from wan.distributed.parallel import ParallelConfig, auto_config
from wan.generate import main
from wan.pipeline import WanPipeline

HERE = Path(__file__).parent
WORLD4 = ["cp-2x2", "zero3", "all", "i2v-all"]
WORLD2 = ["cfg"]  # CFG parallelism alone: two halves of one process each


def torchrun(nproc: int, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    for nproc, cases in ((4, WORLD4), (2, WORLD2)):
        flags = [flag for name in cases for flag in ("--case", name)]
        done = torchrun(nproc, str(HERE / "parallel_entry.py"), "--out", str(out), *flags)
        assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def references() -> dict[str, torch.Tensor]:
    return {p: generate(WanPipeline.from_config(p, seed=0, device="cpu")) for p in ("tiny-t2v", "tiny-i2v")}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", WORLD4 + WORLD2)
def test_parallel_generation_equals_one_process(runs, references, case):
    result = torch.load(runs / f"{case}.pt")
    expected = references[CASES[case][0]]
    frames = result["frames"]
    assert frames.shape == expected.shape and frames.dtype == torch.uint8
    diff = (frames.int() - expected.int()).abs()
    print(f"{case}: max pixel diff {diff.max().item()}, {diff.gt(0).float().mean().item():.2%} differ")
    assert diff.max().item() <= 1


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero3", "all", "i2v-all"])
def test_zero3_rank_holds_a_quarter(runs, case):
    """DeepSpeed's partition metadata: each of 4 ranks holds 1/4 of the DiT and of the text encoder
    (every parameter split, padded to a multiple of 4 elements)."""
    shares = torch.load(runs / f"{case}.pt")["shares"]
    for part in ("dit", "t5"):
        local, total = shares[part]
        assert 0.25 <= local / total <= 0.26, (part, local, total)


@pytest.mark.distributed
@pytest.mark.slow
def test_generate_cli_under_torchrun(tmp_path):
    """`torchrun -m wan.generate` with CFG parallelism and ZeRO-3: rank 0 writes the one video."""
    out = tmp_path / "videos" / "fox.mp4"
    done = torchrun(
        2, "-m", "wan.generate", "--task", "tiny-t2v", "--size", "64*48", "--frame_num", "9",
        "--sample_steps", "3", "--prompt", "a fox", "--base_seed", "3", "--save_file", str(out),
        "--cfg_parallel", "--dit_zero3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 9
    assert [p.name for p in out.parent.iterdir()] == ["fox.mp4"]
    assert "2 processes: ulysses 1 x ring 1 x cfg 2, ZeRO-3 dit True t5 False" in done.stderr
    assert done.stderr.count("seed 3: 9 frames 64x48") == 1  # rank 0 reports


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ulysses_size", "2"], "ulysses_size 2 * ring_size 1 = 2 must equal the world size 1"),
        (["--cfg_parallel"], "cfg-parallel halves 2 = 2 must equal the world size 1"),
        (["--dit_zero3"], "ZeRO-3 (--dit_zero3 / --t5_zero3) shards weights over several processes"),
    ],
)
def test_parallel_flags_checked_in_one_process(capsys, flags, message):
    argv = ["--task", "tiny-t2v", "--prompt", "a fox", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_layout_checks_and_auto_layout():
    with pytest.raises(ValueError, match="12 attention heads are not divisible by ulysses_size 8"):
        ParallelConfig(ulysses_size=8).validate(8, num_heads=12)
    ParallelConfig(dit_zero3=True).validate(4, num_heads=12)  # ZeRO-3 alone: every rank a whole forward
    with pytest.raises(ValueError, match=r"halves 2 = 4 must equal the world size 8"):
        ParallelConfig(ulysses_size=2, cfg_parallel=True, dit_zero3=True).validate(8)
    # 1.3B: 12 heads on 8 GPUs -> CFG halves, then ulysses 4 (divides 12), no ring.
    assert auto_config(8, 12) == ParallelConfig(4, 1, True)
    assert auto_config(16, 12) == ParallelConfig(4, 2, True)
    assert auto_config(3, 40, cfg_parallel=True) == ParallelConfig(1, 3, False)  # 40 heads: 3 does not divide
    assert auto_config(4, 40, cfg_parallel=False) == ParallelConfig(4, 1, False)


def test_deferred_parts_are_placed_by_parallelize():
    """Parts left on the CPU for ZeRO-3 that end up unsharded are moved to the device whole."""

    with pytest.raises(ValueError, match=r"defer: unknown parts \['vae'\]"):
        WanPipeline.from_config("tiny-t2v", seed=0, device="cpu", defer=["vae"])
    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu", defer=["dit", "text_encoder"])
    assert pipe.deferred == {"dit", "text_encoder"}
    pipe.parallelize(ParallelConfig())  # one process, nothing sharded
    assert pipe.deferred == set() and pipe.parallel.mesh.world_size == 1
