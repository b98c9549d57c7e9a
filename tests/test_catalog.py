"""The catalog on SQLite and PostgreSQL: migrations, planning and resuming, the job life cycle, claims from
many processes at once, queries, and the errors a user sees for bad URLs and old schemas."""

from __future__ import annotations

import json
import multiprocessing
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from catalog_helpers import claim, mark_started, rejections, release, requeue_stale

from storage.catalog import (
    MAX_ERROR_CHARS,
    Base,
    Catalog,
    CatalogError,
    JobSpec,
    JobStatus,
    OutputRecord,
    PlanOutcome,
    RunStatus,
    alembic_config,
    job_key,
)

TABLES = {"runs", "models", "jobs", "run_jobs", "outputs", "rejections", "snapshots", "snapshot_samples"}
PARAMS = {"prompt": "a red fox in snow", "negative_prompt": "", "size": [64, 48], "frame_num": 9,
          "steps": 8, "shift": 5.0, "guidance": 5.0, "solver": "unipc"}  # fmt: skip


@pytest.fixture
def catalog(catalog_url):
    with Catalog(catalog_url) as cat:
        cat.upgrade()
        yield cat


def specs(n_items: int = 3, seeds: tuple[int, ...] = (1, 2), fingerprint: str = "fp-a") -> list[JobSpec]:
    return [
        JobSpec(f"item-{i}", seed, "tiny-t2v", fingerprint, {**PARAMS, "prompt": f"prompt {i}"})
        for i in range(n_items)
        for seed in seeds
    ]


def output(n: int = 0, **changes) -> OutputRecord:
    fields = dict(uri=f"file:///out/{n}.mp4", sha256=f"{n:064x}", bytes=1000 + n, width=64, height=48,
                  frames=9, fps=16.0, codec="h264", thumbnail_uri=f"file:///out/{n}.jpg")  # fmt: skip
    return OutputRecord(**{**fields, **changes})


def finish_all(cat: Catalog, run_id: int) -> list[int]:
    """Claim every pending job of the run and mark it succeeded; returns the job ids."""
    done = []
    while jobs := claim(cat, 10, run_id=run_id, worker="w"):
        for job in jobs:
            cat.mark_succeeded(job.id, output(job.id))
            done.append(job.id)
    return done


def table_names(cat: Catalog) -> set[str]:
    return set(sa.inspect(cat.engine).get_table_names())


# --------------------------------------------------------------------------------------------- schema


def test_migrations_upgrade_and_downgrade(catalog_url):
    cat = Catalog(catalog_url)
    assert table_names(cat) == set()
    assert cat.current_revision() is None
    assert cat.upgrade() == "0007"
    assert table_names(cat) == TABLES | {"alembic_version"}
    assert cat.upgrade() == "0007"  # at head already: nothing to do
    with cat.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    assert "owner" not in {c["name"] for c in sa.inspect(cat.engine).get_columns("runs")}
    with cat.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")
    assert table_names(cat) == TABLES - {"rejections", "snapshots", "snapshot_samples"} | {"alembic_version"}
    assert cat.upgrade() == "0007"
    with cat.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert table_names(cat) - {"alembic_version"} == set()
    assert cat.current_revision() is None
    cat.upgrade()
    assert table_names(cat) >= TABLES
    cat.close()


def test_migration_0003_keeps_old_rows_and_adds_crashed(catalog_url):
    """A catalog written at 0002 keeps its runs and jobs through 0003; the new run status is allowed."""
    cat = Catalog(catalog_url)
    with cat.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
    now = datetime.now(UTC)
    with cat.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO runs (name, manifest_uri, manifest_sha256, settings, status, created_at)"
            " VALUES ('old', 'm.jsonl', :sha, '{}', 'running', :now)"
        ), {"sha": "ab" * 32, "now": now})  # fmt: skip
    assert cat.upgrade() == "0007"
    run = cat.get_run("old")
    assert run is not None and run.status == RunStatus.running and run.owner is None
    assert cat.mark_crashed(run.id)
    assert cat.get_run("old").status == RunStatus.crashed
    assert not cat.mark_crashed(run.id)  # ended already
    cat.close()


