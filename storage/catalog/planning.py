"""Idempotent planning: runs recorded, checkpoints registered, manifest rows rejected, and one job per
distinct spec linked to a run (created when new, skipped when done, requeued when failed or unverified).

Every function takes an open `Session` and runs inside the caller's transaction; `plan_jobs` of `Catalog`
spreads one plan over several transactions (`link_chunk`, `link_verified`) with `verify` run between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.catalog.records import (
    _PLAN_CHUNK,
    MAX_ERROR_CHARS,
    JobRecord,
    JobSpec,
    JobStatus,
    OutputRecord,
    PlanOutcome,
    PlanSummary,
    RunRecord,
    RunStatus,
    _clean_error,
    _job_params,
    _json_ready,
    _now,
    _storable,
    job_key,
)
from storage.catalog.tables import Base, Job, Model, Output, Rejection, Run, RunJob, _record, _run
from storage.urls import redact

# One chunk of a plan: job key -> (spec, the parameters stored with the job).
Chunk = dict[str, tuple[JobSpec, dict[str, Any]]]


def _insert(session: Session, model: type[Base]) -> Any:
    if session.get_bind().dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert(model)


# ------------------------------------------------------------------------------------ runs and models


def create_run(
    session: Session, name: str, manifest_uri: str, manifest_sha256: str, settings: Mapping[str, Any],
    flow_run_id: str | None = None, owner: str | None = None,
) -> RunRecord:  # fmt: skip
    """Record a new run (status pending); the caller's commit fails (IntegrityError) on a name in use."""
    run = Run(
        name=_storable(name), manifest_uri=_storable(redact(manifest_uri)),
        manifest_sha256=manifest_sha256, settings=_json_ready(settings), status=RunStatus.pending,
        flow_run_id=flow_run_id, created_at=_now(), owner=owner,
    )  # fmt: skip
    session.add(run)
    session.flush()
    return _record(RunRecord, run)


def register_model(
    session: Session, model_id: str, fingerprint: str, source: str, details: Mapping[str, Any]
) -> None:
    """Remember a checkpoint fingerprint; registering a (model id, fingerprint) twice is a no-op."""
    row = {
        "model_id": model_id, "fingerprint": fingerprint, "source": redact(source),
        "details": _json_ready(details), "registered_at": _now(),
    }  # fmt: skip
    stmt = (
        _insert(session, Model).values(row).on_conflict_do_nothing(index_elements=["model_id", "fingerprint"])
    )
    session.execute(stmt)


# ------------------------------------------------------------------------------ rejected manifest rows


