"""Versioned dataset snapshots (`flows/snapshots.py`, `storage/catalog/snapshots.py`): v1 from a saved
selection, the same content again writes nothing, new videos make v2; the catalog lists both with their
samples. The `export-dataset` flow runs under Prefect's test harness; the deployment itself runs against a
real Prefect server in tests/test_integration_prefect.py."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

import flows.shard
from flows.models import model_source
from flows.settings import get_settings
from flows.shard import JobContext, run_job
from flows.snapshots import export_dataset_flow, make_snapshot, snapshot_url
from storage.catalog import Catalog, JobSpec
from storage.dataset import Selection
from storage.layout import OutputLayout

FAST = {"size": "64*48", "frame_num": 5, "steps": 2}


def _make_videos(catalog: Catalog, run_name: str, items: list[str], root: Path) -> None:
    source = model_source("tiny-t2v")
    run = catalog.create_run(run_name, "m.jsonl", "0" * 64, {})
    specs = [JobSpec(item, n, "tiny-t2v", source.fingerprint, {"prompt": f"a {item}", **FAST})
             for n, item in enumerate(items)]  # fmt: skip
    catalog.plan_jobs(run.id, specs)
    ctx = JobContext(
        catalog=catalog, run_id=run.id, run_name=run.name, source=source,
        pipeline=flows.shard.load_pipeline(source), layout=OutputLayout(str(root / "out")),
        storage_options={}, worker="w",
    )  # fmt: skip
    for job in catalog.jobs(run.id):
        assert run_job(ctx, job.id)["status"] == "succeeded"


def _members(folder: str) -> list[str]:
    names = []
    for shard in sorted(Path(folder).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            names += [m.name for m in tar.getmembers()]
    return names


def test_versions_follow_the_content(tmp_path, monkeypatch):
    monkeypatch.setenv("WANFLOW_STORAGE_ROOT", str(tmp_path / "out"))
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.upgrade()
    settings = get_settings(catalog_url=catalog.url)
    _make_videos(catalog, "day1", ["fox", "owl"], tmp_path)
    selection = Selection(where="frames >= 5")

    first = make_snapshot(catalog, settings, "nightly", selection)
    assert (first.version, first.new, first.samples) == (1, True, 2)
    assert first.uri == snapshot_url(str(tmp_path / "out"), "nightly", 1)
    videos = sorted(n for n in _members(first.uri) if n.endswith(".mp4"))
    assert videos == ["day1/fox-s0.mp4", "day1/owl-s1.mp4"]
    files = {p: p.stat().st_mtime_ns for p in Path(first.uri).rglob("*")}

    again = make_snapshot(catalog, settings, "nightly", selection)  # nothing new: v1 is the answer
    assert (again.version, again.new) == (1, False)
    assert {p: p.stat().st_mtime_ns for p in Path(first.uri).rglob("*")} == files
    assert not Path(snapshot_url(str(tmp_path / "out"), "nightly", 2)).exists()

    _make_videos(catalog, "day2", ["lynx"], tmp_path)
    second = make_snapshot(catalog, settings, "nightly", selection)
    assert (second.version, second.new, second.samples) == (2, True, 3)
    listed = catalog.snapshots("nightly")
    assert [(s.version, s.samples) for s in listed] == [(1, 2), (2, 3)]
    assert listed[0].selection["where"] == "frames >= 5" and listed[0].format == "webdataset"
    keys = [s["key"] for s in catalog.snapshot_samples(listed[1].id)]
    assert keys == ["day1/fox-s0", "day1/owl-s1", "day2/lynx-s0"]
    assert Path(first.uri).is_dir()  # v1 stays as it was: a training run can still name it
    with pytest.raises(ValueError, match="no video in the catalog matches"):
        make_snapshot(catalog, settings, "empty", Selection(where="motion > 5"))
    catalog.close()


def test_the_export_dataset_flow_writes_and_records_a_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("WANFLOW_STORAGE_ROOT", str(tmp_path / "out"))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    catalog = Catalog(url)
    catalog.upgrade()
    _make_videos(catalog, "day1", ["fox"], tmp_path)
    with prefect_test_harness(server_startup_timeout=90):
        result = export_dataset_flow(name="weekly", catalog_url=url, format="hf")
        assert (result["version"], result["new"], result["samples"]) == (1, True, 1)
        assert (Path(result["uri"]) / "metadata.parquet").is_file()
        assert export_dataset_flow(name="weekly", catalog_url=url, format="hf")["new"] is False
        with pytest.raises(ValueError, match="holds a credential"):
            export_dataset_flow(name="weekly", catalog_url="postgresql://u:secret@db/x")
    (snapshot,) = catalog.snapshots()
    assert snapshot.flow_run_id and snapshot.format == "hf"
    catalog.close()


def test_snapshots_are_listed_by_the_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    url = f"sqlite:///{tmp_path / 'c.db'}"
    catalog = Catalog(url)
    catalog.upgrade()
    _make_videos(catalog, "day1", ["fox"], tmp_path)
    (job,) = catalog.jobs()
    catalog.record_snapshot("weekly", str(tmp_path / "s/v1"), "webdataset", {"runs": "all"},
                            [("day1/fox-s0", job.id, "ab" * 32)], 123)  # fmt: skip
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["catalog", "snapshots", "--catalog-url", url, "--json"]).stdout)
    assert [(s["name"], s["version"], s["samples"]) for s in listed] == [("weekly", 1, 1)]
    samples = runner.invoke(app, ["catalog", "snapshots", "weekly", "--version", "1", "--catalog-url", url,
                                  "--json"])  # fmt: skip
    assert json.loads(samples.stdout) == [{"key": "day1/fox-s0", "job_id": job.id, "sha256": "ab" * 32}]
    missing = runner.invoke(app, ["catalog", "snapshots", "weekly", "--version", "3", "--catalog-url", url])
    assert missing.exit_code == 1 and "no snapshot weekly v3" in missing.output
    catalog.close()
