"""`wanflow catalog ...`: upgrade, queries as tables and JSON, dataset export, clear errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from catalog_helpers import claim
from typer.testing import CliRunner

from flows.cli import app
from storage.catalog import Catalog, JobSpec, OutputRecord

runner = CliRunner()


def _wanflow(url: str, *args: str):
    return runner.invoke(app, ["catalog", *args, "--catalog-url", url], catch_exceptions=False)


@pytest.fixture
def filled(catalog_url):
    """A catalog with one run of three jobs: one succeeded with an output, one failed, one pending."""
    assert _wanflow(catalog_url, "upgrade").exit_code == 0
    catalog = Catalog(catalog_url)
    run = catalog.create_run("nightly", "s3://m/prompts.jsonl", "ab" * 32, {"steps": 50})
    specs = [
        JobSpec(item, seed, "t2v-1.3B", "fp", {"prompt": f"a {item}", "sampling_steps": 50, "shift": 8.0})
        for item, seed in (("fox", 1), ("owl", 2), ("elk", 3))
    ]
    catalog.plan_jobs(run.id, specs)
    claimed = {job.item_id: job for job in claim(catalog, 2, run_id=run.id, worker="w1")}
    done, failed = claimed.values()
    catalog.mark_succeeded(
        done.id,
        OutputRecord(uri="s3://b/nightly/x.mp4", sha256="cd" * 32, bytes=1234, width=832, height=480,
                     frames=81, fps=16.0, codec="h264", thumbnail_uri="s3://b/nightly/x.thumb.webp",
                     device="cuda:0", motion=0.031, black=False, flat=False, frozen=True, frozen_frames=20,
                     phash="ab" * 64),
    )  # fmt: skip
    catalog.mark_failed(failed.id, "CUDA out of memory", retry=False)
    catalog.close()
    return catalog_url, done, failed


def test_queries_print_tables_and_json(filled):
    url, done, failed = filled
    result = _wanflow(url, "runs")
    assert result.exit_code == 0 and "nightly" in result.output
    rows = json.loads(_wanflow(url, "jobs", "--run", "nightly", "--status", "failed", "--json").stdout)
    assert [(r["item_id"], r["last_error"]) for r in rows] == [(failed.item_id, "CUDA out of memory")]
    outputs = json.loads(_wanflow(url, "outputs", "--run", "nightly", "--json").stdout)
    assert [o["uri"] for o in outputs] == ["s3://b/nightly/x.mp4"]
    shown = json.loads(_wanflow(url, "show", str(done.id), "--json").stdout)
    assert shown["output"]["sha256"] == "cd" * 32 and shown["params"]["prompt"] == f"a {done.item_id}"
    stats = json.loads(_wanflow(url, "stats", "--run", "nightly", "--json").stdout)
    assert stats["by_status"]["succeeded"] == 1 and stats["by_status"]["failed"] == 1
    assert stats["output_bytes"] == 1234


def test_stats_show_gpu_seconds_throughput_and_cost_and_jobs_show_prompt_and_error(filled, monkeypatch):
    url, done, failed = filled
    with Catalog(url) as catalog:
        seconds = catalog.get_job(done.id).seconds
    assert seconds is not None and seconds > 0
    monkeypatch.setenv("WANFLOW_GPU_HOUR_PRICE", "2.5")
    stats = json.loads(_wanflow(url, "stats", "--run", "nightly", "--json").stdout)
    (model,) = stats["models"]
    assert (model["model"], model["videos"], model["gpu_videos"]) == ("t2v-1.3B", 1, 1)
    assert model["gpu_seconds"] == pytest.approx(seconds, abs=1e-3) == stats["gpu_seconds"]
    assert model["videos_per_gpu_hour"] == pytest.approx(3600 / seconds, rel=1e-2)
    assert model["cost_per_video"] == pytest.approx(2.5 * seconds / 3600, abs=1e-4)
    assert stats["cost"] == pytest.approx(2.5 * seconds / 3600, abs=1e-4) and stats["gpu_hour_price"] == 2.5
    text = _wanflow(url, "stats", "--run", "nightly").output
    assert "cost at 2.5 per GPU-hour" in text and "cost/video" in text and "1.2 kB" in text
    monkeypatch.delenv("WANFLOW_GPU_HOUR_PRICE")
    assert "cost" not in json.loads(_wanflow(url, "stats", "--json").stdout)
    jobs = _wanflow(url, "jobs", "--run", "nightly").output
    assert "CUDA" in jobs and f"a {failed.item_id}" in jobs and "prompt" in jobs  # (a narrow table folds)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_export_writes_one_row_per_video(filled, tmp_path, fmt):
    url, done, _ = filled
    target = tmp_path / "datasets" / f"nightly.{fmt}"
    result = _wanflow(url, "export", "--run", "nightly", "--format", fmt, "--to", str(target))
    assert result.exit_code == 0, result.output
    if fmt == "parquet":
        rows = pq.read_table(target).to_pylist()
    else:
        rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["uri"], row["seed"], row["prompt"], row["shift"]) == (
        "s3://b/nightly/x.mp4",
        done.seed,
        f"a {done.item_id}",
        8.0,
    )
    assert (row["width"], row["height"], row["frames"], row["model_id"]) == (832, 480, 81, "t2v-1.3B")
    assert (row["motion"], row["frozen"], row["frozen_frames"], row["phash"]) == (0.031, True, 20, "ab" * 64)
    assert row["black_frames"] is None  # not measured


def test_outputs_filter_by_signals(filled):
    url, done, _ = filled
    rows = json.loads(_wanflow(url, "outputs", "--where", "motion > 0.02 and frozen", "--json").stdout)
    assert [r["job_id"] for r in rows] == [done.id] and rows[0]["motion"] == 0.031
    assert json.loads(_wanflow(url, "outputs", "--where", "not frozen", "--json").stdout) == []
    table = _wanflow(url, "outputs", "--run", "nightly").output
    assert "0.031" in table and "frozen" in table
    bad = _wanflow(url, "outputs", "--where", "speed > 1")
    assert bad.exit_code == 1 and "--where: filter 'speed > 1': unknown field 'speed'" in bad.output


def test_errors_are_clear(filled, tmp_path):
    url, _, _ = filled
    result = runner.invoke(app, ["catalog", "jobs", "--run", "nope", "--catalog-url", url])
    assert result.exit_code == 1 and "no run 'nope'" in result.output
    result = runner.invoke(app, ["catalog", "export", "--run", "nightly", "--format", "csv", "--to", "x",
                                 "--catalog-url", url])  # fmt: skip
    assert result.exit_code == 1 and "expected one of parquet, jsonl" in result.output


def test_unknown_scheme_and_unreachable_database_hide_secrets():
    result = runner.invoke(app, ["catalog", "runs", "--catalog-url", "mysql://u:hunter2@127.0.0.1/x"])
    assert result.exit_code == 1 and "hunter2" not in result.output and "sqlite" in result.output
    result = runner.invoke(
        app, ["catalog", "runs", "--catalog-url", "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/x"]
    )
    assert result.exit_code == 1 and "hunter2" not in result.output


def test_empty_database_asks_for_upgrade(tmp_path):
    result = runner.invoke(app, ["catalog", "runs", "--catalog-url", f"sqlite:///{tmp_path / 'c.db'}"])
    assert result.exit_code == 1 and "wanflow catalog upgrade" in result.output


# ----------------------------------------------------------------------- generate, validate, dry run


def _manifest(tmp_path, rows) -> str:
    path = tmp_path / "clips.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


TINY = ("--model", "tiny-t2v")  # random weights are run only when named


def _placeholder_checkpoint(root):
    """A directory with every file of the official t2v layout present (empty): enough for planning, which
    looks at names only."""
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "t2v"}')
    for name in ("diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        (root / name).write_bytes(b"")
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    return root


GOOD = [
    {"item_id": "fox", "prompt": "a fox", "size": "64*48", "frame_num": 5, "steps": 2},
    {"item_id": "owl", "prompt": "an owl", "size": "48*64", "frame_num": 5, "steps": 2},
]


def test_validate_lists_every_bad_row(tmp_path):
    bad = [*GOOD, {"item_id": "elk", "prompt": "an elk", "size": "50*48"}, "{not json", {"prompt": "no id"}]
    manifest = _manifest(tmp_path, bad)
    result = runner.invoke(app, ["validate", manifest, *TINY])
    assert result.exit_code == 1
    assert "line 3" in result.output and "size" in result.output
    assert "line 4" in result.output and "line 5" in result.output and "item_id" in result.output
    doc = json.loads(runner.invoke(app, ["validate", manifest, *TINY, "--json"]).stdout)
    assert doc["rows"] == 5 and doc["valid"] == 2 and [p["line"] for p in doc["problems"]] == [3, 4, 5]
    ok = runner.invoke(app, ["validate", _manifest(tmp_path, GOOD), *TINY, "--seeds", "3"])
    assert ok.exit_code == 0 and "2 valid" in ok.output and "6 jobs" in ok.output
    assert doc["invalid"] == 3


def test_generate_refuses_an_invalid_manifest_before_starting(tmp_path):
    manifest = _manifest(tmp_path, [*GOOD, {"item_id": "elk", "prompt": "an elk", "frame_num": 6}])
    result = runner.invoke(app, ["generate", manifest, *TINY, "--catalog-url", f"sqlite:///{tmp_path}/c.db"])
    assert result.exit_code == 1
    assert "line 3" in result.output and "frame_num" in result.output and "--skip-invalid" in result.output
    assert not (tmp_path / "c.db").exists()  # nothing was started
    missing = runner.invoke(app, ["generate", str(tmp_path / "nope.jsonl"), *TINY])
    assert missing.exit_code == 1 and "nope.jsonl" in missing.output
    needs_weights = runner.invoke(app, ["generate", manifest, "--model", "t2v-1.3B"])
    assert needs_weights.exit_code == 1 and "--ckpt-dir" in needs_weights.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    manifest = _manifest(tmp_path, GOOD)
    url = f"sqlite:///{tmp_path}/c.db"
    result = runner.invoke(
        app,
        [
            "generate",
            manifest,
            *TINY,
            "--catalog-url",
            url,
            "--seeds",
            "2",
            "--dry-run",
            "--json",
            "--shard-size",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["jobs"] == 4 and plan["already_done"] == 0 and plan["to_generate"] == 4
    assert len(plan["shards"]) == 4 and {s["size"] for s in plan["shards"]} == {"64*48", "48*64"}
    assert not (tmp_path / "c.db").exists()


@pytest.mark.slow
def test_generate_then_dry_run_sees_everything_done(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.chdir(tmp_path)
    manifest = _manifest(tmp_path, GOOD)
    url = f"sqlite:///{tmp_path}/cat/c.db"
    args = ["generate", manifest, *TINY, "--catalog-url", url, "--out", str(tmp_path / "videos")]
    args += ["--seeds", "2"]
    with prefect_test_harness(server_startup_timeout=90):
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 made, 0 already done, 0 failed" in result.output
    plan = json.loads(runner.invoke(app, [*args, "--dry-run", "--json"]).stdout)
    assert plan["already_done"] == 4 and plan["to_generate"] == 0 and plan["shards"] == []
    outputs = json.loads(_wanflow(url, "outputs", "--json").stdout)
    assert len(outputs) == 4 and all(o["uri"].startswith(str(tmp_path / "videos")) for o in outputs)


def test_generate_uses_the_given_checkpoint_dir(tmp_path):
    manifest = _manifest(tmp_path, [{"item_id": "fox", "prompt": "a fox"}])
    ckpt = _placeholder_checkpoint(tmp_path / "Wan2.1-T2V-1.3B")
    args = ["generate", manifest, "--model", "t2v-1.3B", "--ckpt-dir", str(ckpt), "--dry-run", "--json"]
    result = runner.invoke(app, [*args, "--catalog-url", f"sqlite:///{tmp_path}/c.db"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shards"][0]["model"] == "t2v-1.3B"


def test_markup_in_a_manifest_is_printed_as_text(tmp_path):
    manifest = _manifest(tmp_path, [{"item_id": "fox", "prompt": "a fox", "size": "[/x]"}])
    result = runner.invoke(app, ["generate", manifest, *TINY, "--catalog-url", f"sqlite:///{tmp_path}/c.db"])
    assert result.exit_code == 1 and "[/x]" in result.output and "MarkupError" not in result.output


def test_fast_mode_flags_become_run_defaults(tmp_path, monkeypatch):
    """--lora (relative to the working directory, repeatable), --cache and --recipe are the defaults rows
    inherit: validate checks the LoRA files as the run would; a dry run shards by LoRA set and cache."""
    from safetensors.torch import save_file

    from wan.configs import RANDOM_WEIGHTS_SEED
    from wan.lora import random_lora_state_dict
    from wan.pipeline import WanPipeline

    dit = WanPipeline.from_config("tiny-t2v", seed=RANDOM_WEIGHTS_SEED, device="cpu").dit
    save_file(random_lora_state_dict(dit, seed=1), str(tmp_path / "ink.safetensors"))
    rows = [*GOOD, {"item_id": "plain", "prompt": "no lora", "size": "64*48", "frame_num": 5, "loras": []}]
    manifest = _manifest(tmp_path, rows)
    monkeypatch.chdir(tmp_path)
    flags = ["--lora", "ink.safetensors:0.6", "--cache", "fbcache", "--recipe", "few-step"]
    ok = runner.invoke(app, ["validate", manifest, *TINY, *flags])
    assert ok.exit_code == 0 and "3 valid" in ok.output, ok.output
    url = f"sqlite:///{tmp_path}/c.db"
    plan = json.loads(runner.invoke(app, ["generate", manifest, *TINY, *flags, "--catalog-url", url,
                                          "--dry-run", "--json"]).stdout)  # fmt: skip
    assert sorted(len(s["job_ids"]) for s in plan["shards"]) == [1, 1, 1]  # 2 sizes with the LoRA, 1 without
    assert {s["cache"] for s in plan["shards"]} == {"fbcache:0.05"}
    assert sum(1 for s in plan["shards"] if s["loras"]) == 2
    missing = runner.invoke(app, ["validate", manifest, *TINY, "--lora", "gone.safetensors"])
    assert missing.exit_code == 1
    assert f"LoRA file {tmp_path / 'gone.safetensors'} does not exist" in missing.output
    bad = runner.invoke(app, ["validate", manifest, *TINY, "--cache", "turbo"])
    assert bad.exit_code == 1
    assert "--cache: cache kind 'turbo': expected one of fbcache, magcache" in bad.output
    recipe = runner.invoke(app, ["validate", manifest, *TINY, "--recipe", "fast"])
    assert recipe.exit_code == 1 and "unknown recipe 'fast'" in recipe.output
