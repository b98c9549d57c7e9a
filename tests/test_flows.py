"""generate_batch and generate_shard with the tiny model under Prefect's test harness: outputs and catalog
rows for every job, task names, artifacts, retries of transient failures, permanent failures isolated to
their job, and re-runs that generate nothing new. Planning helpers are tested without Prefect."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

import flows.shard
from flows.batch import BatchFailed, generate_batch
from flows.models import checkpoint_fingerprint, model_source
from flows.planning import plan_shards
from flows.recovery import worker_gone
from flows.reporting import summarise
from flows.settings import get_settings
from storage.catalog import Catalog, JobGroupRow, JobStatus
from storage.outputs import verifier

ITEMS = ("alpha", "beta", "gamma")
FAST = {"size": "64*48", "frame_num": 5, "steps": 2}


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("WANFLOW_RETRY_DELAY_S", "0")
    monkeypatch.setenv("WANFLOW_JOB_RETRIES", "2")


def write_manifest(path: Path, items=ITEMS) -> str:
    rows = [{"item_id": item, "prompt": f"a short clip of {item}", **FAST} for item in items]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run_batch(tmp_path: Path, catalog_url: str, manifest: str, **kwargs):
    """The run's summary, whether it succeeded or not (then the flow raised BatchFailed with it)."""
    try:
        return generate_batch(
            manifest, model="tiny-t2v", out=str(tmp_path / "out"), catalog_url=catalog_url, seeds=2,
            shard_size=4, **kwargs,
        )
    except BatchFailed as failed:
        return failed.summary


# ------------------------------------------------------------------------------------ without Prefect


def job(job_id, model="tiny-t2v", size="64*48", frames=9):
    return JobGroupRow(job_id, model, size, frames)


def test_shards_group_by_model_size_and_frames():
    jobs = [job(1), job(2, size="48*64"), job(3), job(4, frames=13), job(5), job(6)]
    shards = plan_shards(jobs, shard_size=3)
    assert [(s.size, s.frame_num, s.job_ids) for s in shards] == [
        ("48*64", 9, [2]), ("64*48", 9, [1, 3, 5]), ("64*48", 9, [6]), ("64*48", 13, [4]),
    ]  # fmt: skip
    assert shards[1].label == "tiny-t2v-64x48-f9-1" and "task:t2v" in shards[1].tags
    with pytest.raises(ValueError, match="shard_size 0"):
        plan_shards(jobs, 0)


def test_abandoned_claims_are_recognised():
    host, now, hour = socket.gethostname(), datetime.now(UTC), timedelta(hours=1)
    assert worker_gone(f"{host}:{os.getpid()}:run", now, hour, {}) is None  # this process: alive
    dead = f"{host}:999999999:run"
    assert "no longer exists" in worker_gone(dead, now, hour, {})
    assert worker_gone("elsewhere:1:run", now, hour, {}) is None  # another host: its flow run or time tells
    assert "ended Crashed" in worker_gone("elsewhere:1:run", now, hour, {"run": "Crashed"})
    assert "expired" in worker_gone("elsewhere:1:run", now - 2 * hour, hour, {})


def test_model_sources_and_fingerprints(tmp_path):
    tiny = model_source("tiny-t2v")
    assert tiny.fingerprint == "random:tiny-t2v:seed0" and tiny.task == "t2v"
    with pytest.raises(ValueError, match="needs its weights: pass --ckpt-dir"):
        model_source("t2v-1.3B")
    with pytest.raises(ValueError, match="does not exist"):
        model_source("t2v-1.3B", tmp_path / "missing")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "weights.bin").write_bytes(b"\0" * (5 << 20))
    first = checkpoint_fingerprint(ckpt)
    assert first == checkpoint_fingerprint(ckpt) and first.startswith("ckpt:")
    (ckpt / "weights.bin").write_bytes(b"\1" + b"\0" * ((5 << 20) - 1))  # same size, other weights
    assert checkpoint_fingerprint(ckpt) != first


