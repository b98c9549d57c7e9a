"""Read-only queries and statistics: runs, jobs (each run's own view of them), outputs, rejected rows,
shard groups, progress and counts.

Every function takes an open `Session` and only reads. A run sees a job it found already done, or one
another run made, as `skipped` (`_run_status`); the jobs table itself keeps `succeeded`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.catalog.records import (
    _PLAN_CHUNK,
    MAX_ID,
    JobGroupRow,
    JobRecord,
    JobStatus,
    OutputRecord,
    PlanOutcome,
    RejectionRecord,
    RunRecord,
    RunStatus,
    _storable,
)
from storage.catalog.tables import Job, Output, Rejection, Run, RunJob, _record, _run

# ----------------------------------------------------------------------------------------------- runs


def get_run(session: Session, id_or_name: int | str) -> RunRecord | None:
    """A run by id or by name (a digit string that names no run is taken as an id); None if absent."""
    run = None
    if isinstance(id_or_name, str):
        run = session.scalars(select(Run).where(Run.name == _storable(id_or_name))).one_or_none()
    by_id = isinstance(id_or_name, int) or (id_or_name.isascii() and id_or_name.isdigit())
    if run is None and by_id:
        number = int(id_or_name)
        run = session.get(Run, number) if 0 < number <= MAX_ID else None
    return None if run is None else _record(RunRecord, run)


def runs(session: Session, limit: int = 50) -> list[RunRecord]:
    """The newest runs first (`limit` of them)."""
    rows = session.scalars(select(Run).order_by(Run.id.desc()).limit(limit)).all()
    return [_record(RunRecord, run) for run in rows]


def unfinished_runs(session: Session) -> list[RunRecord]:
    """Runs still `pending` or `running`, oldest first (some may belong to processes that died)."""
    rows = session.scalars(
        select(Run).where(Run.status.in_([RunStatus.pending, RunStatus.running])).order_by(Run.id)
    ).all()
    return [_record(RunRecord, run) for run in rows]


def rejections(session: Session, run_id: int) -> list[RejectionRecord]:
    """The manifest rows a run left out, in manifest order."""
    rows = session.scalars(
        select(Rejection).where(Rejection.run_id == run_id).order_by(Rejection.line, Rejection.id)
    ).all()
    return [_record(RejectionRecord, row) for row in rows]


# ---------------------------------------------------------------------------------- jobs and outputs


def get_jobs(session: Session, job_ids: Iterable[int]) -> list[JobRecord]:
    """The jobs with these ids that exist, by id."""
    ids = list(job_ids)
    rows = []
    for k in range(0, len(ids), _PLAN_CHUNK):
        rows += session.scalars(select(Job).where(Job.id.in_(ids[k : k + _PLAN_CHUNK]))).all()
    return sorted((_record(JobRecord, job) for job in rows), key=lambda j: j.id)


def get_job(session: Session, job_id: int) -> JobRecord | None:
    """A job by id; None if absent."""
    job = session.get(Job, job_id)
    return None if job is None else _record(JobRecord, job)


def output_of(session: Session, job_id: int) -> OutputRecord | None:
    """The output of a job; None if it has none (yet)."""
    row = session.scalars(select(Output).where(Output.job_id == job_id)).one_or_none()
    return None if row is None else _record(OutputRecord, row)


def _made_by() -> sa.ColumnElement[int]:
    """The run whose worker last took the job (jobs from before revision 0003: the run that planned it)."""
    return sa.func.coalesce(Job.last_run_id, Job.first_run_id)


def _run_status() -> sa.ColumnElement[str]:
    """A job's status as a run sees it: `skipped` where the run found it already done, or where another
    run made it (two runs of one manifest at once share the work; each counts only its own)."""
    made_elsewhere = sa.and_(Job.status == JobStatus.succeeded, _made_by() != RunJob.run_id)
    return sa.case(
        (RunJob.outcome == PlanOutcome.already_done.value, JobStatus.skipped.value),
        (made_elsewhere, JobStatus.skipped.value),
        else_=sa.cast(Job.status, sa.String),
    )


def jobs(
    session: Session, run_id: int | None = None, status: JobStatus | str | None = None,
    limit: int | None = None,
) -> list[JobRecord]:  # fmt: skip
    """Jobs by id; with `run_id`, every job the run asked for, with that run's status and outcome."""
    if run_id is None:
        query = select(Job)
        if status is not None:
            query = query.where(Job.status == JobStatus(status))
        rows = session.scalars(query.order_by(Job.id).limit(limit)).all()
        return [_record(JobRecord, job) for job in rows]
    run_status = _run_status().label("run_status")
    query = select(Job, RunJob.outcome, run_status).join(RunJob, RunJob.job_id == Job.id)
    query = query.where(RunJob.run_id == run_id)
    if status is not None:
        query = query.where(run_status == JobStatus(status).value)
    found = session.execute(query.order_by(Job.id).limit(limit)).all()
    return [
        _record(JobRecord, job, status=JobStatus(view), outcome=PlanOutcome(outcome))
        for job, outcome, view in found
    ]


