"""`Catalog`: the catalog's transactional API, a thin class over the session functions of `planning`,
`lifecycle` and `queries`. Each method checks the schema once (`_require_schema`), opens one short
transaction (`transaction`) and calls one of those functions in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import storage.catalog.engine as db
import storage.catalog.lifecycle as lifecycle
import storage.catalog.planning as planning
import storage.catalog.queries as queries
import storage.catalog.snapshots as snapshots
from storage.catalog.records import (
    MAX_ID,
    CatalogError,
    JobGroupRow,
    JobRecord,
    JobSpec,
    JobStatus,
    OutputRecord,
    PlanOutcome,
    PlanSummary,
    RunRecord,
    RunStatus,
    SnapshotRecord,
)
from storage.catalog.tables import _run
from storage.urls import redact


class Catalog:
    """Runs, jobs and outputs in a SQL database; every method is one short transaction.

    The constructor connects once (cheaply, with a short timeout) and raises `CatalogError` if it cannot.
    The first other call checks that the schema is at the newest revision (`upgrade()` brings it there).
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self._engine = db.make_engine(url, echo=echo)
        self._checked = False
        db.connect(self._engine, url)

    def __repr__(self) -> str:
        return f"Catalog({redact(self.url)!r})"

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections (the Catalog can still be used; it reconnects)."""
        self._engine.dispose()

    @property
    def engine(self) -> Engine:
        return self._engine

    # --- schema and transactions

    def check_schema(self) -> None:
        """CatalogError unless the database is at the schema revision this code needs (once per Catalog)."""
        db.check_schema(self._engine, self.url)
        self._checked = True

    def _require_schema(self) -> None:
        """The schema check every transaction needs: done by the first one, or by `check_schema`/`upgrade`."""
        if not self._checked:
            self.check_schema()

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction on a schema checked to be current, for the session functions of
        `storage.catalog.planning`, `.lifecycle` and `.queries`; `write` when it may write."""
        self._require_schema()
        with db.transaction(self._engine, self.url, write=write) as session:
            yield session

    def upgrade(self, revision: str = "head") -> str:
        """Migrate the schema (Alembic, packaged migrations) to `revision`; returns the revision reached."""
        reached = db.upgrade(self._engine, self.url, revision)
        self._checked = db.is_head(reached)
        return reached or "base"

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None for an empty database)."""
        return db.current_revision(self._engine, self.url)

    # --- runs and models

    def create_run(
        self, name: str, manifest_uri: str, manifest_sha256: str, settings: Mapping[str, Any],
        flow_run_id: str | None = None, owner: str | None = None,
    ) -> RunRecord:  # fmt: skip
        """Record a new run (status pending). Run names are unique. `owner` names the process that runs
        it (`<host>:<pid>:<start>`), so that a later look can tell when that process died."""
        try:
            with self.transaction(write=True) as session:
                return planning.create_run(
                    session, name, manifest_uri, manifest_sha256, settings, flow_run_id=flow_run_id,
                    owner=owner,
                )  # fmt: skip
        except exc.IntegrityError:
            raise CatalogError(f"a run named {name!r} exists already") from None

    def start_run(self, run_id: int, *, flow_run_id: str | None = None) -> None:
        """Mark a run running (sets started_at once; records the Prefect flow-run id if given)."""
        with self.transaction(write=True) as session:
            lifecycle.start_run(session, run_id, flow_run_id=flow_run_id)

    def finish_run(self, run_id: int, status: RunStatus | str) -> None:
        """Set a run's final status and finished_at."""
        status = RunStatus(status)
        with self.transaction(write=True) as session:
            lifecycle.finish_run(session, run_id, status)

    def unfinished_runs(self) -> list[RunRecord]:
        """Runs still `pending` or `running`, oldest first (some may belong to processes that died)."""
        with self.transaction() as session:
            return queries.unfinished_runs(session)

    def mark_crashed(self, run_id: int) -> bool:
        """Mark a run whose process died `crashed`, if it is still pending or running; True if it was."""
        with self.transaction(write=True) as session:
            return lifecycle.mark_crashed(session, run_id)

    def register_model(
        self, model_id: str, fingerprint: str, source: str, details: Mapping[str, Any]
    ) -> None:
        """Remember a checkpoint fingerprint; registering a (model id, fingerprint) twice is a no-op."""
        with self.transaction(write=True) as session:
            planning.register_model(session, model_id, fingerprint, source, details)

    # --- planning

    def plan_jobs(
        self, run_id: int, specs: Iterable[JobSpec], verify: Callable[[OutputRecord], bool] | None = None
    ) -> PlanSummary:
        """Link one job per distinct spec to the run, creating the jobs that do not exist yet.

        A succeeded job whose output `verify` accepts (or any succeeded job when `verify` is None) counts as
        already done and the run skips it. A succeeded job whose output fails `verify` has its output row
        deleted and goes back to pending, as do failed jobs (attempts are kept). Pending and running jobs are
        left alone. `verify` runs outside any transaction; if it raises, planning stops and nothing is
        deleted for that chunk.
        """
        with self.transaction() as session:
            _run(session, run_id)
        counts = dict.fromkeys(PlanOutcome, 0)
        for chunk in planning.spec_chunks(specs):
            with self.transaction(write=True) as session:
                to_verify = planning.link_chunk(
                    session, run_id, chunk, verify=verify is not None, counts=counts
                )
            if not to_verify:
                continue
            verdicts = [(job_id, bool(verify(output))) for job_id, output in to_verify]  # type: ignore[misc]
            with self.transaction(write=True) as session:
                planning.link_verified(session, run_id, verdicts, counts)
        return planning.summary(counts)

    def find_jobs(self, keys: Iterable[str]) -> dict[str, tuple[JobRecord, OutputRecord | None]]:
        """Jobs by key (those that exist), each with its output if it has one."""
        with self.transaction() as session:
            return planning.find_jobs(session, keys)

    # --- the job life cycle

    def claim_job(
        self, job_id: int, *, worker: str, start: bool = False, run_id: int | None = None
    ) -> JobRecord | None:
        """Atomically move one given job from pending to running for `worker`; None if it is not pending
        (another worker holds it, or it is done already). With `start`, also mark it started (as
        `mark_started` would), in the same transaction. `run_id` is the run the worker works for: the job
        then counts as that run's work (`last_run_id`)."""
        with self.transaction(write=True) as session:
            return lifecycle.claim_job(session, job_id, worker=worker, start=start, run_id=run_id)

    def requeue_abandoned(self, job_ids: Iterable[int], reason: str, *, worker: str | None = None) -> int:
        """Put running jobs whose worker is known to be gone back to pending, noting `reason`. With
        `worker`, only jobs still held by that worker (not one that claimed them since)."""
        ids = list(job_ids)
        if not ids:
            return 0
        with self.transaction(write=True) as session:
            return lifecycle.requeue_abandoned(session, ids, reason, worker=worker)

    def mark_succeeded(
        self, job_id: int, output: OutputRecord, *, seconds: float | None = None, worker: str | None = None
    ) -> OutputRecord:
        """Record the job's output and mark it succeeded, in one transaction.

        Call only after the object is committed to storage. `seconds` defaults to the time since
        `mark_started` (or the claim). With `worker`, only that worker's claim may succeed. If anything
        fails, neither the output row nor the status is written.
        """
        if output.job_id not in (None, job_id):
            raise CatalogError(f"output for job {output.job_id} passed to mark_succeeded({job_id})")
        try:
            with self.transaction(write=True) as session:
                return lifecycle.mark_succeeded(session, job_id, output, seconds=seconds, worker=worker)
        except exc.StatementError as error:  # constraint or type errors; connection errors are already mapped
            reason = redact(str(getattr(error, "orig", None) or error).splitlines()[0])
            raise CatalogError(f"cannot record the output of job {job_id}: {reason}") from None

    def mark_failed(self, job_id: int, error: str, *, retry: bool, worker: str | None = None) -> None:
        """Record a failed attempt: pending again when `retry`, else failed. The text is redacted and cut."""
        with self.transaction(write=True) as session:
            lifecycle.mark_failed(session, job_id, error, retry=retry, worker=worker)

    def fail_pending(self, job_ids: Iterable[int], error: str, *, run_id: int | None = None) -> int:
        """Mark the given jobs that are still pending failed with `error`, without an attempt (their worker
        could not start: a model that does not load, say); returns how many. `run_id` records whose work
        they were."""
        ids = list(job_ids)
        if not ids:
            return 0
        with self.transaction(write=True) as session:
            return lifecycle.fail_pending(session, ids, error, run_id=run_id)

    # --- rejected manifest rows

    def record_rejections(self, run_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """Record manifest rows the run left out; each mapping has `line`, `reason` and optionally
        `item_id`, `field`, `raw`. Texts are redacted and cut. Returns how many were recorded."""
        records = planning.rejection_rows(run_id, rows)
        if not records:
            return 0
        with self.transaction(write=True) as session:
            return planning.add_rejections(session, run_id, records)

    # --- queries

    def get_run(self, id_or_name: int | str) -> RunRecord | None:
        """A run by id or by name (a digit string that names no run is taken as an id); None if absent."""
        with self.transaction() as session:
            return queries.get_run(session, id_or_name)

    def runs(self, limit: int = 50) -> list[RunRecord]:
        """The newest runs first (`limit` of them, at least 1)."""
        if not 1 <= limit <= MAX_ID:
            raise ValueError(f"limit {limit}: expected a number from 1 to {MAX_ID}")
        with self.transaction() as session:
            return queries.runs(session, limit)

    def get_jobs(self, job_ids: Iterable[int]) -> list[JobRecord]:
        """The jobs with these ids that exist, by id."""
        ids = list(job_ids)
        with self.transaction() as session:
            return queries.get_jobs(session, ids)

    def get_job(self, job_id: int) -> JobRecord | None:
        """A job by id; None if absent."""
        if not 0 < job_id <= MAX_ID:
            return None
        with self.transaction() as session:
            return queries.get_job(session, job_id)

    def output_of(self, job_id: int) -> OutputRecord | None:
        """The output of a job; None if it has none (yet)."""
        with self.transaction() as session:
            return queries.output_of(session, job_id)

    def jobs(
        self, run_id: int | None = None, status: JobStatus | str | None = None, limit: int | None = None
    ) -> list[JobRecord]:
        """Jobs by id; with `run_id`, every job the run asked for, with that run's status and outcome."""
        with self.transaction() as session:
            return queries.jobs(session, run_id, status, limit)

    def job_groups(self, run_id: int, status: JobStatus | str = JobStatus.pending) -> list[JobGroupRow]:
        """(job id, model id, size, frame_num) of a run's jobs in `status` (the run's view), by job id:
        what sharding needs, without loading every job's parameters."""
        status = JobStatus(status)
        with self.transaction() as session:
            return queries.job_groups(session, run_id, status)

    def outputs(
        self, run_id: int | None = None, limit: int | None = None, where: Iterable[Any] = ()
    ) -> list[OutputRecord]:
        """Outputs by id; with `run_id`, the outputs of every job the run asked for (skipped ones too);
        `where`: conditions they all meet (`storage.catalog.filters.parse_filter`)."""
        with self.transaction() as session:
            return queries.outputs(session, run_id, limit, list(where))

    # ------------------------------------------------------------------------------------ snapshots

    def record_snapshot(
        self, name: str, uri: str, fmt: str, selection: Mapping[str, Any],
        samples: Sequence[tuple[str, int, str]], nbytes: int, flow_run_id: str | None = None,
        version: int | None = None, content: str | None = None,
    ) -> tuple[SnapshotRecord, bool]:  # fmt: skip
        """Record an export of `name` as its next version, unless the latest one holds the same content;
        returns (the snapshot, whether it is new). `samples`: (key, job id, video sha256)."""
        with self.transaction(write=True) as session:
            return snapshots.record_snapshot(session, name, uri, fmt, selection, samples, nbytes,
                                             flow_run_id=flow_run_id, version=version,
                                             content=content)  # fmt: skip

    def next_snapshot_version(self, name: str) -> int:
        with self.transaction() as session:
            return snapshots.next_version(session, name)

    def latest_snapshot(self, name: str) -> SnapshotRecord | None:
        with self.transaction() as session:
            return snapshots.latest_snapshot(session, name)

    def snapshots(self, name: str | None = None) -> list[SnapshotRecord]:
        """Every snapshot by name and version (of `name` only, when given)."""
        with self.transaction() as session:
            return snapshots.snapshots(session, name)

    def snapshot_samples(self, snapshot_id: int) -> list[dict[str, Any]]:
        """A snapshot's samples: key, job id, video sha256."""
        with self.transaction() as session:
            return snapshots.snapshot_samples(session, snapshot_id)

    def progress(self, run_id: int) -> tuple[int, int]:
        """(jobs finished, jobs) of a run as it sees them now: succeeded, failed and skipped are finished."""
        with self.transaction() as session:
            return queries.progress(session, run_id)

    def model_stats(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Per model: videos made (by the run, with `run_id`), their seconds, all and on a GPU."""
        with self.transaction() as session:
            return queries.model_stats(session, run_id)

    def stats(self, run_id: int | None = None) -> dict[str, Any]:
        """Job counts by status (a run's view with `run_id`), output count and bytes, generation seconds."""
        with self.transaction() as session:
            return queries.stats(session, run_id)
