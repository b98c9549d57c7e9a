"""The life cycle of runs and jobs: runs started, finished and found crashed; jobs claimed, started,
succeeded (with their output row), failed, released, and requeued when their worker is gone.

Every function takes an open `Session` and runs inside the caller's transaction. `mark_succeeded` writes the
output row and the job status in one transaction, so a job is `succeeded` exactly when its output row exists.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.catalog.records import (
    _PLAN_CHUNK,
    CatalogError,
    JobRecord,
    JobStatus,
    OutputRecord,
    RunStatus,
    _clean_error,
    _now,
)
from storage.catalog.tables import Job, Output, Run, RunJob, _record, _run

# ----------------------------------------------------------------------------------------------- runs


def start_run(session: Session, run_id: int, *, flow_run_id: str | None = None) -> None:
    """Mark a run running (sets started_at once; records the Prefect flow-run id if given)."""
    run = _run(session, run_id)
    run.status = RunStatus.running
    run.started_at = run.started_at or _now()
    run.flow_run_id = flow_run_id or run.flow_run_id


def finish_run(session: Session, run_id: int, status: RunStatus) -> None:
    """Set a run's final status and finished_at."""
    run = _run(session, run_id)
    run.status, run.finished_at = status, _now()


def mark_crashed(session: Session, run_id: int) -> bool:
    """Mark a run whose process died `crashed`, if it is still pending or running; True if it was."""
    done = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status.in_([RunStatus.pending, RunStatus.running]))
        .values(status=RunStatus.crashed, finished_at=_now()),
        execution_options={"synchronize_session": False},
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- jobs


def claim(session: Session, limit: int = 1, *, run_id: int | None = None, worker: str) -> list[JobRecord]:
    """Atomically move up to `limit` pending jobs (oldest first) to running for `worker`."""
    query = (
        select(Job.id).where(Job.status == JobStatus.pending).order_by(Job.id).limit(limit)
        .with_for_update(skip_locked=True)
    )  # fmt: skip
    if run_id is not None:
        query = query.where(Job.id.in_(select(RunJob.job_id).where(RunJob.run_id == run_id)))
    ids = list(session.scalars(query).all())
    if not ids:
        return []
    session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.status == JobStatus.pending)
        .values(
            status=JobStatus.running,
            attempts=Job.attempts + 1,
            claimed_at=_now(),
            worker_id=worker,
            started_at=None,
            finished_at=None,
            seconds=None,
            **({"last_run_id": run_id} if run_id is not None else {}),
        ),
        execution_options={"synchronize_session": False},
    )
    jobs = session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)).all()
    return [_record(JobRecord, job) for job in jobs]


def claim_job(
    session: Session, job_id: int, *, worker: str, start: bool = False, run_id: int | None = None
) -> JobRecord | None:
    """Atomically move one given job from pending to running for `worker`; None if it is not pending
    (another worker holds it, or it is done already). With `start`, also mark it started (as
    `mark_started` would), in the same transaction. `run_id` is the run the worker works for: the job
    then counts as that run's work (`last_run_id`)."""
    now = _now()
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.pending)
        .values(
            status=JobStatus.running, attempts=Job.attempts + 1, claimed_at=now, worker_id=worker,
            started_at=now if start else None, finished_at=None, seconds=None,
            **({"last_run_id": run_id} if run_id is not None else {}),
        ),
        execution_options={"synchronize_session": False},
    )  # fmt: skip
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return _record(JobRecord, session.get_one(Job, job_id))


def requeue_abandoned(session: Session, ids: list[int], reason: str, *, worker: str | None = None) -> int:
    """Put running jobs whose worker is known to be gone back to pending, noting `reason`. With
    `worker`, only jobs still held by that worker (not one that claimed them since)."""
    held = Job.worker_id == worker if worker is not None else sa.true()
    stmt = (
        update(Job)
        .where(Job.id.in_(ids), Job.status == JobStatus.running, held)
        .values(
            status=JobStatus.pending, worker_id=None, claimed_at=None, last_error=_clean_error(reason)
        )
    )  # fmt: skip
    return session.execute(stmt, execution_options={"synchronize_session": False}).rowcount  # type: ignore[attr-defined]


