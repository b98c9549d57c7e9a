"""The catalog's SQL tables (SQLAlchemy declarative models): everything Alembic compares the migrations with.

Tables
------
runs      one batch: its manifest (URI and sha256), settings, status, timestamps, Prefect flow-run id.
jobs      one video to make: a (request, seed) pair for one model checkpoint. `key` is UNIQUE: the sha256 of
          canonical JSON of the checkpoint fingerprint, the stored parameters and the seed (`job_key`), so
          a video is never made twice. `first_run_id` names the run that planned the job first.
run_jobs  every job each run asked for and what planning did about it for that run (`outcome`: created,
          already_done, requeued, already_planned).
outputs   at most one per job: the committed video object (URI, sha256, bytes, size, frames, fps, ...).
models    checkpoint fingerprints seen (model id, fingerprint, where it came from, details).
rejections manifest rows a run left out (`--skip-invalid`): line, item id, field, reason, the row as text.

Why a link table: jobs must be unique across runs, yet `jobs(run_id=R)` has to list every job run R asked
for, including the ones it skipped because an earlier run had made them. A `run_id` column on jobs can hold
only one run; the `run_jobs` link table holds them all, and `first_run_id` keeps ownership simple to read.
A run sees a job it found already done with status `skipped`; in the jobs table itself that job stays
`succeeded`. A stored `skipped` (set by no function of the catalog) is treated like `failed` when planned
again.

Times are timezone-aware UTC on both databases (`UTCDateTime`). Also here: rows to records (`_record`) and
the run lookup every part of the catalog shares (`_run`).
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from storage.catalog.records import CatalogError, JobStatus, PlanOutcome, RunStatus


class UTCDateTime(sa.TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that always hands back aware UTC datetimes (SQLite keeps naive UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the catalog stores timezone-aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _string_enum(enum_cls: type[enum.Enum], name: str) -> sa.Enum:
    """A Python Enum stored as VARCHAR(16) plus a CHECK constraint (named by the convention)."""
    return sa.Enum(
        enum_cls, name=name, native_enum=False, create_constraint=True, length=16,
        values_callable=lambda cls: [m.value for m in cls], validate_strings=True,
    )  # fmt: skip


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON()}  # noqa: RUF012


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (sa.UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    manifest_uri: Mapped[str] = mapped_column(sa.Text)
    manifest_sha256: Mapped[str] = mapped_column(sa.String(64))
    settings: Mapped[dict[str, Any]]
    status: Mapped[RunStatus] = mapped_column(_string_enum(RunStatus, "run_status"))
    flow_run_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    owner: Mapped[str | None] = mapped_column(sa.String(200))


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (sa.UniqueConstraint("model_id", "fingerprint"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[str] = mapped_column(sa.String(100))
    fingerprint: Mapped[str] = mapped_column(sa.String(128))
    source: Mapped[str] = mapped_column(sa.Text)
    details: Mapped[dict[str, Any]]
    registered_at: Mapped[datetime]


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (sa.UniqueConstraint("key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(64))
    first_run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id"), index=True)
    item_id: Mapped[str] = mapped_column(sa.String(200), index=True)
    seed: Mapped[int] = mapped_column(sa.BigInteger)
    model_id: Mapped[str] = mapped_column(sa.String(100))
    model_fingerprint: Mapped[str] = mapped_column(sa.String(128))
    params: Mapped[dict[str, Any]]
    status: Mapped[JobStatus] = mapped_column(_string_enum(JobStatus, "job_status"), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    worker_id: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime]
    claimed_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    seconds: Mapped[float | None]
    storage_root: Mapped[str | None] = mapped_column(sa.Text)
    last_run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("runs.id", ondelete="SET NULL"), index=True)


class RunJob(Base):
    __tablename__ = "run_jobs"

    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    job_id: Mapped[int] = mapped_column(
        sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    outcome: Mapped[PlanOutcome] = mapped_column(_string_enum(PlanOutcome, "plan_outcome"))
    planned_at: Mapped[datetime]


class Output(Base):
    __tablename__ = "outputs"
    __table_args__ = (sa.UniqueConstraint("job_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    uri: Mapped[str] = mapped_column(sa.Text)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    width: Mapped[int]
    height: Mapped[int]
    frames: Mapped[int]
    fps: Mapped[float]
    codec: Mapped[str] = mapped_column(sa.String(32))
    thumbnail_uri: Mapped[str | None] = mapped_column(sa.Text)
    sidecar_uri: Mapped[str | None] = mapped_column(sa.Text)
    device: Mapped[str | None] = mapped_column(sa.String(64))
    peak_memory_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    created_at: Mapped[datetime]
    poster_uri: Mapped[str | None] = mapped_column(sa.Text)
    dit_forwards: Mapped[int | None]  # sampling's DiT forwards, when a step cache counted them
    dit_forwards_skipped: Mapped[int | None]  # of which the step cache skipped
    # Quality signals measured while the frames streamed (storage/signals.py); NULL: not measured.
    motion: Mapped[float | None]
    black_frames: Mapped[int | None]
    flat_frames: Mapped[int | None]
    frozen_frames: Mapped[int | None]
    black: Mapped[bool | None]
    flat: Mapped[bool | None]
    frozen: Mapped[bool | None]
    phash: Mapped[str | None] = mapped_column(sa.String(256))
    clip_score: Mapped[float | None]  # text-video similarity of some frames and the prompt (CLIP), -1 to 1
    # The final latents kept beside the video (safetensors), for runs that keep them.
    latents_uri: Mapped[str | None] = mapped_column(sa.Text)
    latents_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    latents_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)


class Snapshot(Base):
    """A versioned dataset export: `name` v`version`, written to `uri` from a saved selection."""

    __tablename__ = "snapshots"
    __table_args__ = (sa.UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    version: Mapped[int]
    uri: Mapped[str] = mapped_column(sa.Text)
    format: Mapped[str] = mapped_column(sa.String(32))
    selection: Mapped[dict[str, Any]]
    content_sha256: Mapped[str] = mapped_column(sa.String(64))
    samples: Mapped[int]
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    flow_run_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime]


class SnapshotSample(Base):
    """One sample of a snapshot: its key in the export, the job it came from and the video's sha256."""

    __tablename__ = "snapshot_samples"

    snapshot_id: Mapped[int] = mapped_column(
        sa.ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(sa.String(400), primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(sa.String(64))


class Rejection(Base):
    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    line: Mapped[int]
    item_id: Mapped[str | None] = mapped_column(sa.String(200))
    field: Mapped[str | None] = mapped_column(sa.String(100))
    reason: Mapped[str] = mapped_column(sa.Text)
    raw: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime]


# ------------------------------------------------------------------------------------- rows and records


def _record(cls: type, row: Base, **extra: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)} - set(extra)
    return cls(**{name: getattr(row, name) for name in names if hasattr(row, name)}, **extra)


def _run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise CatalogError(f"no run with id {run_id}")
    return run