def test_transient_and_permanent_errors_are_told_apart():
    from storage.catalog import CatalogError
    from storage.video import StorageError, VideoWriteError

    for exc in (OSError("disk"), StorageError("s3 down"), CatalogError("db"), VideoWriteError("ffmpeg"),
                RuntimeError("CUDA error: an illegal memory access")):  # fmt: skip
        assert flows.shard.is_transient(exc), exc
    for exc in (ValueError("size"), KeyError("prompt"), TypeError("x")):
        assert not flows.shard.is_transient(exc), exc


# ----------------------------------------------------------------------------------------- the flows


@pytest.mark.slow
def test_batch_makes_every_video_once(harness, fast_retries, tmp_path, catalog_url):
    Catalog(catalog_url).upgrade()
    manifest = write_manifest(tmp_path / "clips.jsonl")
    summary = run_batch(tmp_path, catalog_url, manifest)
    assert summary["status"] == "succeeded", summary
    assert summary["by_status"]["succeeded"] == 6 and summary["outputs"] == 6
    with Catalog(catalog_url) as catalog:
        outputs = catalog.outputs(summary["run_id"])
        assert len(outputs) == 6 and all(verifier()(o) for o in outputs)
        jobs = catalog.jobs(summary["run_id"])
        assert {(j.item_id, j.status, j.attempts) for j in jobs} == {
            (i, JobStatus.succeeded, 1) for i in ITEMS
        }
        run = catalog.get_run(summary["run_id"])
        assert run.name.startswith("batch-clips-") and run.flow_run_id
        names = {f"{j.item_id}-s{j.seed}" for j in jobs}
    task_names, artifacts = prefect_records(run.flow_run_id)
    assert names <= task_names
    assert {"progress", "markdown"} <= {a.type for a in artifacts}
    progress = [a for a in artifacts if a.type == "progress"]
    assert progress[-1].data == 100.0
    markdown = {a.key: a.data for a in artifacts if a.type == "markdown"}
    assert "6 made" in markdown["batch-summary"] and "data:image/webp;base64," in markdown["batch-summary"]
    assert markdown["batch-outputs"].count("](data:image/webp;base64,") == 6  # a thumbnail per video

    again = run_batch(tmp_path, catalog_url, manifest)
    assert again["status"] == "succeeded"
    assert again["plan"]["already_done"] == 6 and again["plan"]["to_generate"] == 0
    assert again["by_status"]["skipped"] == 6 and again["seconds"] == 0
    with Catalog(catalog_url) as catalog:
        assert len(catalog.outputs()) == 6