def test_schema_matches_models(catalog):
    with catalog.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        changed = sa.MetaData()
        for table in Base.metadata.tables.values():
            table.to_metadata(changed)
        # and the comparison does see a difference when there is one
        changed.tables["jobs"].append_column(sa.Column("extra", sa.Integer()))
        assert [d[0] for d in compare_metadata(context, changed)] == ["add_column"]
    inspector = sa.inspect(catalog.engine)
    assert {c["name"] for c in inspector.get_unique_constraints("jobs")} == {"uq_jobs_key"}
    assert {c["name"] for c in inspector.get_check_constraints("jobs")} == {"ck_jobs_job_status"}
    assert {c["name"] for c in inspector.get_foreign_keys("outputs")} == {"fk_outputs_job_id_jobs"}
    assert inspector.get_pk_constraint("run_jobs")["constrained_columns"] == ["run_id", "job_id"]


def test_database_not_at_head_is_refused(catalog_url):
    cat = Catalog(catalog_url)
    with pytest.raises(CatalogError, match="wanflow catalog upgrade"):
        cat.runs()
    cat.upgrade()
    with cat.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0000'"))
    with pytest.raises(CatalogError, match=r"revision 0000, which this wanflow does not know"):
        Catalog(catalog_url).runs()
    with pytest.raises(CatalogError, match="cannot upgrade catalog"):
        Catalog(catalog_url).upgrade()
    cat.close()


# ------------------------------------------------------------------------------------------- planning


def test_create_run_and_plan_jobs(catalog):
    run = catalog.create_run("batch-1", "file:///m.jsonl", "ab" * 32, {"shard_size": 4}, flow_run_id="f-1")
    assert run.status == RunStatus.pending and run.created_at.tzinfo == UTC
    assert catalog.get_run("batch-1") == run == catalog.get_run(run.id) == catalog.get_run(str(run.id))
    summary = catalog.plan_jobs(run.id, specs())
    assert summary == (6, 0, 0, 6) and summary.already_planned == 0
    jobs = catalog.jobs(run_id=run.id)
    assert [(j.item_id, j.seed) for j in jobs] == [(f"item-{i}", s) for i in range(3) for s in (1, 2)]
    assert {j.status for j in jobs} == {JobStatus.pending} and {j.outcome for j in jobs} == {
        PlanOutcome.created
    }
    job = jobs[0]
    assert job.first_run_id == run.id and job.attempts == 0 and job.model_fingerprint == "fp-a"
    assert job.params == {**PARAMS, "prompt": "prompt 0", "shift": 5, "guidance": 5, "item_id": "item-0",
                          "model_id": "tiny-t2v"}  # fmt: skip
    assert job.key == job_key("fp-a", job.params, 1)
    with pytest.raises(CatalogError, match="exists already"):
        catalog.create_run("batch-1", "file:///m.jsonl", "ab" * 32, {})
    assert catalog.get_run("nope") is None and catalog.get_run(999) is None and catalog.get_job(999) is None
    with pytest.raises(CatalogError, match="no run"):
        catalog.plan_jobs(999, specs())


def test_planning_twice_creates_no_duplicates(catalog):
    run = catalog.create_run("r", "m", "0" * 64, {})
    assert catalog.plan_jobs(run.id, specs() + specs()).total == 6  # repeated rows collapse too
    again = catalog.plan_jobs(run.id, specs())
    assert (again.created, again.already_planned, again.total) == (0, 6, 6)
    other = catalog.create_run("r2", "m", "0" * 64, {})
    assert catalog.plan_jobs(other.id, specs()).already_planned == 6
    assert len(catalog.jobs()) == 6 and len(catalog.jobs(run_id=other.id)) == 6
    assert {j.first_run_id for j in catalog.jobs()} == {run.id}
    assert catalog.plan_jobs(other.id, specs(fingerprint="fp-b")).created == 6  # new checkpoint: new jobs


