"""The GPU benchmarks run on the CPU on reduced shapes, so they are always exercised: each finishes and
prints one JSON object on its last line (the figures themselves are recorded in the issue notes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gpu_step_on_reduced_shapes():
    result = run("gpu_step.py", "--device", "cpu", "--models", "1.3B", "--repeats", "1")
    model = result["models"]["1.3B"]
    assert model["seconds"] > 0 and model["flops"] > 0 and model["output_finite"]


@pytest.mark.slow
def test_gpu_generate_on_the_tiny_preset():
    result = run("gpu_generate.py", "--device", "cpu", "--repeats", "1", "--offload_model", "--t5_cpu")
    assert result["max_abs_diff"] < 1e-4  # ours and diffusers' WanPipeline ran the same computation
    assert result["offload"]["max_abs_diff_vs_ours"] == 0.0
    assert result["time_ratio"] > 0 and result["peak_bytes_ours"] > 0


@pytest.mark.slow
def test_vae_gpu_on_reduced_latents():
    result = run("vae_gpu.py", "--device", "cpu")
    case = result["cases"]["reduced"]
    assert case["max_abs_diff_ours_vs_diffusers"] < 1e-4 and case["seconds"]["ours"] > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_context_parallel_bytes_and_scaling_model():
    result = run("context_parallel.py")
    assert result["official_8gpu_seconds"] == 287.9 and 0.5 < result["prediction_ratio_8gpu"] < 1.5
    assert all(v["measured"] for v in result["measured_tiny"].values())


@pytest.mark.slow
def test_fast_modes_on_the_tiny_preset(tmp_path):
    """Issue 16's fast-mode figures: DiT forwards per video (batched CFG: one call per step), the skips of
    each step cache at its default threshold, the 4-step recipe, seconds, and the JSON also written."""
    out = tmp_path / "fast_modes.json"
    result = run("fast_modes.py", "--device", "cpu", "--steps", "10", "--repeats", "1", "--out", str(out))
    assert json.loads(out.read_text()) == result
    modes = result["modes"]
    assert set(modes) == {"baseline", "fbcache", "magcache", "few-step"}
    assert result["preset"] == "tiny-t2v" and result["device"] == "cpu" and result["torch"]
    base = modes["baseline"]
    assert base["dit_forwards"] == 10 and base["dit_batch"] == 2  # batched CFG: one call of batch 2 a step
    assert base["dit_forwards_skipped"] == 0 and base["cache_counts"] is None
    assert base["speedup_vs_baseline"] == 1 and base["max_abs_diff_vs_baseline"] == 0
    for name in ("fbcache", "magcache"):
        row = modes[name]
        assert row["dit_forwards"] == 10 and row["cache_counts"]["forwards"] == 10
        assert 0 <= row["dit_forwards_skipped"] == row["cache_counts"]["skipped"] < 10
        assert row["effective_full_forwards"] == 10 - row["dit_forwards_skipped"]
        assert row["settings"]["cache"] == f"{name}:{row['threshold']:g}"
    few = modes["few-step"]
    assert few["dit_forwards"] == 4 and few["dit_batch"] == 1 and few["settings"]["guide_scale"] == 1.0
    assert "LoRA" in few["lora"] and few["max_abs_diff_vs_baseline"] > 0
    assert all(row["seconds"] > 0 and row["speedup_vs_baseline"] > 0 for row in modes.values())


@pytest.mark.slow
def test_orchestration_on_a_few_jobs(tmp_path):
    """The platform-overhead benchmark runs end to end (it broke once, unseen, when the model became a
    required choice)."""
    import os

    command = [sys.executable, str(BENCHMARKS / "orchestration.py"), "--jobs", "2", "--rounds", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["jobs"] == 2 and result["time_ratio"] > 0


# Every section of benchmarks/gpu_suite.py, and the checks of its gpu_tests section.
SUITE_SECTIONS = {
    "env", "peak", "attention", "forward_1.3b", "forward_1.3b_compiled", "vae", "generation", "offload",
    "numerics", "forward_14b", "cp_model", "ring", "gpu_tests", "fast_modes",
}  # fmt: skip
CUDA_CHECKS = {
    "noise_device_independent", "solver_steps_no_host_sync", "sampling_loop_no_host_sync",
    "sync_count_2_vs_8_steps", "vae_attention_720p_peak",
}  # fmt: skip


def run_suite(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "suite.json"
    command = [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--quick", "--device", "cpu",
               "--out", str(out), *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.slow
def test_gpu_suite_runs_every_section_on_the_cpu(tmp_path):
    """The one-command GPU suite on tiny shapes: every section runs (or says why not), none crashes, what
    needs CUDA says so, and the CPU figures are never taken for GPU verdicts."""
    doc, stdout = run_suite(tmp_path)
    sections = doc["sections"]
    assert set(sections) == SUITE_SECTIONS
    errors = {name: row.get("traceback", row.get("reason")) for name, row in sections.items()
              if row["status"] != "ok"}  # fmt: skip
    assert not errors, errors
    for name in SUITE_SECTIONS:  # one table line each, with its figures
        assert any(line.startswith(f"{name} ") and " ok " in line for line in stdout.splitlines()), name

    env = sections["env"]
    assert env["gpu"].startswith("skipped: needs CUDA") and env["sdpa_backends"]["math"] == "ok"
    assert all(kernel == "sdpa" for kernel in env["attention_kernel_picked"].values())  # the CPU's kernel
    assert sections["peak"]["tflops_per_s"] > 0
    assert sections["attention"]["kernels"]["sdpa"]["max_abs_vs_sdpa"] == 0.0
    for name in ("forward_1.3b", "forward_1.3b_compiled"):
        row = sections[name]
        assert row["ours"]["seconds"] > 0 and row["ours"]["tflops_per_s"] > 0 and row["flops"] > 0
        assert row["max_abs_ours_vs_diffusers"] < 1e-4  # fp32 on the CPU, same weights
    assert sections["forward_1.3b_compiled"]["ours"]["max_abs_vs_eager"] < 1e-5
    assert sections["vae"]["max_abs_ours_vs_diffusers"] < 1e-4 and sections["vae"]["ours"]["seconds"] > 0
    generation = sections["generation"]
    assert generation["narrow_text_encoder"] and "narrow" in generation["text_encoder"]
    assert generation["max_abs_diff"] < 1e-4 and generation["speedup"] > 0
    assert sections["offload"]["video_finite"] and sections["offload"]["dit_on_cpu_after"]
    numerics = sections["numerics"]
    assert numerics["ours_fp32_vs_diffusers_fp32"]["max_abs"] < 1e-4
    assert 0 < numerics["ours_bf16_vs_fp32"]["rel_l2"] < 0.1
    assert isinstance(numerics["ours_at_least_as_close"], bool)
    assert sections["forward_14b"]["output_finite"] and sections["forward_14b"]["seconds"] > 0
    cp = sections["cp_model"]
    assert cp["official_8gpu_seconds"] == 287.9 and cp["predicted_8gpu_seconds"] > 0
    assert cp["forward_seconds_source"].startswith("forward_14b section")
    fast = sections["fast_modes"]["modes"]  # tiny preset, 4 steps: one call a step, the recipe's 4 steps
    assert fast["baseline"]["dit_forwards"] == 4 and fast["few-step"]["dit_forwards"] == 4

    ring = sections["ring"]  # the CPU kernel, the same merge: all within tolerance
    assert ring["all_passed"] and ring["kernels_used"] == ["cpu"] and len(ring["cases"]) == 16
    merged = [case for case in ring["cases"].values() if "host_syncs" in case]
    assert len(merged) == 12 and all(case["host_syncs"].startswith("skipped: needs CUDA") for case in merged)
    checks = sections["gpu_tests"]["checks"]
    assert all(checks[name].startswith("skipped: needs CUDA") for name in CUDA_CHECKS)
    assert checks["offload_same_video"]["passed"] and sections["gpu_tests"]["all_passed"]

    verdicts = doc["acceptance"]
    assert verdicts["offload_peak_bytes"]["value"] > 0
    assert verdicts["generation_speedup_vs_diffusers"]["value"] > 0
    assert all(v["passed"] is None for v in verdicts.values() if isinstance(v, dict) and "passed" in v)


@pytest.mark.slow
def test_gpu_suite_without_diffusers_records_the_skips(tmp_path):
    doc, _ = run_suite(tmp_path, "--without-diffusers", "--sections", "numerics,generation,vae")
    sections = doc["sections"]
    assert set(sections) == SUITE_SECTIONS
    assert sections["generation"]["status"] == "skipped"
    assert sections["generation"]["reason"].startswith("skipped: diffusers not importable")
    for name in ("numerics", "vae"):  # ours alone, diffusers' half recorded as skipped
        assert sections[name]["status"] == "ok", sections[name]
        assert sections[name]["diffusers"].startswith("skipped: diffusers not importable")
    assert sections["numerics"]["ours_bf16_vs_fp32"]["rel_l2"] > 0 and sections["vae"]["ours"]["seconds"] > 0
    unselected = SUITE_SECTIONS - {"numerics", "generation", "vae"}
    assert all(sections[name]["reason"] == "not selected (--sections)" for name in unselected)
