"""What the chaos trials (tests/test_chaos.py, benchmarks/chaos.py) found, each reproduced on its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prefect import flow, get_client, task
from prefect.states import Running
from prefect.testing.utilities import prefect_test_harness
from s3_server import Target

from flows.recovery import process_owner, reap_crashed_runs
from storage.catalog import Catalog, RunStatus
from storage.faults import PROBE_PREFIX, probe_storage_root
from storage.video import PART_SIZE_ENV, _S3Sink, write_bytes, write_image


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def _dead_owner() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = process_owner(child.pid)
    child.wait()
    return owner


@flow(name="chaos-batch")
def _batch() -> None: ...


@flow(name="chaos-shard")
def _shard() -> None: ...


@task(name="chaos-shard-call")
def _shard_call() -> None: ...


@pytest.mark.slow
def test_a_crashed_batch_crashes_its_in_process_shard_subflows_in_prefect(harness, tmp_path):
    """A SIGKILLed `wanflow generate` left its shard subflow runs Running in Prefect for ever: only the batch
    flow run was set to Crashed. Subflows that ran in the dead process now crash with it; a deployed shard
    run (on a worker of its own, which reports its own end) is left alone."""
    with get_client(sync_client=True) as client:
        batch = client.create_flow_run(_batch, state=Running())

        def subflow_of(parent_id, key: str, deployment_id=None):
            call = client.create_task_run(_shard_call, parent_id, dynamic_key=key, state=Running())
            if deployment_id is None:
                return client.create_flow_run(_shard, parent_task_run_id=call.id, state=Running())
            return client.create_flow_run_from_deployment(deployment_id, parent_task_run_id=call.id,
                                                          state=Running())  # fmt: skip

        shard = subflow_of(batch.id, "shard-1")
        nested = subflow_of(shard.id, "inner")
        deployment = client.create_deployment(flow_id=client.create_flow(_shard), name="gpu")
        deployed = subflow_of(batch.id, "shard-2", deployment)
        with Catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
            catalog.upgrade()
            run = catalog.create_run("killed", "/m.jsonl", "ab" * 32, {}, str(batch.id), owner=_dead_owner())
            catalog.start_run(run.id, flow_run_id=str(batch.id))
            assert [r.name for r in reap_crashed_runs(catalog)] == ["killed"]
            assert catalog.get_run("killed").status == RunStatus.crashed

        def state(flow_run) -> str:
            return client.read_flow_run(flow_run.id).state.type.value

        assert state(batch) == state(shard) == state(nested) == "CRASHED"
        assert state(deployed) == "RUNNING"
        assert "ran in the process of its parent" in client.read_flow_run(shard.id).state.message


@pytest.mark.slow
def test_a_run_is_finished_in_the_catalog_only_after_its_contact_sheet(harness, tmp_path, monkeypatch):
    """A `wanflow generate` killed while it wrote its contact sheet (or artifacts) had already marked its run
    succeeded in the catalog: no later run marked it crashed, and its Prefect flow run showed Running for
    ever. The run is now finished last, so such a kill leaves it running, for the next run to reap."""
    import flows.batch as batch
    import flows.reporting as reporting

    seen = []
    sheet = reporting._sheet

    def watched_sheet(catalog, run_id, *args, **kwargs):
        seen.append(catalog.get_run(run_id).status)
        return sheet(catalog, run_id, *args, **kwargs)

    monkeypatch.setattr(reporting, "_sheet", watched_sheet)
    manifest = tmp_path / "m.jsonl"
    row = {"item_id": "fox", "prompt": "a fox", "size": "64*48", "frame_num": 5, "steps": 2}
    manifest.write_text(json.dumps(row) + "\n")
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with Catalog(url) as catalog:
        catalog.upgrade()
    summary = batch.generate_batch(str(manifest), model="tiny-t2v", out=str(tmp_path / "videos"),
                                   catalog_url=url)  # fmt: skip
    assert summary["status"] == "succeeded" and summary["outputs"] == 1
    assert seen == [RunStatus.running]
    with Catalog(url) as catalog:
        assert catalog.get_run(summary["run_id"]).status == RunStatus.succeeded


@pytest.mark.integration
def test_objects_written_whole_are_one_put_whatever_the_part_size(s3_target: Target, monkeypatch):
    """A `wanflow generate` killed while it uploaded its contact sheet (a multipart upload once the sheet was
    over the part size) left the upload open, and no later run aborted it: only each job's own keys are
    cleaned when the job is redone, and planning ends only uploads older than a job may run. Objects
    written whole from memory (sidecars, thumbnails, posters, contact sheets) now go in one PUT."""
    monkeypatch.setenv(PART_SIZE_ENV, "2048")
    started = []
    upload_part = _S3Sink._upload_part

    def counted(self, body):
        started.append(self.key)
        return upload_part(self, body)

    monkeypatch.setattr(_S3Sink, "_upload_part", counted)
    noise = np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    _, size = write_image(s3_target.url("run/contact_sheet.webp"), noise, format="webp",
                          storage_options=s3_target.options)  # fmt: skip
    write_bytes(s3_target.url("run/fox/fox-s1.json"), b"{}" * 4096, storage_options=s3_target.options)
    assert size > 2048 and started == []
    assert s3_target.listing() == ["run/contact_sheet.webp", "run/fox/fox-s1.json"]  # no upload left open


@pytest.mark.slow
def test_a_run_that_ended_just_before_its_process_died_gets_its_flow_run_crashed(harness, tmp_path):
    """Killed after its run ended in the catalog but before Prefect heard the flow run end, a process left
    that flow run Running for ever: the reaper looked at unfinished runs only. The next run's reaper now sets
    it to Crashed; the catalog keeps the run's status, and a live process's flow run is left alone."""
    with get_client(sync_client=True) as client, Catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
        catalog.upgrade()
        flow_runs = {}
        for name, owner in (("dead", _dead_owner()), ("alive", process_owner())):
            flow_runs[name] = client.create_flow_run(_batch, state=Running())
            run = catalog.create_run(name, "/m.jsonl", "ab" * 32, {}, str(flow_runs[name].id), owner=owner)
            catalog.start_run(run.id)
            catalog.finish_run(run.id, RunStatus.succeeded)
        assert reap_crashed_runs(catalog) == []  # nothing unfinished in the catalog
        assert catalog.get_run("dead").status == catalog.get_run("alive").status == RunStatus.succeeded
        state = client.read_flow_run(flow_runs["dead"].id).state
        assert state.type.value == "CRASHED" and "ended succeeded in the catalog" in state.message
        assert client.read_flow_run(flow_runs["alive"].id).state.type.value == "RUNNING"


@pytest.mark.slow
def test_a_flow_run_killed_before_its_catalog_run_existed_is_crashed_with_its_task_runs(harness, tmp_path):
    """Killed in the second or two between its flow run starting and its run reaching the catalog, a
    `wanflow generate` left that flow run Running in Prefect for ever (1 of 20 chaos trials): the reaper found
    flow runs through catalog rows only, and the task runs of a crashed flow run stayed Running too. The CLI
    now tags its flow run with its process (`wanflow-owner:<host>:<pid>:<start>`): the next reaper crashes
    such a run whose process is gone, with its subflows and their task runs; live and untagged runs stay."""
    from flows.recovery import OWNER_TAG

    with get_client(sync_client=True) as client:
        runs = {}
        for name, tags in (("dead", [OWNER_TAG + _dead_owner()]), ("alive", [OWNER_TAG + process_owner()]),
                           ("untagged", [])):  # fmt: skip
            runs[name] = client.create_flow_run(_batch, state=Running(), tags=tags)
        dead, alive = runs["dead"], runs["alive"]
        call = client.create_task_run(_shard_call, dead.id, dynamic_key="shard-1", state=Running())
        shard = client.create_flow_run(_shard, parent_task_run_id=call.id, state=Running(), tags=dead.tags)
        job = client.create_task_run(_shard_call, shard.id, dynamic_key="job-1", state=Running())
        alive_job = client.create_task_run(_shard_call, alive.id, dynamic_key="job-1", state=Running())
        with Catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
            catalog.upgrade()
            assert reap_crashed_runs(catalog) == []  # the catalog never heard of any of them

        def state(run_id) -> str:
            return client.read_flow_run(run_id).state.type.value

        def task_state(task_run) -> str:
            return client.read_task_run(task_run.id).state.type.value

        assert state(dead.id) == state(shard.id) == "CRASHED"
        assert "died" in client.read_flow_run(dead.id).state.message
        assert task_state(call) == task_state(job) == "CRASHED"
        assert state(alive.id) == state(runs["untagged"].id) == "RUNNING"
        assert task_state(alive_job) == "RUNNING"


@pytest.mark.slow
def test_shard_runs_queued_for_a_batch_that_ended_are_cancelled(harness, tmp_path):
    """A deployed shard run still waiting for a worker (Scheduled, Late or Pending) when its batch's process
    was killed would start later on its own, for a run the catalog calls crashed. The reaper now cancels it,
    with a message naming the batch run, and so the queued shard runs of a run that ended otherwise (stopped
    with Ctrl-C: cancelled). A shard run that has started is left to its worker; a live run's queue stays."""
    from prefect.states import Late, Pending, Scheduled

    with get_client(sync_client=True) as client, Catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
        catalog.upgrade()
        deployment = client.create_deployment(flow_id=client.create_flow(_shard), name="queued")

        def batch(name: str, owner: str):
            flow_run = client.create_flow_run(_batch, state=Running())
            run = catalog.create_run(name, "/m.jsonl", "ab" * 32, {}, str(flow_run.id), owner=owner)
            catalog.start_run(run.id, flow_run_id=str(flow_run.id))
            return flow_run, run

        def shard(batch_flow_run, run, key: str, state):
            call = client.create_task_run(_shard_call, batch_flow_run.id, dynamic_key=key, state=Running())
            return client.create_flow_run_from_deployment(
                deployment, parameters={"run_id": run.id, "run_name": run.name}, parent_task_run_id=call.id,
                state=state,
            )  # fmt: skip

        killed_flow, killed = batch("killed", _dead_owner())
        live_flow, live = batch("live", process_owner())
        stopped_flow, stopped = batch("stopped", process_owner())
        catalog.finish_run(stopped.id, RunStatus.cancelled)
        queued = [shard(killed_flow, killed, "s1", Scheduled()), shard(killed_flow, killed, "s2", Late()),
                  shard(killed_flow, killed, "s3", Pending())]  # fmt: skip
        started = shard(killed_flow, killed, "s4", Running())
        live_queued = shard(live_flow, live, "s1", Scheduled())
        stopped_queued = shard(stopped_flow, stopped, "s1", Scheduled())

        assert [r.name for r in reap_crashed_runs(catalog)] == ["killed"]

        def state(flow_run):
            return client.read_flow_run(flow_run.id).state

        for flow_run in queued:
            assert state(flow_run).type.value == "CANCELLED"
            assert f"its batch run killed (run {killed.id}, flow run {killed_flow.id}) is crashed" in (
                state(flow_run).message
            )
        assert state(stopped_queued).type.value == "CANCELLED"
        assert f"its batch run stopped (run {stopped.id}" in state(stopped_queued).message
        assert "is cancelled" in state(stopped_queued).message
        assert state(started).type.value == state(live_flow).type.value == "RUNNING"
        assert state(live_queued).type.value == "SCHEDULED"