def test_verified_output_is_skipped_by_a_new_run(catalog):
    first = catalog.create_run("first", "m", "0" * 64, {})
    catalog.plan_jobs(first.id, specs())
    done = finish_all(catalog, first.id)
    second = catalog.create_run("second", "m", "0" * 64, {})
    seen = []
    summary = catalog.plan_jobs(second.id, specs(), verify=lambda out: seen.append(out.uri) or True)
    assert (summary.already_done, summary.created, summary.requeued, summary.total) == (6, 0, 0, 6)
    assert sorted(seen) == sorted(f"file:///out/{j}.mp4" for j in done)
    jobs = catalog.jobs(run_id=second.id)
    assert {(j.status, j.outcome) for j in jobs} == {(JobStatus.skipped, PlanOutcome.already_done)}
    assert claim(catalog, 5, run_id=second.id, worker="w") == []
    assert len(catalog.outputs(run_id=second.id)) == 6  # the run's dataset includes what it skipped
    assert catalog.stats(second.id)["by_status"]["skipped"] == 6
    assert {j.status for j in catalog.jobs()} == {JobStatus.succeeded}  # in the jobs table: still succeeded


def test_output_failing_verification_is_requeued(catalog):
    first = catalog.create_run("first", "m", "0" * 64, {})
    catalog.plan_jobs(first.id, specs(n_items=2, seeds=(7,)))
    good, bad = finish_all(catalog, first.id)
    second = catalog.create_run("second", "m", "0" * 64, {})
    summary = catalog.plan_jobs(
        second.id, specs(n_items=2, seeds=(7,)), verify=lambda out: out.job_id == good
    )
    assert (summary.already_done, summary.requeued) == (1, 1)
    assert catalog.get_job(bad).status == JobStatus.pending and catalog.get_job(bad).attempts == 1
    assert [o.job_id for o in catalog.outputs()] == [good]
    assert {j.id: j.outcome for j in catalog.jobs(run_id=second.id)} == {
        good: PlanOutcome.already_done, bad: PlanOutcome.requeued,
    }  # fmt: skip
    (again,) = claim(catalog, 5, run_id=second.id, worker="w")
    assert again.id == bad and again.attempts == 2


# ------------------------------------------------------------------------------------------ life cycle


def test_mark_succeeded_is_one_transaction(catalog):
    run = catalog.create_run("r", "m", "0" * 64, {})
    catalog.plan_jobs(run.id, specs(n_items=1, seeds=(1,)))
    (job,) = claim(catalog, worker="gpu-0")
    mark_started(catalog, job.id)
    with pytest.raises(CatalogError, match=f"output of job {job.id}"):
        catalog.mark_succeeded(job.id, output(uri=None))  # NOT NULL fails after the status update ran
    assert catalog.get_job(job.id).status == JobStatus.running
    assert catalog.outputs() == [] and catalog.output_of(job.id) is None
    stored = catalog.mark_succeeded(job.id, output(3, device="cpu", peak_memory_bytes=123))
    assert stored.id is not None and stored.job_id == job.id and stored.created_at.tzinfo == UTC
    after = catalog.get_job(job.id)
    assert (
        after.status == JobStatus.succeeded and after.seconds >= 0 and after.finished_at >= after.started_at
    )
    assert catalog.outputs() == [stored] and catalog.output_of(job.id) == stored
    with pytest.raises(CatalogError, match="is succeeded, not running"):
        catalog.mark_succeeded(job.id, output(4))
    with pytest.raises(CatalogError, match="does not exist"):
        catalog.mark_failed(999, "x", retry=True)