def prefect_records(flow_run_id: str):
    """Names of every task run under the flow run (its subflows included) and the artifacts of them all."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if str(r.id) == flow_run_id or r.parent_task_run_id]
        ids = [r.id for r in runs]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
    return {t.name for t in tasks}, artifacts


@pytest.mark.slow
def test_transient_failure_is_retried_and_permanent_one_fails_alone(
    harness, fast_retries, tmp_path, monkeypatch
):
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    real = flows.shard.store_job_output
    calls: dict[str, int] = {}

    def flaky_store(catalog, job, frames, **kwargs):
        calls[job.item_id] = calls.get(job.item_id, 0) + 1
        if job.item_id == "beta" and job.seed == min_seed["beta"] and calls["beta"] == 1:
            raise OSError("connection reset by storage (injected)")
        if job.item_id == "gamma":
            raise ValueError("unreadable image gamma.png (injected)")
        return real(catalog, job, frames, **kwargs)

    min_seed: dict[str, int] = {}
    monkeypatch.setattr(flows.shard, "store_job_output", flaky_store)
    manifest = write_manifest(tmp_path / "flaky.jsonl")
    from flows.manifest import load_manifest

    for request in load_manifest(manifest).requests:
        min_seed[request.item_id] = min(request.seeds)
    events: list[dict] = []
    with flows.shard.add_progress_listener(events.append):
        summary = run_batch(tmp_path, catalog_url, manifest)
    # the retry is announced as it happens (the CLI prints it: "retrying beta-s<seed> (attempt 2/3): ...")
    retries = [e for e in events if e.get("event") == "retrying"]
    assert [(e["item_id"], e["seed"], e["attempt"], e["attempts"]) for e in retries] == [
        ("beta", min_seed["beta"], 2, 3)
    ]
    assert "connection reset by storage (injected)" in retries[0]["error"]
    assert summary["status"] == "failed"
    assert summary["by_status"] == {"pending": 0, "running": 0, "succeeded": 4, "failed": 2, "skipped": 0}
    with Catalog(catalog_url) as catalog:
        jobs = {(j.item_id, j.seed): j for j in catalog.jobs(summary["run_id"])}
    retried = jobs[("beta", min_seed["beta"])]
    assert retried.status == JobStatus.succeeded and retried.attempts == 2
    for seed in (min_seed["gamma"], min_seed["gamma"] + 1):
        failed = jobs[("gamma", seed)]
        assert failed.status == JobStatus.failed and failed.attempts == 1  # a bad request is not retried
        assert "ValueError: unreadable image gamma.png" in failed.last_error
    assert {f["item"] for f in summary["failed"]} == {"gamma"}
    # in Prefect, as in the catalog: a shard with a failed job ends Failed, saying how many failed and why
    failed_ids = {j.id for j in jobs.values() if j.status == JobStatus.failed}
    shards = shard_runs(summary)
    assert len(shards) == 2
    for shard in shards:
        held = set(shard.parameters["job_ids"])
        if held & failed_ids:
            assert shard.state.is_failed(), shard.state
            assert shard.state.message.startswith(f"jobs failed: {len(held & failed_ids)} of {len(held)} (")
            assert "ValueError: unreadable image gamma.png" in shard.state.message
        else:
            assert shard.state.is_completed(), shard.state

    # the next run redoes only the failed jobs
    monkeypatch.setattr(flows.shard, "store_job_output", real)
    again = run_batch(tmp_path, catalog_url, manifest)
    assert again["status"] == "succeeded"
    assert again["plan"]["requeued"] == 2 and again["plan"]["already_done"] == 4
    assert [s.state.type.value for s in shard_runs(again)] == ["COMPLETED"]


def shard_runs(summary: dict) -> list:
    """The Prefect flow runs of a catalog run's shards: named `shard-<run id>-<label>`, with the run's name
    as a parameter (other tests' catalogs on the same Prefect server have runs of the same ids)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    prefix = f"shard-{summary['run_id']}-"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=prefix)))
    ours = summary["run_name"]
    return [r for r in runs if r.name.startswith(prefix) and r.parameters.get("run_name") == ours]


def test_a_job_past_its_deadline_is_retried_then_failed_with_the_reason(harness, tmp_path, monkeypatch):
    """`WANFLOW_JOB_TIMEOUT_S` ends an attempt that outlives it (Prefect's task timeout): the attempt is
    announced as retried, its claim is given back, and the last one fails the job with the deadline named
    (before, the job stayed pending with `CancelledError:` and the run re-ran it again and again)."""
    monkeypatch.setenv("WANFLOW_JOB_TIMEOUT_S", "5")
    monkeypatch.setenv("WANFLOW_JOB_RETRIES", "1")
    monkeypatch.setenv("WANFLOW_RETRY_DELAY_S", "0")
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    real = flows.shard.store_job_output
    calls: dict[str, int] = {}

    def stalled_store(catalog, job, frames, **kwargs):
        calls[job.item_id] = calls.get(job.item_id, 0) + 1
        if job.item_id == "hung" or calls[job.item_id] == 1:  # "slow" stalls once, "hung" every time
            for _ in range(600):  # a storage call that never answers (interruptible between sleeps)
                time.sleep(0.05)
        return real(catalog, job, frames, **kwargs)

    monkeypatch.setattr(flows.shard, "store_job_output", stalled_store)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"item_id": item, "prompt": item, **FAST}) + "\n"
                                for item in ("slow", "hung")))  # fmt: skip
    events: list[dict] = []
    out = str(tmp_path / "out")
    with flows.shard.add_progress_listener(events.append), pytest.raises(BatchFailed) as failed:
        generate_batch(str(manifest), model="tiny-t2v", out=out, catalog_url=catalog_url)
    summary = failed.value.summary
    deadline = "TimeoutError: the job ran past its deadline of 5 s (WANFLOW_JOB_TIMEOUT_S)"
    retries = [(e["item_id"], e["attempt"], e["attempts"], e["error"]) for e in events
               if e.get("event") == "retrying"]  # fmt: skip
    assert ("slow", 2, 2, deadline) in retries and ("hung", 2, 2, deadline) in retries
    assert summary["by_status"] == {"pending": 0, "running": 0, "succeeded": 1, "failed": 1, "skipped": 0}
    assert summary["failure_reasons"] == [{"error": deadline, "jobs": 1}]
    with Catalog(catalog_url) as catalog:
        jobs = {j.item_id: j for j in catalog.jobs(summary["run_id"])}
    assert jobs["slow"].status == JobStatus.succeeded and jobs["slow"].attempts == 2
    assert jobs["hung"].status == JobStatus.failed and jobs["hung"].attempts == 2
    assert jobs["hung"].last_error == deadline
    assert calls == {"slow": 2, "hung": 2}  # the run did not go on re-running the failed job
    assert not [p for p in (tmp_path / "out").rglob("*") if "partial" in p.name]


