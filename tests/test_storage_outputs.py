"""A job's output end to end (storage + catalog): objects first, catalog row last; faults leave neither;
re-planning skips verified outputs and redoes missing or corrupt ones."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from catalog_helpers import claim
from test_storage_faults import everything_in, fill, mounted_tmpfs

from storage.catalog import Catalog, JobSpec, JobStatus
from storage.faults import PermanentStorageError
from storage.layout import OutputLayout
from storage.outputs import store_job_output, verifier
from storage.video import VideoWriter, verify_object

W, H = 64, 48


def _frames(n_chunks: int, fail_at: int | None = None):
    """Chunks like the VAE yields: 1 frame, then 4 at a time (uint8 [n, H, W, 3])."""
    for i in range(n_chunks):
        if i == fail_at:
            raise RuntimeError("decoder exploded")
        n = 1 if i == 0 else 4
        yield np.full((n, H, W, 3), 40 * i % 256, dtype=np.uint8)


@pytest.fixture
def setup(catalog_url, target):
    catalog = Catalog(catalog_url)
    catalog.upgrade()
    run = catalog.create_run("nightly", "m.jsonl", "ab" * 32, {})
    specs = [JobSpec("fox/../den", 7, "tiny-t2v", "fp0", {"prompt": "a fox", "frame_num": 9})]
    catalog.plan_jobs(run.id, specs)
    yield catalog, run, specs, OutputLayout(target.root), target
    catalog.close()


def _claim(catalog, run):
    (job,) = claim(catalog, 1, run_id=run.id, worker="test")
    return job


def test_output_objects_then_row(setup):
    catalog, run, _, layout, target = setup
    job = _claim(catalog, run)
    out = store_job_output(catalog, job, _frames(3), layout=layout, run_name=run.name, width=W, height=H,
                           storage_options=target.options, provenance={"noise_device": "cpu"})  # fmt: skip
    assert out.frames == 9 and out.uri.startswith(target.root + "/nightly/fox%2F..%2Fden/")
    assert verify_object(out.uri, out.sha256, out.bytes, target.options)
    sidecar = json.loads(target.read(out.sidecar_uri[len(target.root) + 1 :]))
    assert sidecar["output"]["sha256"] == out.sha256 and sidecar["noise_device"] == "cpu"
    assert sidecar["job"]["seed"] == 7 and "python" in sidecar["software"]
    assert catalog.get_job(job.id).status == JobStatus.succeeded
    assert catalog.output_of(job.id).uri == out.uri
    # The quality signals were measured on the frames as they streamed: flat grey chunks (1, 4, 4 frames).
    signals = sidecar["signals"]
    assert signals["frames"] == 9 and signals["flat"] and signals["flat_frames"] == 9
    assert signals["black_frames"] == 1 and signals["frozen_frames"] == 6 and signals["motion"] > 0
    stored = catalog.output_of(job.id)
    assert (stored.motion, stored.flat, stored.phash) == (signals["motion"], True, signals["phash"])


def test_failure_leaves_no_object_and_no_row_then_retry_succeeds(setup):
    catalog, run, _, layout, target = setup
    job = _claim(catalog, run)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        store_job_output(catalog, job, _frames(3, fail_at=2), layout=layout, run_name=run.name, width=W,
                         height=H, storage_options=target.options)  # fmt: skip
    assert [n for n in target.listing() if not n.startswith("upload:")] == []
    assert catalog.output_of(job.id) is None
    catalog.mark_failed(job.id, "decoder exploded", retry=True)
    job = _claim(catalog, run)
    out = store_job_output(catalog, job, _frames(3), layout=layout, run_name=run.name, width=W, height=H,
                           storage_options=target.options)  # fmt: skip
    assert verify_object(out.uri, out.sha256, out.bytes, target.options)
    assert job.attempts == 2


def test_replanning_skips_verified_and_redoes_missing_or_corrupt(setup):
    catalog, run, specs, layout, target = setup
    job = _claim(catalog, run)
    out = store_job_output(catalog, job, _frames(2), layout=layout, run_name=run.name, width=W, height=H,
                           storage_options=target.options)  # fmt: skip
    verify = verifier(target.options)
    again = catalog.create_run("again", "m.jsonl", "ab" * 32, {})
    summary = catalog.plan_jobs(again.id, specs, verify=verify)
    assert (summary.created, summary.already_done, summary.requeued) == (0, 1, 0)

    relative = out.uri[len(target.root) + 1 :]
    target.put(relative, b"corrupt" + target.read(relative)[7:])  # same size, different bytes
    third = catalog.create_run("third", "m.jsonl", "ab" * 32, {})
    summary = catalog.plan_jobs(third.id, specs, verify=verify)
    assert (summary.created, summary.already_done, summary.requeued) == (0, 0, 1)
    assert catalog.get_job(job.id).status == JobStatus.pending and catalog.output_of(job.id) is None


@pytest.mark.integration
def test_s3_outage_during_a_job_leaves_no_object_and_no_row(tmp_path, aws_env):
    """The S3 server goes away while a job streams: no object, no output row; a retry then succeeds."""
    import urllib.request

    import s3fs
    from s3_server import BUCKET, s3_options, start_server, stop_server

    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.upgrade()
    run = catalog.create_run("outage", "m.jsonl", "ab" * 32, {})
    catalog.plan_jobs(run.id, [JobSpec("fox", 1, "tiny-t2v", "fp0", {"prompt": "a fox"})])
    server, port = start_server()
    try:
        # moto keeps its state per process (other tests' buckets too): start from a clean slate.
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")
        )
        s3fs.S3FileSystem(**s3_options(port)).mkdir(BUCKET)
        layout = OutputLayout(f"s3://{BUCKET}/videos")

        def frames_then_outage():
            yield from _frames(2)
            stop_server(server)  # the upload of this small video fails at commit
            yield from _frames(2)

        job = _claim(catalog, run)
        with pytest.raises(OSError, match=r"s3://wanflow-test/videos/outage/fox/fox-s1\.mp4"):
            store_job_output(catalog, job, frames_then_outage(), layout=layout, run_name=run.name, width=W,
                             height=H, storage_options=s3_options(port))  # fmt: skip
        assert catalog.output_of(job.id) is None
    except BaseException:
        stop_server(server)
        catalog.close()
        raise

    server, port = start_server()  # same process, same moto state: the bucket is still there
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(**s3_options(port))
        assert fs.find(f"{BUCKET}/videos") == []
        catalog.mark_failed(job.id, "S3 unreachable", retry=True)
        job = _claim(catalog, run)
        out = store_job_output(catalog, job, _frames(3), layout=layout, run_name=run.name, width=W, height=H,
                               storage_options=s3_options(port))  # fmt: skip
        assert verify_object(out.uri, out.sha256, out.bytes, s3_options(port))
    finally:
        stop_server(server)
        catalog.close()


def _one_job(catalog_url: str):
    catalog = Catalog(catalog_url)
    catalog.upgrade()
    run = catalog.create_run("full", "m.jsonl", "ab" * 32, {})
    catalog.plan_jobs(run.id, [JobSpec("fox", 3, "tiny-t2v", "fp0", {"prompt": "a fox"})])
    return catalog, run


def test_full_disk_fails_at_once_and_leaves_no_file(catalog_url, tmp_path):
    """ENOSPC is permanent (a ValueError to the job runner: no retries with backoff) and neither the
    temporary file nor anything else stays in the output folder."""
    catalog, run = _one_job(catalog_url)
    try:
        with mounted_tmpfs(tmp_path / "full", "256k") as root:
            fill(root)
            job = _claim(catalog, run)
            with pytest.raises(PermanentStorageError, match=r"disk full \(ENOSPC\)") as err:
                store_job_output(catalog, job, _frames(3), layout=OutputLayout(str(root)), run_name=run.name,
                                 width=W, height=H)  # fmt: skip
            assert isinstance(err.value, ValueError)
            assert everything_in(root) == ["filler"]
            assert catalog.output_of(job.id) is None
    finally:
        catalog.close()


def test_disk_full_after_the_video_removes_the_video(catalog_url, tmp_path):
    """Room for the video and nothing more: the thumbnail fails, and the committed video goes again."""
    with VideoWriter(str(tmp_path / "ref.mp4"), width=W, height=H) as reference:  # what the job will encode
        for chunk in _frames(3):
            reference.write(chunk)
    pages = -(-reference.nbytes // 4096)  # tmpfs hands out whole pages
    catalog, run = _one_job(catalog_url)
    try:
        with mounted_tmpfs(tmp_path / "full", "256k") as root:
            fill(root)
            os.truncate(root / "filler", os.path.getsize(root / "filler") // 4096 * 4096 - pages * 4096)
            job = _claim(catalog, run)
            with pytest.raises(PermanentStorageError, match=r"fox-s3\.thumb\.webp: disk full \(ENOSPC\)"):
                store_job_output(catalog, job, _frames(3), layout=OutputLayout(str(root)), run_name=run.name,
                                 width=W, height=H)  # fmt: skip
            assert everything_in(root) == ["filler"]  # the video was stored, then removed again
    finally:
        catalog.close()