def test_mark_failed_with_and_without_retry(catalog):
    run = catalog.create_run("r", "m", "0" * 64, {})
    catalog.plan_jobs(run.id, specs(n_items=1, seeds=(1,)))
    (job,) = claim(catalog, worker="gpu-0")
    error = "connect to postgresql://app:hunter2@db/x failed\n" + "x" * 20_000
    catalog.mark_failed(job.id, error, retry=True)
    retried = catalog.get_job(job.id)
    assert retried.status == JobStatus.pending and retried.attempts == 1
    assert "hunter2" not in retried.last_error and "app:***@db" in retried.last_error
    assert len(retried.last_error) < MAX_ERROR_CHARS + 100 and "characters cut" in retried.last_error
    (job,) = claim(catalog, worker="gpu-1")
    assert job.attempts == 2 and job.worker_id == "gpu-1"
    catalog.mark_failed(job.id, "out of memory", retry=False)
    assert catalog.get_job(job.id).status == JobStatus.failed
    assert claim(catalog, worker="gpu-1") == []
    rerun = catalog.create_run("r2", "m", "0" * 64, {})
    assert catalog.plan_jobs(rerun.id, specs(n_items=1, seeds=(1,))).requeued == 1  # failed: try again
    (job,) = claim(catalog, worker="gpu-1")
    release(catalog, job.id)  # given back, not a failure
    released = catalog.get_job(job.id)
    assert (released.status, released.attempts, released.worker_id) == (JobStatus.pending, 2, None)
    (job,) = claim(catalog, worker="gpu-2")
    assert requeue_stale(catalog, timedelta(hours=1)) == 0
    assert requeue_stale(catalog, timedelta(0)) == 1  # its worker is presumed dead
    assert catalog.get_job(job.id).status == JobStatus.pending


def test_an_expired_claim_cannot_be_recorded_by_its_old_worker(catalog):
    run = catalog.create_run("r", "m.jsonl", "ab", {})
    catalog.plan_jobs(run.id, specs(1, seeds=(1,)))
    (job,) = claim(catalog, 1, run_id=run.id, worker="w1")
    assert requeue_stale(catalog, timedelta(0)) == 1
    (again,) = claim(catalog, 1, run_id=run.id, worker="w2")
    assert again.id == job.id and again.attempts == 2
    with pytest.raises(CatalogError, match="is held by worker 'w2', not 'w1'"):
        catalog.mark_succeeded(job.id, output(1), worker="w1")
    with pytest.raises(CatalogError, match="held by worker 'w2'"):
        catalog.mark_failed(job.id, "late", retry=True, worker="w1")
    catalog.mark_succeeded(job.id, output(1), worker="w2")
    assert catalog.output_of(job.id).uri == output(1).uri


@pytest.mark.slow
def test_claims_from_many_processes(catalog, catalog_url):
    """Many processes claim the same 200 pending jobs: each is claimed exactly once, none is left."""
    processes = 4 if catalog_url.startswith("sqlite") else 8
    run = catalog.create_run("many", "m", "0" * 64, {})
    assert catalog.plan_jobs(run.id, specs(n_items=100, seeds=(1, 2))).created == 200
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    from databases import claim_until_empty

    workers = [
        ctx.Process(target=claim_until_empty, args=(catalog_url, f"w{i}", 1 + i % 3, barrier, results))
        for i in range(processes)
    ]
    for proc in workers:
        proc.start()
    reports = [results.get(timeout=120) for _ in workers]
    for proc in workers:
        proc.join(timeout=30)
    assert [r[2] for r in reports if r[2]] == []
    claimed = [job_id for _, ids, _ in reports for job_id in ids]
    assert len(claimed) == len(set(claimed)) == 200
    assert sum(1 for _, ids, _ in reports if ids) >= 2, "only one process got any job: no contention tested"
    assert set(claimed) == {j.id for j in catalog.jobs()}
    by_worker = {j.id: j.worker_id for j in catalog.jobs()}
    assert all(by_worker[job_id] == worker for worker, ids, _ in reports for job_id in ids)
    assert catalog.stats()["by_status"]["running"] == 200
    assert {j.attempts for j in catalog.jobs()} == {1}