def rejection_rows(run_id: int, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of `rejections` for manifest rows the run left out; each mapping has `line`, `reason` and
    optionally `item_id`, `field`, `raw`. Texts are redacted and cut. Touches no database."""
    now = _now()

    def cut(value: Any, limit: int) -> str | None:
        return None if value is None else _storable(redact(str(value)))[:limit]

    return [
        {"run_id": run_id, "line": int(row["line"]), "item_id": cut(row.get("item_id"), 200),
         "field": cut(row.get("field"), 100), "reason": _clean_error(str(row["reason"])),
         "raw": cut(row.get("raw"), MAX_ERROR_CHARS), "created_at": now}
        for row in rows
    ]  # fmt: skip


def add_rejections(session: Session, run_id: int, records: list[dict[str, Any]]) -> int:
    """Insert rows made by `rejection_rows` (CatalogError if the run does not exist); returns how many."""
    _run(session, run_id)
    session.execute(sa.insert(Rejection), records)
    return len(records)


# ------------------------------------------------------------------------------------------- planning


def spec_chunks(specs: Iterable[JobSpec]) -> Iterator[Chunk]:
    """The distinct specs (by job key) in chunks of at most `_PLAN_CHUNK`, each with the parameters its job
    stores. Lazy: a chunk is planned before the next specs are read."""
    seen: set[str] = set()
    chunk: Chunk = {}
    for raw in specs:
        spec = JobSpec(*raw)
        params = _job_params(spec)
        key = job_key(spec.model_fingerprint, params, spec.seed, spec.storage_root)
        if key in seen:
            continue
        seen.add(key)
        chunk[key] = (spec, params)
        if len(chunk) >= _PLAN_CHUNK:
            yield chunk
            chunk = {}
    if chunk:
        yield chunk


def link_chunk(
    session: Session, run_id: int, chunk: Mapping[str, tuple[JobSpec, dict[str, Any]]], *, verify: bool,
    counts: dict[PlanOutcome, int],
) -> list[tuple[int, OutputRecord]]:  # fmt: skip
    """Create the chunk's new jobs and link every job of the chunk to the run, adding to `counts`.

    Succeeded jobs with an output are done, unless `verify`: then they are not linked but returned with
    their outputs, for `link_verified` to link once the caller has verified them (outside a transaction).
    """
    now = _now()
    to_verify: list[tuple[int, OutputRecord]] = []
    rows = [
        {"key": key, "first_run_id": run_id, "item_id": spec.item_id, "seed": int(spec.seed),
         "model_id": spec.model_id, "model_fingerprint": spec.model_fingerprint, "params": params,
         "status": JobStatus.pending, "attempts": 0, "created_at": now,
         "storage_root": spec.storage_root}
        for key, (spec, params) in chunk.items()
    ]  # fmt: skip
    insert = _insert(session, Job).on_conflict_do_nothing(index_elements=["key"])
    created = set(session.scalars(insert.returning(Job.key), rows).all())
    found = session.execute(
        select(Job.id, Job.key, Job.status, Output)
        .outerjoin(Output, Output.job_id == Job.id)
        .where(Job.key.in_(list(chunk)))
    ).all()
    links: dict[int, PlanOutcome] = {}
    requeue: list[int] = []
    for job_id, key, status, output in found:
        if key in created:
            links[job_id] = PlanOutcome.created
        elif status in (JobStatus.pending, JobStatus.running):
            links[job_id] = PlanOutcome.already_planned
        elif status == JobStatus.succeeded and output is not None:
            if not verify:
                links[job_id] = PlanOutcome.already_done
            else:
                to_verify.append((job_id, _record(OutputRecord, output)))
        else:  # failed, skipped, or succeeded without an output row
            requeue.append(job_id)
    requeued = _requeue(session, requeue, from_status=None)
    for job_id in requeue:  # one a concurrent planner requeued first is planned all the same
        links[job_id] = PlanOutcome.requeued if job_id in requeued else PlanOutcome.already_planned
    _link(session, run_id, links, counts)
    return to_verify


def link_verified(
    session: Session, run_id: int, verdicts: list[tuple[int, bool]], counts: dict[PlanOutcome, int]
) -> None:
    """Link jobs whose outputs were verified: done when `verify` accepted the output, else requeued (the
    output row deleted), adding to `counts`."""
    links = {job_id: PlanOutcome.already_done for job_id, ok in verdicts if ok}
    rejected = [job_id for job_id, ok in verdicts if not ok]
    requeued = _requeue(session, rejected, from_status=JobStatus.succeeded)
    links.update(dict.fromkeys(requeued, PlanOutcome.requeued))
    links.update({job_id: PlanOutcome.already_planned for job_id in rejected if job_id not in requeued})
    _link(session, run_id, links, counts)


def summary(counts: Mapping[PlanOutcome, int]) -> PlanSummary:
    """The `PlanSummary` of the outcomes counted."""
    return PlanSummary(
        created=counts[PlanOutcome.created], already_done=counts[PlanOutcome.already_done],
        requeued=counts[PlanOutcome.requeued], total=sum(counts.values()),
    )  # fmt: skip


def _requeue(session: Session, job_ids: list[int], from_status: JobStatus | None) -> set[int]:
    """Put jobs back to pending (deleting their output rows); returns the ids actually changed."""
    if not job_ids:
        return set()
    allowed = [from_status] if from_status else [JobStatus.failed, JobStatus.skipped, JobStatus.succeeded]
    changed = set(
        session.scalars(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status.in_(allowed))
            .values(status=JobStatus.pending, claimed_at=None, worker_id=None)
            .returning(Job.id),
            execution_options={"synchronize_session": False},
        ).all()
    )
    if changed:
        session.execute(sa.delete(Output).where(Output.job_id.in_(changed)))
    return changed


def _link(session: Session, run_id: int, links: Mapping[int, PlanOutcome], counts: dict) -> None:
    if not links:
        return
    now = _now()
    rows = [{"run_id": run_id, "job_id": j, "outcome": o, "planned_at": now} for j, o in links.items()]
    insert = _insert(session, RunJob)
    # A run planned again keeps its first outcome per job, unless this time the job was requeued for it.
    insert = insert.on_conflict_do_update(
        index_elements=["run_id", "job_id"],
        set_={"outcome": insert.excluded.outcome, "planned_at": insert.excluded.planned_at},
        where=insert.excluded.outcome == PlanOutcome.requeued.value,
    )
    session.execute(insert, rows)
    for outcome in links.values():
        counts[outcome] += 1


def find_jobs(session: Session, keys: Iterable[str]) -> dict[str, tuple[JobRecord, OutputRecord | None]]:
    """Jobs by key (those that exist), each with its output if it has one."""
    wanted = list(dict.fromkeys(keys))
    found: dict[str, tuple[JobRecord, OutputRecord | None]] = {}
    for k in range(0, len(wanted), _PLAN_CHUNK):
        rows = session.execute(
            select(Job, Output)
            .outerjoin(Output, Output.job_id == Job.id)
            .where(Job.key.in_(wanted[k : k + _PLAN_CHUNK]))
        ).all()
        for job, out in rows:
            found[job.key] = (_record(JobRecord, job), out and _record(OutputRecord, out))
    return found