@pytest.mark.slow
def test_a_shard_run_that_starts_after_its_batch_crashed_ends_at_once(harness, tmp_path):
    """A shard run queued before its batch crashed, which a worker picks up later anyway, ends Cancelled at
    once (saying why), before it probes the storage, loads a model or claims a job: the jobs stay pending for
    the next run of the manifest."""
    from flows.recovery import queued_shard_end
    from flows.shard import generate_shard
    from storage.catalog import JobSpec, JobStatus

    url = f"sqlite:///{tmp_path / 'c.db'}"
    with Catalog(url) as catalog:
        catalog.upgrade()
        run = catalog.create_run("killed", "/m.jsonl", "ab" * 32, {}, owner=_dead_owner())
        catalog.start_run(run.id)
        spec = JobSpec("fox", 1, "tiny-t2v", "random:tiny-t2v:seed0", {"prompt": "a fox", "frame_num": 5})
        catalog.plan_jobs(run.id, [spec])
        job_ids = [job.id for job in catalog.jobs(run.id)]
        assert queued_shard_end(catalog.get_run(run.id)) is None  # a running run's shards start
        assert catalog.mark_crashed(run.id)
    out = tmp_path / "out"
    state = generate_shard(run.id, job_ids, "tiny-t2v", catalog_url=url, storage_root=str(out),
                           run_name="killed", return_state=True)  # fmt: skip
    assert state.is_cancelled(), state
    assert state.message == f"not started: its batch run killed (run {run.id}) is crashed in the catalog"
    with Catalog(url) as catalog:
        assert [(j.status, j.attempts, j.worker_id) for j in catalog.jobs(run.id)] == [
            (JobStatus.pending, 0, None)
        ]
    assert not out.exists()  # not even the storage probe ran