# --------------------------------------------------------------------------------------------- queries


def test_stats_and_queries(catalog):
    runs = [catalog.create_run(f"run-{i}", "s3://bucket/m.jsonl", "0" * 64, {"i": i}) for i in range(3)]
    assert [r.name for r in catalog.runs()] == ["run-2", "run-1", "run-0"]
    assert len(catalog.runs(limit=2)) == 2
    catalog.plan_jobs(runs[0].id, specs(n_items=2, seeds=(1,)))
    first, second = claim(catalog, 2, worker="w")
    catalog.mark_succeeded(first.id, output(1, bytes=500), seconds=2.5)
    catalog.mark_failed(second.id, "boom", retry=False)
    catalog.plan_jobs(runs[1].id, specs(n_items=3, seeds=(1,)))  # one done, one failed, one new
    assert [j.id for j in catalog.jobs(status="failed")] == []  # requeued by the plan
    assert len(catalog.jobs(status=JobStatus.pending)) == 2 and len(catalog.jobs(limit=1)) == 1
    assert [j.id for j in catalog.jobs(run_id=runs[1].id, status="skipped")] == [first.id]
    overall = catalog.stats()
    assert overall["by_status"] == {"pending": 2, "running": 0, "succeeded": 1, "failed": 0, "skipped": 0}
    assert (overall["jobs"], overall["outputs"], overall["output_bytes"]) == (3, 1, 500)
    assert overall["seconds"] >= 2.5
    run_view = catalog.stats(runs[1].id)
    assert run_view["by_status"]["skipped"] == 1 and run_view["by_status"]["pending"] == 2
    assert run_view["output_bytes"] == 500 and run_view["seconds"] < 2.5  # skipped work is not this run's
    assert catalog.stats(runs[2].id)["jobs"] == 0
    catalog.start_run(runs[0].id, flow_run_id="flow-123")
    catalog.finish_run(runs[0].id, "succeeded")
    finished = catalog.get_run(runs[0].id)
    assert finished.status == RunStatus.succeeded and finished.flow_run_id == "flow-123"
    assert finished.created_at <= finished.started_at <= finished.finished_at
    for record in (finished, catalog.get_job(first.id), catalog.outputs()[0]):
        assert json.loads(json.dumps(record.to_dict()))["id"] == record.id
    assert catalog.get_run(runs[0].id).to_dict()["status"] == "succeeded"
    with pytest.raises(ValueError):
        catalog.finish_run(runs[0].id, "exploded")


def test_register_model_is_idempotent(catalog):
    for _ in range(2):
        catalog.register_model("t2v-1.3B", "f" * 64, "s3://key:secret@weights/Wan2.1", {"dtype": "bf16"})
    catalog.register_model("t2v-1.3B", "e" * 64, "/ckpt", {})
    with catalog.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT fingerprint, source FROM models ORDER BY id")).all()
    assert rows == [("f" * 64, "s3://key:***@weights/Wan2.1"), ("e" * 64, "/ckpt")]


def test_job_key():
    params = {"item_id": "a", "model_id": "m", **PARAMS}
    key = job_key("fp", params, 42)
    assert len(key) == 64 and key == job_key("fp", dict(reversed(params.items())), 42)
    assert key == job_key("fp", {**params, "size": (64, 48), "shift": 5}, 42)  # tuples, integral floats
    assert job_key("other", params, 42) != key and job_key("fp", params, 43) != key
    for name, value in params.items():
        changed = (
            value + 1
            if isinstance(value, int | float)
            else [1, 2]
            if isinstance(value, list)
            else f"{value}!"
        )
        assert job_key("fp", {**params, name: changed}, 42) != key, name
    assert job_key("fp", {**params, "image": None}, 42) != key  # a new parameter counts too
    with pytest.raises(TypeError, match=r"params\.when"):
        job_key("fp", {"when": timedelta(1)}, 1)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("url", ["mysql://root:hunter2@db/x", "foo://bar", "not a url"])
