"""`wanflow catalog ...`: upgrade, queries as tables and JSON, dataset export, clear errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
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
    claimed = {job.item_id: job for job in catalog.claim(2, run_id=run.id, worker="w1")}
    done, failed = claimed.values()
    catalog.mark_succeeded(
        done.id,
        OutputRecord(uri="s3://b/nightly/x.mp4", sha256="cd" * 32, bytes=1234, width=832, height=480,
                     frames=81, fps=16.0, codec="h264", thumbnail_uri="s3://b/nightly/x.thumb.webp"),
    )  # fmt: skip
    catalog.mark_failed(failed.id, "CUDA out of memory", retry=False)
    catalog.close()
    return catalog_url, done, failed


def test_queries_print_tables_and_json(filled):
    url, done, failed = filled
    result = _wanflow(url, "runs")
    assert result.exit_code == 0 and "nightly" in result.output
    rows = json.loads(_wanflow(url, "jobs", "--run", "nightly", "--status", "failed", "--json").output)
    assert [(r["item_id"], r["last_error"]) for r in rows] == [(failed.item_id, "CUDA out of memory")]
    outputs = json.loads(_wanflow(url, "outputs", "--run", "nightly", "--json").output)
    assert [o["uri"] for o in outputs] == ["s3://b/nightly/x.mp4"]
    shown = json.loads(_wanflow(url, "show", str(done.id), "--json").output)
    assert shown["output"]["sha256"] == "cd" * 32 and shown["params"]["prompt"] == f"a {done.item_id}"
    stats = json.loads(_wanflow(url, "stats", "--run", "nightly", "--json").output)
    assert stats["by_status"]["succeeded"] == 1 and stats["by_status"]["failed"] == 1
    assert stats["output_bytes"] == 1234


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
