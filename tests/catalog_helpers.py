"""Catalog operations only tests use: each is one transaction of a `Catalog` around a session function of
`storage.catalog.lifecycle` or `storage.catalog.queries`, as the methods of `Catalog` are."""

from __future__ import annotations

from datetime import timedelta

from storage.catalog import Catalog, JobRecord, RejectionRecord, lifecycle, queries


def claim(catalog: Catalog, limit: int = 1, *, run_id: int | None = None, worker: str) -> list[JobRecord]:
    """Atomically move up to `limit` pending jobs (oldest first) to running for `worker`."""
    with catalog.transaction(write=True) as session:
        return lifecycle.claim(session, limit, run_id=run_id, worker=worker)


def mark_started(catalog: Catalog, job_id: int, *, worker: str | None = None) -> None:
    """Note that generation of a claimed job has begun (sets started_at)."""
    with catalog.transaction(write=True) as session:
        lifecycle.mark_started(session, job_id, worker=worker)


def release(catalog: Catalog, job_id: int) -> None:
    """Give a claimed job back (pending) without counting the attempt."""
    with catalog.transaction(write=True) as session:
        lifecycle.release(session, job_id)


def requeue_stale(catalog: Catalog, older_than: timedelta, *, run_id: int | None = None) -> int:
    """Put running jobs claimed more than `older_than` ago (their worker died) back to pending."""
    with catalog.transaction(write=True) as session:
        return lifecycle.requeue_stale(session, older_than, run_id=run_id)


def rejections(catalog: Catalog, run_id: int) -> list[RejectionRecord]:
    """The manifest rows a run left out, in manifest order."""
    with catalog.transaction() as session:
        return queries.rejections(session, run_id)