def test_unknown_scheme(url):
    with pytest.raises(CatalogError, match=r"supported schemes are sqlite .* and postgresql") as info:
        Catalog(url)
    assert "hunter2" not in str(info.value)


def test_unreachable_database_fails_fast_without_the_password():
    start = time.monotonic()
    with pytest.raises(CatalogError) as info:
        Catalog("postgresql+psycopg://postgres:hunter2@127.0.0.1:1/x")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "hunter2" not in message and "postgres:***@127.0.0.1:1/x" in message


def test_sqlite_specifics(tmp_path):
    memory = Catalog("sqlite:///:memory:")
    memory.upgrade()
    assert memory.create_run("r", "m", "0" * 64, {}).id == 1
    path = tmp_path / "deep" / "er" / "catalog.db"
    with Catalog(f"sqlite:///{path}") as cat:
        assert path.parent.is_dir()
        with cat.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 1000


# ------------------------------------------------------------------------- single claims, rejections


def test_claim_job_takes_only_a_pending_job(catalog):
    run = catalog.create_run("r", "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(run.id, specs(1, seeds=(1,)))
    (job,) = catalog.jobs(run.id)
    claimed = catalog.claim_job(job.id, worker="w1")
    assert claimed is not None and claimed.status == JobStatus.running and claimed.worker_id == "w1"
    assert claimed.attempts == 1
    assert catalog.claim_job(job.id, worker="w2") is None  # held by w1
    assert catalog.claim_job(10_000, worker="w2") is None  # no such job
    assert catalog.requeue_abandoned([job.id], "gone", worker="w9") == 0  # held by w1, not w9
    assert catalog.requeue_abandoned([job.id], "worker w1 is gone", worker="w1") == 1
    again = catalog.get_job(job.id)
    assert again.status == JobStatus.pending and again.last_error == "worker w1 is gone"
    assert catalog.requeue_abandoned([job.id], "twice") == 0  # only running jobs are touched
    assert catalog.claim_job(job.id, worker="w2").attempts == 2


def test_rejections_are_recorded_per_run(catalog):
    run = catalog.create_run("r", "m.jsonl", "0" * 64, {})
    other = catalog.create_run("r2", "m.jsonl", "0" * 64, {})
    rows = [
        {"line": 7, "field": "size", "reason": "size '800*480': not a multiple of 16", "item_id": "a",
         "raw": '{"id": "a"}'},
        {"line": 3, "reason": "not a JSON object", "raw": "[1, 2"},
    ]  # fmt: skip
    assert catalog.record_rejections(run.id, rows) == 2
    assert catalog.record_rejections(run.id, []) == 0
    got = rejections(catalog, run.id)
    assert [(r.line, r.field, r.item_id) for r in got] == [(3, None, None), (7, "size", "a")]
    assert rejections(catalog, other.id) == []
    assert catalog.stats(run.id)["rejected"] == 2 and catalog.stats(other.id)["rejected"] == 0
    with pytest.raises(CatalogError):
        catalog.record_rejections(9999, rows)


def test_job_groups_name_what_sharding_needs(catalog):
    run = catalog.create_run("r", "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(run.id, [JobSpec("a", 1, "tiny-t2v", "fp-a", {**PARAMS, "size": "64*48"})])
    catalog.plan_jobs(
        run.id, [JobSpec("x", 5, "tiny-t2v", "fp-a", {**PARAMS, "size": "48*64", "frame_num": 13})]
    )
    rows = catalog.job_groups(run.id)
    assert [(r.model_id, r.size, r.frame_num) for r in rows] == [
        ("tiny-t2v", "64*48", 9),
        ("tiny-t2v", "48*64", 13),
    ]
    (first,) = claim(catalog, 1, run_id=run.id, worker="w")
    assert [r.job_id for r in catalog.job_groups(run.id)] == [rows[1].job_id]
    assert [r.job_id for r in catalog.job_groups(run.id, "running")] == [first.id] == [rows[0].job_id]