def job_groups(session: Session, run_id: int, status: JobStatus) -> list[JobGroupRow]:
    """(job id, model id, size, frame_num, LoRA set, step cache) of a run's jobs in `status` (the run's
    view), by job id: what sharding needs, without loading every job's parameters."""
    run_status = _run_status()
    query = (
        select(
            Job.id, Job.model_id, Job.params["size"].as_string(), Job.params["frame_num"].as_integer(),
            Job.params["loras"], Job.params["cache"],
        )
        .join(RunJob, RunJob.job_id == Job.id)
        .where(RunJob.run_id == run_id, run_status == status.value)
        .order_by(Job.id)
    )
    return [JobGroupRow(*row) for row in session.execute(query)]


def outputs(
    session: Session, run_id: int | None = None, limit: int | None = None, where: Iterable[Any] = ()
) -> list[OutputRecord]:
    """Outputs by id; with `run_id`, the outputs of every job the run asked for (skipped ones too); `where`:
    `storage.catalog.filters.Condition`s they must all meet."""
    query = select(Output).order_by(Output.id).limit(limit)
    if run_id is not None:
        query = query.join(RunJob, RunJob.job_id == Output.job_id).where(RunJob.run_id == run_id)
    for condition in where:
        query = query.where(condition.clause())
    return [_record(OutputRecord, row) for row in session.scalars(query).all()]


# ------------------------------------------------------------------------------------------ statistics


def progress(session: Session, run_id: int) -> tuple[int, int]:
    """(jobs finished, jobs) of a run as it sees them now: succeeded, failed and skipped are finished.
    One query (shards ask every few seconds)."""
    _run(session, run_id)
    by = _status_counts(session, _run_jobs(run_id).subquery())
    done = by[JobStatus.succeeded] + by[JobStatus.failed] + by[JobStatus.skipped]
    return done, sum(by.values())


def model_stats(session: Session, run_id: int | None = None) -> list[dict[str, Any]]:
    """Per model, the videos made (by the run, with `run_id`; else all) and their generation seconds, all
    and on a GPU (an output whose device is `cuda...`), for throughput and cost. A job's seconds are its
    wall clock: a job spread over a worker group of N GPUs counts once, not N times."""
    on_gpu = Output.device.like("cuda%")
    query = (
        select(
            Job.model_id, sa.func.count(Output.id), sa.func.coalesce(sa.func.sum(Job.seconds), 0.0),
            sa.func.count(Output.id).filter(on_gpu),
            sa.func.coalesce(sa.func.sum(Job.seconds).filter(on_gpu), 0.0),
        )
        .join(Output, Output.job_id == Job.id)
        .group_by(Job.model_id)
        .order_by(Job.model_id)
    )  # fmt: skip
    if run_id is not None:
        _run(session, run_id)
        query = query.where(_made_by() == run_id)
    return [
        {"model": model, "videos": int(videos), "seconds": round(float(seconds), 6),
         "gpu_videos": int(gpu_videos), "gpu_seconds": round(float(gpu_seconds), 6)}
        for model, videos, seconds, gpu_videos, gpu_seconds in session.execute(query)
    ]  # fmt: skip


def _run_jobs(run_id: int) -> sa.Select[Any]:
    """A run's jobs as it sees them: (job_id, status, seconds), the status in the run's view (`_run_status`)
    and the seconds only of the jobs its own workers made (not those made earlier or by another run)."""
    own = sa.case((_made_by() == run_id, Job.seconds), else_=None)
    return (
        select(Job.id.label("job_id"), _run_status().label("status"), own.label("seconds"))
        .join(RunJob, RunJob.job_id == Job.id)
        .where(RunJob.run_id == run_id)
    )  # fmt: skip


def _status_counts(session: Session, jobs: Any) -> dict[str, int]:
    """{status: count} of a (job_id, status, seconds) subquery, every status present."""
    counts = dict.fromkeys((s.value for s in JobStatus), 0)
    for status, count in session.execute(select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)):
        counts[status] = count
    return counts


def stats(session: Session, run_id: int | None = None) -> dict[str, Any]:
    """Job counts by status (a run's view with `run_id`), output count and bytes, generation seconds."""
    if run_id is None:
        status_col: sa.ColumnElement[Any] = sa.cast(Job.status, sa.String)
        base = select(Job.id.label("job_id"), status_col.label("status"), Job.seconds)
    else:
        _run(session, run_id)
        base = _run_jobs(run_id)
    jobs = base.subquery()
    counts = _status_counts(session, jobs)
    done_here = jobs.c.status != JobStatus.skipped.value  # time spent by this run, not earlier ones
    seconds = session.scalar(select(sa.func.coalesce(sa.func.sum(jobs.c.seconds), 0.0)).where(done_here))
    n_out, n_bytes = session.execute(
        select(sa.func.count(Output.id), sa.func.coalesce(sa.func.sum(Output.bytes), 0)).join(
            jobs, jobs.c.job_id == Output.job_id
        )
    ).one()
    rejected = session.scalar(
        select(sa.func.count(Rejection.id)).where(
            Rejection.run_id == run_id if run_id is not None else sa.true()
        )
    )
    return {
        "run_id": run_id, "jobs": sum(counts.values()), "by_status": counts, "outputs": int(n_out),
        "output_bytes": int(n_bytes), "seconds": round(float(seconds or 0.0), 3),
        "rejected": int(rejected or 0),
    }  # fmt: skip