def _transition(session: Session, job_id: int, worker: str | None = None, **values: Any) -> None:
    """Update a running job (held by `worker`, when given); CatalogError if it does not exist, is not
    running, or was claimed again by someone else (for instance after its claim expired)."""
    stmt = update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
    if worker is not None:
        stmt = stmt.where(Job.worker_id == worker)
    done = session.execute(stmt.values(**values), execution_options={"synchronize_session": False})
    if done.rowcount != 1:  # type: ignore[attr-defined]
        job = session.get(Job, job_id)
        if job is None:
            state = "does not exist"
        elif job.status != JobStatus.running:
            state = f"is {job.status.value}, not running"
        else:
            state = f"is held by worker {job.worker_id!r}, not {worker!r}"
        raise CatalogError(f"job {job_id} {state}")


def _elapsed(session: Session, job_id: int, now: datetime) -> float | None:
    row = session.execute(select(Job.started_at, Job.claimed_at).where(Job.id == job_id)).first()
    since = row and (row.started_at or row.claimed_at)
    return (now - since).total_seconds() if since else None


def mark_started(session: Session, job_id: int, *, worker: str | None = None) -> None:
    """Note that generation of a claimed job has begun (sets started_at)."""
    _transition(session, job_id, worker, started_at=_now())


def mark_succeeded(
    session: Session, job_id: int, output: OutputRecord, *, seconds: float | None = None,
    worker: str | None = None,
) -> OutputRecord:  # fmt: skip
    """Record the job's output and mark it succeeded (both or neither: one transaction, the caller's).
    `seconds` defaults to the time since `mark_started` (or the claim)."""
    now = _now()
    fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    fields.update(id=None, job_id=job_id, created_at=now)
    elapsed = seconds if seconds is not None else _elapsed(session, job_id, now)
    _transition(
        session,
        job_id,
        worker,
        status=JobStatus.succeeded,
        finished_at=now,
        seconds=elapsed,
        last_error=None,
    )
    row = Output(**{k: v for k, v in fields.items() if k != "id"})
    session.add(row)
    session.flush()
    session.refresh(row)  # hand back what the database holds (fps as float, say)
    return _record(OutputRecord, row)


def mark_failed(session: Session, job_id: int, error: str, *, retry: bool, worker: str | None = None) -> None:
    """Record a failed attempt: pending again when `retry`, else failed. The text is redacted and cut."""
    now = _now()
    _transition(
        session, job_id, worker, status=JobStatus.pending if retry else JobStatus.failed,
        last_error=_clean_error(error), finished_at=now, seconds=_elapsed(session, job_id, now),
    )  # fmt: skip


def release(session: Session, job_id: int) -> None:
    """Give a claimed job back (pending) without counting the attempt."""
    _transition(
        session, job_id, status=JobStatus.pending, claimed_at=None, started_at=None, worker_id=None,
        attempts=sa.case((Job.attempts > 0, Job.attempts - 1), else_=0),
    )  # fmt: skip


def fail_pending(session: Session, ids: list[int], error: str, *, run_id: int | None = None) -> int:
    """Mark the given jobs that are still pending failed with `error`, without an attempt (their worker
    could not start: a model that does not load, say); returns how many. `run_id` records whose work
    they were."""
    now = _now()
    values: dict[str, Any] = {"status": JobStatus.failed, "last_error": _clean_error(error),
                              "finished_at": now, "seconds": None}  # fmt: skip
    if run_id is not None:
        values["last_run_id"] = run_id
    changed = 0
    for k in range(0, len(ids), _PLAN_CHUNK):
        chunk = ids[k : k + _PLAN_CHUNK]
        stmt = update(Job).where(Job.id.in_(chunk), Job.status == JobStatus.pending).values(**values)
        done = session.execute(stmt, execution_options={"synchronize_session": False})
        changed += done.rowcount  # type: ignore[attr-defined]
    return changed


def requeue_stale(session: Session, older_than: timedelta, *, run_id: int | None = None) -> int:
    """Put running jobs claimed more than `older_than` ago (their worker died) back to pending."""
    cutoff = _now() - older_than
    stmt = update(Job).where(Job.status == JobStatus.running, Job.claimed_at < cutoff)
    if run_id is not None:
        stmt = stmt.where(Job.id.in_(select(RunJob.job_id).where(RunJob.run_id == run_id)))
    stmt = stmt.values(
        status=JobStatus.pending, worker_id=None, claimed_at=None,
        last_error=f"claim expired after {older_than}",
    )  # fmt: skip
    return session.execute(stmt, execution_options={"synchronize_session": False}).rowcount  # type: ignore[attr-defined]