@pytest.mark.slow
def test_a_large_manifest_is_split_with_dask_and_planned_from_its_shards(
    harness, fast_retries, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANFLOW_LARGE_MANIFEST_BYTES", "1")  # every manifest counts as large
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    rows = [{"item_id": i, "prompt": f"clip {i}", **FAST} for i in ITEMS]
    rows.append({"item_id": "bad", "prompt": "x", "size": "50*48"})
    manifest = tmp_path / "big.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(Exception, match="line 4"):
        run_batch(tmp_path, catalog_url, str(manifest))
    summary = run_batch(tmp_path, catalog_url, str(manifest), skip_invalid=True)
    assert summary["status"] == "succeeded" and summary["outputs"] == 6 and summary["rejected"] == 1
    shards = list((tmp_path / "out" / "_manifests").glob("big-*/*.jsonl"))
    assert shards, "the split shard manifests are kept next to the outputs"
    from catalog_helpers import rejections

    with Catalog(catalog_url) as catalog:
        (rejected,) = rejections(catalog, summary["run_id"])
        assert rejected.line == 4 and rejected.field == "size" and rejected.item_id == "bad"


def test_run_job_refuses_weights_other_than_planned(tmp_path):
    from flows.shard import JobContext, run_job
    from storage.catalog import JobSpec
    from storage.layout import OutputLayout

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.upgrade()
    run = catalog.create_run("r", "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(run.id, [JobSpec("fox", 1, "tiny-t2v", "ckpt:other", {"prompt": "a fox", **FAST})])
    (planned,) = catalog.jobs(run.id)
    ctx = JobContext(
        catalog=catalog, run_id=run.id, run_name="r", source=model_source("tiny-t2v"), pipeline=None,
        layout=OutputLayout(str(tmp_path / "out")), storage_options={}, worker="w", max_attempts=3,
    )  # fmt: skip
    with pytest.raises(ValueError, match="planned for tiny-t2v weights ckpt:other"):
        run_job(ctx, planned.id)
    failed = catalog.get_job(planned.id)
    assert failed.status == JobStatus.failed and "WANFLOW_CHECKPOINTS" in failed.last_error
    with pytest.raises(ValueError, match="has failed for good"):  # a retry cannot pass for a success
        run_job(ctx, planned.id)
    catalog.close()


@pytest.mark.slow
def test_a_shard_whose_model_cannot_load_fails_its_jobs_with_the_reason(
    harness, fast_retries, tmp_path, monkeypatch
):
    """Every job of the shard is failed with the one-line reason (not left pending), the summary leads with
    it, `catalog jobs --status failed` lists them; a re-run requeues and finishes them."""
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    manifest = write_manifest(tmp_path / "crash.jsonl", items=("alpha",))

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory while loading (injected)")

    monkeypatch.setattr(flows.shard, "load_pipeline", broken)
    reason = "model tiny-t2v could not load: RuntimeError: CUDA error: out of memory while loading (injected)"
    with pytest.raises(BatchFailed, match=r"^run \S+: model tiny-t2v could not load.*2 of 2 jobs failed, 0"):
        generate_batch(
            manifest, model="tiny-t2v", out=str(tmp_path / "out"), catalog_url=catalog_url, seeds=2
        )
    with Catalog(catalog_url) as catalog:
        run = catalog.runs(limit=1)[0]
        assert run.status == "failed"
        failed = catalog.jobs(run.id, status="failed")
        assert len(failed) == 2 and {j.last_error for j in failed} == {reason}
        assert summarise(catalog, run.id, get_settings(catalog_url=catalog_url))["failure_reasons"] == [
            {"error": reason, "jobs": 2}
        ]
    monkeypatch.undo()
    again = run_batch(tmp_path, catalog_url, manifest)
    assert again["status"] == "succeeded" and again["by_status"]["succeeded"] == 2


def test_a_password_never_becomes_a_flow_parameter(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", items=("alpha",))
    with pytest.raises(ValueError, match=r"holds a credential.*WANFLOW_CATALOG_URL") as refused:
        generate_batch.fn(manifest, catalog_url="postgresql+psycopg://wanflow:s3cret@db/wanflow")
    assert "s3cret" not in str(refused.value)


def test_a_redone_job_overwrites_its_first_runs_objects(tmp_path):
    """A worker killed between upload and catalog row leaves objects; the redo writes the same keys."""
    from flows.shard import JobContext, run_job
    from storage.catalog import JobSpec
    from storage.layout import OutputLayout

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.upgrade()
    source = model_source("tiny-t2v")
    spec = JobSpec("fox", 1, "tiny-t2v", source.fingerprint, {"prompt": "a fox", **FAST})
    first = catalog.create_run("first", "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(first.id, [spec])
    (job,) = catalog.jobs(first.id)
    assert catalog.claim_job(job.id, worker="dead-worker") is not None
    second = catalog.create_run("second", "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(second.id, [spec])
    assert catalog.requeue_abandoned([job.id], "worker gone", worker="dead-worker") == 1
    ctx = JobContext(
        catalog=catalog, run_id=second.id, run_name="second", source=source,
        pipeline=flows.shard.load_pipeline(source), layout=OutputLayout(str(tmp_path / "out")),
        storage_options={}, worker="w2",
    )  # fmt: skip
    result = run_job(ctx, job.id)
    assert result["status"] == "succeeded" and "/first/fox/" in result["uri"]
    assert not (tmp_path / "out" / "second").exists()
    catalog.close()


@pytest.mark.slow
def test_image_rows_make_videos_and_a_corrupt_image_fails_only_its_jobs(harness, fast_retries, tmp_path):
    from PIL import Image

    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    (tmp_path / "images").mkdir()
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        Image.new("RGB", (96, 64), colour).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [
        {"item_id": f"i2v-{name}", "prompt": f"a {name} scene", "model": "tiny-i2v",
         "image": f"images/{name}.png", **FAST}
        for name in ("red", "blue", "broken")
    ] + [{"item_id": "t2v", "prompt": "a text-only clip", **FAST}]  # fmt: skip
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_batch(tmp_path, catalog_url, str(manifest))
    assert summary["by_status"]["succeeded"] == 6 and summary["by_status"]["failed"] == 2
    assert {f["item"] for f in summary["failed"]} == {"i2v-broken"}
    assert all("is not a readable image" in f["error"] for f in summary["failed"])
    with Catalog(catalog_url) as catalog:
        jobs = {j.item_id: j for j in catalog.jobs(summary["run_id"])}
        red = jobs["i2v-red"]
        assert red.params["image"] == f"{tmp_path}/images/red.png" and len(red.params["image_sha256"]) == 64
        assert jobs["i2v-broken"].attempts == 1  # a bad image is not retried
        outputs = {o.job_id: o for o in catalog.outputs(summary["run_id"])}
        # a 96x64 image within the 64*48 area: the 3:2 aspect ratio, sides multiples of 16
        assert (outputs[red.id].width, outputs[red.id].height) == (64, 32)


def test_image_paths_are_resolved_against_the_manifest(tmp_path, monkeypatch):
    from flows.images import resolve_image_uri

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert resolve_image_uri("images/a.png", "data/m.jsonl") == f"{tmp_path}/data/images/a.png"
    assert resolve_image_uri("../x/a.png", "s3://b/m/list.jsonl?sig=a/b") == "s3://b/x/a.png"
    assert resolve_image_uri("a.png", "s3://b/m.jsonl") == "s3://b/a.png"
    assert resolve_image_uri("s3://other/a.png", "data/m.jsonl") == "s3://other/a.png"
    assert resolve_image_uri("/abs/a.png", "s3://b/m.jsonl") == "/abs/a.png"


def test_an_image_that_is_missing_or_changed_fails_without_retry(tmp_path):
    import hashlib

    from PIL import Image

    from flows.images import BadImage, read_image
    from flows.shard import JobContext

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    ctx = JobContext(catalog=None, run_id=1, run_name="r", source=None, pipeline=None, layout=None,
                     storage_options={}, worker="w")  # type: ignore[arg-type]  # fmt: skip
    assert read_image({"image": str(path), "image_sha256": sha}, "image", ctx).size == (8, 8)
    with pytest.raises(BadImage, match="changed since the job was planned"):
        read_image({"image": str(path), "image_sha256": "0" * 64}, "image", ctx)
    with pytest.raises(BadImage, match="cannot be read: FileNotFoundError"):
        read_image({"image": str(tmp_path / "gone.png"), "image_sha256": sha}, "image", ctx)
    assert not flows.shard.is_transient(BadImage("x"))


# ------------------------------------------------------------------------- jobs on several processes


def _group_pipeline():
    from flows.group import GroupPipeline
    from flows.models import _pipelines

    return next((p for p in list(_pipelines.values()) if isinstance(p, GroupPipeline)), None)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_shard_with_two_gpus_per_job_runs_on_one_torchrun_group(
    harness, fast_retries, tmp_path, monkeypatch
):
    """gpus_per_job = 2 on the CPU (gloo): one group loads the model once and serves the shard's 3 jobs;
    then a rank SIGKILLed mid-job fails that job, its retry starts a new group, and the shard completes."""
    import signal
    import threading
    import time

    from flows.models import clear_pipelines

    monkeypatch.setenv("WANFLOW_GPUS_PER_JOB", "2")
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    clear_pipelines()
    try:
        manifest = write_manifest(tmp_path / "group.jsonl")
        summary = generate_batch(
            manifest, model="tiny-t2v", out=str(tmp_path / "out"), catalog_url=catalog_url, shard_size=4
        )
        assert summary["by_status"]["succeeded"] == 3, summary
        pipe = _group_pipeline()
        assert pipe is not None and pipe.group.starts == 1 and pipe.group.generations == 3
        assert pipe.describe() == {"processes": 2, "ulysses_size": 1, "ring_size": 1, "cfg_parallel": True,
                                   "dit_zero3": False, "t5_zero3": False}  # fmt: skip
        with Catalog(catalog_url) as catalog:
            outputs = catalog.outputs(summary["run_id"])
            assert len(outputs) == 3 and all(verifier()(o) for o in outputs)
        with pytest.raises(ValueError, match="frame_num 8"):  # a bad request: answered, the group lives on
            pipe.settings(frame_num=8)
        assert pipe.group.alive and pipe.group.starts == 1

        # Kill rank 1 as the second job starts sampling (20 steps: long enough to land mid-job).
        slow = tmp_path / "slow.jsonl"
        slow.write_text("".join(json.dumps({"item_id": f"k{i}", "prompt": f"clip {i}", **FAST, "steps": 20})
                                + "\n" for i in range(3)))  # fmt: skip
        killed: list[int] = []

        def kill_second_job() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                if pipe.group.generations >= 5 and pipe.group.alive:  # 3 before, this run's 2nd job
                    killed.append(pipe.group.pids()[1])
                    os.kill(killed[0], signal.SIGKILL)
                time.sleep(0.005)

        thread = threading.Thread(target=kill_second_job, daemon=True)
        thread.start()
        again = generate_batch(
            str(slow), model="tiny-t2v", out=str(tmp_path / "out"), catalog_url=catalog_url, shard_size=4
        )
        thread.join(5)
        assert killed, "the test never saw the second job start"
        assert again["by_status"]["succeeded"] == 3, again
        assert _group_pipeline() is pipe and pipe.group.starts == 2
        with Catalog(catalog_url) as catalog:
            attempts = sorted(j.attempts for j in catalog.jobs(again["run_id"]))
            assert attempts == [1, 1, 2]
            assert all(verifier()(o) for o in catalog.outputs(again["run_id"]))
    finally:
        clear_pipelines()


def test_inputs_outside_the_storage_root_take_their_own_options(monkeypatch):
    from flows.settings import get_settings

    monkeypatch.setenv("WANFLOW_STORAGE_ROOT", "s3://videos/out")
    monkeypatch.setenv("WANFLOW_STORAGE_OPTIONS", '{"key": "writer"}')
    monkeypatch.setenv("WANFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = get_settings()

    def options_for(url: str) -> dict:  # the options, less the timeouts every call gets
        options = settings.storage_options_for(url)
        options.pop("config_kwargs", None)
        client = options.get("client_kwargs", {})
        client.pop("timeout", None)
        return {k: v for k, v in options.items() if v != {}}

    endpoint = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert options_for("s3://videos/out/run/a.mp4") == {"key": "writer", **endpoint}
    assert options_for("s3://inputs/cat.png") == {"key": "writer", **endpoint}  # same kind
    monkeypatch.setenv("WANFLOW_INPUT_STORAGE_OPTIONS", '{"s3": {"anon": true}}')
    settings = get_settings()
    assert options_for("s3://inputs/cat.png") == {"anon": True, **endpoint}
    assert options_for("https://example.org/cat.png") == {}  # other protocols: untouched
    assert options_for("s3://videos/outside.png") == {"anon": True, **endpoint}
    assert options_for("s3://videos/out/run/a.mp4") == {"key": "writer", **endpoint}


@pytest.mark.slow
@pytest.mark.distributed
def test_a_group_whose_stream_is_abandoned_starts_afresh(tmp_path):
    """A job whose frames stop being read mid-video (a storage error) must not hand its remaining frames
    to the next job: the group is ended and the next request starts a new one. The CFG flag reaches the
    ranks in all three states."""
    from flows.group import GroupPipeline, WorkerGroup

    group = WorkerGroup("tiny-t2v", None, 2, layout={"cfg_parallel": False, "ulysses_size": None})
    assert group.command()[-2:] == ["--cfg-parallel", "off"]
    pipe = GroupPipeline(group)
    try:
        assert group.info["layout"]["cfg_parallel"] is False and group.info["layout"]["ulysses_size"] == 2
        settings = dict(size="64*48", frame_num=9, sampling_steps=2)
        stream = pipe.generate_stream("a fox", seed=1, **settings)
        first = next(stream)
        stream.close()  # the caller gives up after one chunk
        assert not group.alive and first.shape[0] == 1
        frames = list(pipe.generate_stream("a fox", seed=1, **settings))
        assert sum(chunk.shape[0] for chunk in frames) == 9 and group.starts == 2
        assert torch.equal(frames[0], first)  # the same job, redone from the start
        assert pipe.settings(frame_num=9).frame_num == 9
        with pytest.raises(ValueError, match="unexpected keyword"):  # a bad request, answered
            pipe.settings(frames=9)
        assert group.alive and group.starts == 2
    finally:
        group.close()
    assert group._dir is None and not group.alive