_KILLED_PROBE = """
import json, os, signal, sys
import storage.faults as faults

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

url, options = sys.argv[1], json.loads(sys.argv[2]) or None
if url.startswith("s3://"):
    bounded = faults._bounded_s3_class()
    call = bounded.call_s3

    def dying(self, method, *args, **kwargs):  # dies once the probe is written, before it is deleted
        return die() if method == "delete_object" else call(self, method, *args, **kwargs)

    bounded.call_s3 = dying
else:
    os.fsync = die  # the probe file is written; the process dies before deleting it
faults.probe_storage_root(url, options)
"""


def test_a_probe_left_by_a_killed_process_is_removed_by_the_next(target: Target):
    """A process killed between writing its storage probe and deleting it (each run and each shard probes
    its root first) left a `.wanflow-probe-*` object under the root for ever, with no catalog row. The next
    probe of that root now deletes it."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}
    done = subprocess.run([sys.executable, "-c", _KILLED_PROBE, target.root, json.dumps(target.options)],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = target.listing()
    assert len(left) == 1 and left[0].startswith(PROBE_PREFIX)
    probe_storage_root(target.root, target.options)
    assert target.listing() == []


def test_catalog_runs_starts_no_prefect_server_to_ask_about_ended_runs(tmp_path):
    """Looking for the flow runs of ended runs (the test above) must not make `wanflow catalog runs` start a
    temporary Prefect server when none runs: it took about 20 s, at every look (nearly every recent run has
    a dead owner). With no API configured and no local server, Prefect is not asked."""
    import uuid

    url = f"sqlite:///{tmp_path / 'c.db'}"
    with Catalog(url) as catalog:
        catalog.upgrade()
        run = catalog.create_run("ended", "/m.jsonl", "ab" * 32, {}, str(uuid.uuid4()), owner=_dead_owner())
        catalog.start_run(run.id)
        catalog.finish_run(run.id, RunStatus.succeeded)
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    wanflow = Path(sys.executable).with_name("wanflow")
    done = subprocess.run([str(wanflow), "catalog", "runs", "--json", "--catalog-url", url], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in json.loads(done.stdout)] == ["succeeded"]
    assert not (home / "prefect.db").exists()  # no temporary server made its database there
