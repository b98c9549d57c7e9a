"""The catalog: runs, jobs and outputs in SQL (SQLite or PostgreSQL) behind a small transactional API.

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
`succeeded`. A stored `skipped` (set by no method here) is treated like `failed` when planned again.

Transactions: every method is one short transaction and safe to call from many processes. `claim` picks
pending rows with `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite the file runs in WAL mode
with a busy timeout and every writing transaction starts with `BEGIN IMMEDIATE`, which serialises writers
up front instead of failing on a lock upgrade. `mark_succeeded` writes the output row and the job status in
one transaction, so a job is `succeeded` exactly when its output row exists.

Times are timezone-aware UTC on both databases. Database URLs only appear in messages through `redact`.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import event, exc, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from storage.urls import redact, redact_options

__all__ = [
    "Catalog", "CatalogError", "JobGroupRow", "JobRecord", "JobSpec", "JobStatus", "OutputRecord",
    "PlanOutcome", "PlanSummary", "RejectionRecord", "RunRecord", "RunStatus", "alembic_config", "job_key",
    "make_engine", "spec_key",
]  # fmt: skip

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SUPPORTED_SCHEMES = ("sqlite", "postgresql")
MAX_ERROR_CHARS = 4000
MAX_ID = 2**31 - 1  # ids are INTEGER columns: larger numbers name nothing
_PLAN_CHUNK = 500
_SQLITE_BUSY_MS = 60_000
_PG_CONNECT_TIMEOUT_S = 5


class CatalogError(RuntimeError):
    """A catalog problem a person can act on: bad URL, unreachable database, old schema, bad state."""


class JobStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"


class RunStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    crashed = "crashed"  # its process died without ending it (seen by a later run or `catalog runs`)


class PlanOutcome(enum.StrEnum):
    """What planning did with a job for one run (stored in `run_jobs.outcome`)."""

    created = "created"
    already_done = "already_done"
    requeued = "requeued"
    already_planned = "already_planned"


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------- models


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


# -------------------------------------------------------------------------------------------- records


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: datetimes as ISO 8601 strings, enums as their values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, enum.Enum):
                value = value.value
            out[f.name] = value
        return out


@dataclasses.dataclass(frozen=True)
class RunRecord(_Record):
    id: int
    name: str
    manifest_uri: str
    manifest_sha256: str
    settings: dict[str, Any]
    status: RunStatus
    flow_run_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    owner: str | None = None


@dataclasses.dataclass(frozen=True)
class JobRecord(_Record):
    """A job; listed for a run, `status` is that run's view (`skipped` if found done) and `outcome` is set."""

    id: int
    key: str
    first_run_id: int
    item_id: str
    seed: int
    model_id: str
    model_fingerprint: str
    params: dict[str, Any]
    status: JobStatus
    attempts: int
    last_error: str | None
    worker_id: str | None
    created_at: datetime
    claimed_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None
    storage_root: str | None = None
    last_run_id: int | None = None
    outcome: PlanOutcome | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputRecord(_Record):
    """A committed video object. Build one without `id`, `job_id`, `created_at` for `mark_succeeded`."""

    uri: str
    sha256: str
    bytes: int
    width: int
    height: int
    frames: int
    fps: float
    codec: str
    thumbnail_uri: str | None = None
    sidecar_uri: str | None = None
    poster_uri: str | None = None
    device: str | None = None
    peak_memory_bytes: int | None = None
    job_id: int | None = None
    id: int | None = None
    created_at: datetime | None = None


@dataclasses.dataclass(frozen=True)
class RejectionRecord(_Record):
    """A manifest row a run did not take: where it was (line or row), which field, and why."""

    id: int
    run_id: int
    line: int
    item_id: str | None
    field: str | None
    reason: str
    raw: str | None
    created_at: datetime


class JobSpec(NamedTuple):
    """One job to plan: `params` are the generation parameters (prompt, size, steps, ...); `storage_root`
    is where its output goes (absolute), part of its identity."""

    item_id: str
    seed: int
    model_id: str
    model_fingerprint: str
    params: Mapping[str, Any]
    storage_root: str | None = None


class JobGroupRow(NamedTuple):
    """What decides which shard a job goes to."""

    job_id: int
    model_id: str
    size: str | None
    frame_num: int | None


class PlanSummary(NamedTuple):
    """What `plan_jobs` did: new jobs, jobs already done (the run skips them), jobs put back to pending,
    and `total` distinct jobs linked to the run. The rest (`already_planned`) were pending or running."""

    created: int
    already_done: int
    requeued: int
    total: int

    @property
    def already_planned(self) -> int:
        return self.total - self.created - self.already_done - self.requeued


def _record(cls: type, row: Base, **extra: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)} - set(extra)
    return cls(**{name: getattr(row, name) for name in names if hasattr(row, name)}, **extra)


# ---------------------------------------------------------------------------------------------- keys


def _canonical(value: Any, where: str) -> Any:
    """JSON-ready copy with integral floats as ints (5.0 and 5 hash alike) and tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a finite number")
        return int(value) if value.is_integer() else value
    if isinstance(value, enum.Enum):
        return _canonical(value.value, where)
    if value is None or isinstance(value, str | int | bool):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not JSON (expected str, number, bool, list, dict)")


def job_key(
    model_fingerprint: str, params: Mapping[str, Any], seed: int, storage_root: str | None = None
) -> str:
    """sha256 hex of canonical JSON (sorted keys, no spaces) of the fingerprint, `params`, the seed and,
    when given, the storage root (a video under another root is another job)."""
    doc = {"model_fingerprint": model_fingerprint, "params": _canonical(params, "params"), "seed": int(seed)}
    if storage_root is not None:
        doc["storage_root"] = storage_root
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_key(spec: JobSpec) -> str:
    """The key `plan_jobs` gives the job of `spec`."""
    return job_key(spec.model_fingerprint, _job_params(spec), spec.seed, spec.storage_root)


def _job_params(spec: JobSpec) -> dict[str, Any]:
    """The parameters stored with a job and hashed into its key: `spec.params` plus item and model id."""
    params = _canonical(spec.params, "params")
    for name, value in (("item_id", spec.item_id), ("model_id", spec.model_id)):
        if params.setdefault(name, value) != value:
            raise CatalogError(
                f"job spec for item {spec.item_id!r}: params[{name!r}] disagrees with {value!r}"
            )
    return params


def _json_ready(value: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip of free-form settings (anything not JSON becomes its str()), credentials masked."""
    return json.loads(json.dumps(redact_options(value), default=str))


_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def _storable(text: str) -> str:
    """`text` with the characters no catalog column can hold (NUL; PostgreSQL refuses it, SQLite cuts
    strings at it in places; lone surrogates, which are not UTF-8) written out visibly as `\\x00`,
    `\\udc80`: the same on both databases."""
    return _UNSTORABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if m[0] == "\x00" else f"\\u{ord(m[0]):04x}", text)


def _clean_error(text: str) -> str:
    """Error text for the catalog: head and tail of long texts, cut at whitespace, then redacted.

    Cutting between whitespace-separated tokens never splits a URL, so no half a password escapes `redact`.
    """
    if len(text) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2
        head, tail = text[:half], text[-half:]
        head = head[: max(head.rfind(c) for c in " \t\n") + 1]
        first_space = re.search(r"\s", tail)
        tail = tail[first_space.start() :] if first_space else ""
        text = f"{head}\n... [{len(text) - len(head) - len(tail)} characters cut] ...\n{tail}"
    return _storable(redact(text))


def _made_by() -> sa.ColumnElement[int]:
    """The run whose worker last took the job (jobs from before revision 0003: the run that planned it)."""
    return sa.func.coalesce(Job.last_run_id, Job.first_run_id)


# --------------------------------------------------------------------------------------------- engine


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for a catalog URL, with the connection settings the catalog relies on (see module doc)."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        parsed = None
    backend = parsed.get_backend_name() if parsed is not None else None
    if parsed is None or backend not in SUPPORTED_SCHEMES:
        raise CatalogError(
            f"unsupported catalog URL {redact(url)!r}: supported schemes are sqlite (sqlite:///path/catalog.db)"
            " and postgresql (postgresql+psycopg://user@host:5432/db)"
        )
    driver = parsed.get_driver_name() if "+" in parsed.drivername else None
    kwargs: dict[str, Any] = {"echo": echo}
    if backend == "postgresql":
        if driver not in (None, "psycopg"):
            raise CatalogError(f"catalog URL {redact(url)!r}: use the psycopg driver (postgresql+psycopg://)")
        parsed = parsed.set(drivername="postgresql+psycopg")
        kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": _PG_CONNECT_TIMEOUT_S}
    else:
        if driver not in (None, "pysqlite"):
            raise CatalogError(f"catalog URL {redact(url)!r}: use the built-in sqlite3 driver (sqlite:///)")
        database = parsed.database or ""
        if database in ("", ":memory:"):
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            try:
                if not parsed.query.get("uri"):
                    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise CatalogError(
                    f"cannot create the directory for catalog {redact(url)}: {error}"
                ) from None
            kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_MS / 1000}
    engine = sa.create_engine(parsed, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    cursor = dbapi_conn.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    immediate = conn.get_execution_options().get("wanflow_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config(connection: sa.Connection | None = None) -> Any:
    """An Alembic `Config` for the packaged migrations; `connection` is handed to env.py if given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def _revisions() -> tuple[str, frozenset[str]]:
    """(head, every known revision) of the packaged migrations."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None, f"no migrations under {MIGRATIONS_DIR}"
    return head, frozenset(s.revision for s in script.walk_revisions())


# -------------------------------------------------------------------------------------------- catalog


class Catalog:
    """Runs, jobs and outputs in a SQL database; every method is one short transaction.

    The constructor connects once (cheaply, with a short timeout) and raises `CatalogError` if it cannot.
    The first other call checks that the schema is at the newest revision (`upgrade()` brings it there).
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self._engine = make_engine(url, echo=echo)
        self._sqlite = self._engine.dialect.name == "sqlite"
        self._checked = False
        with self._errors("connect to"), self._engine.connect():
            pass

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

    # --- plumbing

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (exc.OperationalError, exc.InterfaceError) as error:
            reason = str(getattr(error, "orig", None) or error).strip().splitlines()
            reason_text = redact(" ".join(line.strip() for line in reason))
            raise CatalogError(f"cannot {doing} catalog database {redact(self.url)}: {reason_text}") from None

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        if not self._checked:
            self.check_schema()
        with self._errors("use"), Session(self._engine, expire_on_commit=False) as session, session.begin():
            if write and self._sqlite:
                session.connection(execution_options={"wanflow_write": True})
            yield session

    def check_schema(self) -> None:
        """CatalogError unless the database is at the schema revision this code needs (once per Catalog)."""
        from alembic.runtime.migration import MigrationContext

        with self._errors("read"), self._engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        head, known = _revisions()
        where = f"catalog database {redact(self.url)}"
        if current is not None and current not in known:
            raise CatalogError(
                f"{where} is at schema revision {current}, which this wanflow does not know"
                " (written by a newer wanflow?): use that version, or a fresh database"
            )
        if current != head:
            state = "has no catalog tables" if current is None else f"is at schema revision {current}"
            raise CatalogError(
                f"{where} {state}; this wanflow needs {head}: run `wanflow catalog upgrade` first"
            )
        self._checked = True

    def upgrade(self, revision: str = "head") -> str:
        """Migrate the schema (Alembic, packaged migrations) to `revision`; returns the revision reached."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.util import CommandError

        with self._errors("upgrade"), self._engine.connect() as conn:
            if self._sqlite:
                conn = conn.execution_options(wanflow_write=True)
            with conn.begin():
                if not self._sqlite:  # one migrator at a time; the others then find the schema current
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7745104519)")
                try:
                    command.upgrade(alembic_config(conn), revision)
                except CommandError as error:  # e.g. a revision from a newer wanflow
                    raise CatalogError(f"cannot upgrade catalog {redact(self.url)}: {error}") from None
                reached = MigrationContext.configure(conn).get_current_revision()
        self._checked = reached == _revisions()[0]
        return reached or "base"

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self._errors("read"), self._engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def _run(self, session: Session, run_id: int) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise CatalogError(f"no run with id {run_id}")
        return run

    def _insert(self, model: type[Base]) -> Any:
        if self._sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(model)

    # --- runs and models

    def create_run(
        self, name: str, manifest_uri: str, manifest_sha256: str, settings: Mapping[str, Any],
        flow_run_id: str | None = None, owner: str | None = None,
    ) -> RunRecord:  # fmt: skip
        """Record a new run (status pending). Run names are unique. `owner` names the process that runs
        it (`<host>:<pid>:<start>`), so that a later look can tell when that process died."""
        run = Run(
            name=_storable(name), manifest_uri=_storable(redact(manifest_uri)),
            manifest_sha256=manifest_sha256, settings=_json_ready(settings), status=RunStatus.pending,
            flow_run_id=flow_run_id, created_at=_now(), owner=owner,
        )  # fmt: skip
        try:
            with self._session(write=True) as session:
                session.add(run)
                session.flush()
                return _record(RunRecord, run)
        except exc.IntegrityError:
            raise CatalogError(f"a run named {name!r} exists already") from None

    def start_run(self, run_id: int, *, flow_run_id: str | None = None) -> None:
        """Mark a run running (sets started_at once; records the Prefect flow-run id if given)."""
        with self._session(write=True) as session:
            run = self._run(session, run_id)
            run.status = RunStatus.running
            run.started_at = run.started_at or _now()
            run.flow_run_id = flow_run_id or run.flow_run_id

    def finish_run(self, run_id: int, status: RunStatus | str) -> None:
        """Set a run's final status and finished_at."""
        status = RunStatus(status)
        with self._session(write=True) as session:
            run = self._run(session, run_id)
            run.status, run.finished_at = status, _now()

    def unfinished_runs(self) -> list[RunRecord]:
        """Runs still `pending` or `running`, oldest first (some may belong to processes that died)."""
        with self._session() as session:
            rows = session.scalars(
                select(Run).where(Run.status.in_([RunStatus.pending, RunStatus.running])).order_by(Run.id)
            ).all()
            return [_record(RunRecord, run) for run in rows]

    def mark_crashed(self, run_id: int) -> bool:
        """Mark a run whose process died `crashed`, if it is still pending or running; True if it was."""
        with self._session(write=True) as session:
            done = session.execute(
                update(Run)
                .where(Run.id == run_id, Run.status.in_([RunStatus.pending, RunStatus.running]))
                .values(status=RunStatus.crashed, finished_at=_now()),
                execution_options={"synchronize_session": False},
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def register_model(
        self, model_id: str, fingerprint: str, source: str, details: Mapping[str, Any]
    ) -> None:
        """Remember a checkpoint fingerprint; registering a (model id, fingerprint) twice is a no-op."""
        row = {
            "model_id": model_id, "fingerprint": fingerprint, "source": redact(source),
            "details": _json_ready(details), "registered_at": _now(),
        }  # fmt: skip
        stmt = (
            self._insert(Model).values(row).on_conflict_do_nothing(index_elements=["model_id", "fingerprint"])
        )
        with self._session(write=True) as session:
            session.execute(stmt)

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
        with self._session() as session:
            self._run(session, run_id)
        counts = dict.fromkeys(PlanOutcome, 0)
        seen: set[str] = set()
        chunk: dict[str, tuple[JobSpec, dict[str, Any]]] = {}
        for raw in specs:
            spec = JobSpec(*raw)
            params = _job_params(spec)
            key = job_key(spec.model_fingerprint, params, spec.seed, spec.storage_root)
            if key in seen:
                continue
            seen.add(key)
            chunk[key] = (spec, params)
            if len(chunk) >= _PLAN_CHUNK:
                self._plan_chunk(run_id, chunk, verify, counts)
                chunk = {}
        if chunk:
            self._plan_chunk(run_id, chunk, verify, counts)
        return PlanSummary(
            created=counts[PlanOutcome.created], already_done=counts[PlanOutcome.already_done],
            requeued=counts[PlanOutcome.requeued], total=sum(counts.values()),
        )  # fmt: skip

    def _plan_chunk(
        self, run_id: int, chunk: Mapping[str, tuple[JobSpec, dict[str, Any]]],
        verify: Callable[[OutputRecord], bool] | None, counts: dict[PlanOutcome, int],
    ) -> None:  # fmt: skip
        now = _now()
        to_verify: list[tuple[int, OutputRecord]] = []
        with self._session(write=True) as session:
            rows = [
                {"key": key, "first_run_id": run_id, "item_id": spec.item_id, "seed": int(spec.seed),
                 "model_id": spec.model_id, "model_fingerprint": spec.model_fingerprint, "params": params,
                 "status": JobStatus.pending, "attempts": 0, "created_at": now,
                 "storage_root": spec.storage_root}
                for key, (spec, params) in chunk.items()
            ]  # fmt: skip
            insert = self._insert(Job).on_conflict_do_nothing(index_elements=["key"])
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
                    if verify is None:
                        links[job_id] = PlanOutcome.already_done
                    else:
                        to_verify.append((job_id, _record(OutputRecord, output)))
                else:  # failed, skipped, or succeeded without an output row
                    requeue.append(job_id)
            requeued = self._requeue(session, requeue, from_status=None)
            for job_id in requeue:  # one a concurrent planner requeued first is planned all the same
                links[job_id] = PlanOutcome.requeued if job_id in requeued else PlanOutcome.already_planned
            self._link(session, run_id, links, counts)
        if not to_verify:
            return
        verdicts = [(job_id, bool(verify(output))) for job_id, output in to_verify]  # type: ignore[misc]
        with self._session(write=True) as session:
            links = {job_id: PlanOutcome.already_done for job_id, ok in verdicts if ok}
            rejected = [job_id for job_id, ok in verdicts if not ok]
            requeued = self._requeue(session, rejected, from_status=JobStatus.succeeded)
            links.update(dict.fromkeys(requeued, PlanOutcome.requeued))
            links.update(
                {job_id: PlanOutcome.already_planned for job_id in rejected if job_id not in requeued}
            )
            self._link(session, run_id, links, counts)

    def _requeue(self, session: Session, job_ids: list[int], from_status: JobStatus | None) -> set[int]:
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

    def _link(self, session: Session, run_id: int, links: Mapping[int, PlanOutcome], counts: dict) -> None:
        if not links:
            return
        now = _now()
        rows = [{"run_id": run_id, "job_id": j, "outcome": o, "planned_at": now} for j, o in links.items()]
        insert = self._insert(RunJob)
        # A run planned again keeps its first outcome per job, unless this time the job was requeued for it.
        insert = insert.on_conflict_do_update(
            index_elements=["run_id", "job_id"],
            set_={"outcome": insert.excluded.outcome, "planned_at": insert.excluded.planned_at},
            where=insert.excluded.outcome == PlanOutcome.requeued.value,
        )
        session.execute(insert, rows)
        for outcome in links.values():
            counts[outcome] += 1

    # --- the job life cycle

    def claim(self, limit: int = 1, *, run_id: int | None = None, worker: str) -> list[JobRecord]:
        """Atomically move up to `limit` pending jobs (oldest first) to running for `worker`."""
        with self._session(write=True) as session:
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
        self, job_id: int, *, worker: str, start: bool = False, run_id: int | None = None
    ) -> JobRecord | None:
        """Atomically move one given job from pending to running for `worker`; None if it is not pending
        (another worker holds it, or it is done already). With `start`, also mark it started (as
        `mark_started` would), in the same transaction. `run_id` is the run the worker works for: the job
        then counts as that run's work (`last_run_id`)."""
        now = _now()
        with self._session(write=True) as session:
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

    def requeue_abandoned(self, job_ids: Iterable[int], reason: str, *, worker: str | None = None) -> int:
        """Put running jobs whose worker is known to be gone back to pending, noting `reason`. With
        `worker`, only jobs still held by that worker (not one that claimed them since)."""
        ids = list(job_ids)
        if not ids:
            return 0
        with self._session(write=True) as session:
            held = Job.worker_id == worker if worker is not None else sa.true()
            stmt = (
                update(Job)
                .where(Job.id.in_(ids), Job.status == JobStatus.running, held)
                .values(
                    status=JobStatus.pending, worker_id=None, claimed_at=None, last_error=_clean_error(reason)
                )
            )  # fmt: skip
            return session.execute(stmt, execution_options={"synchronize_session": False}).rowcount  # type: ignore[attr-defined]

    def _transition(self, session: Session, job_id: int, worker: str | None = None, **values: Any) -> None:
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

    def _elapsed(self, session: Session, job_id: int, now: datetime) -> float | None:
        row = session.execute(select(Job.started_at, Job.claimed_at).where(Job.id == job_id)).first()
        since = row and (row.started_at or row.claimed_at)
        return (now - since).total_seconds() if since else None

    def mark_started(self, job_id: int, *, worker: str | None = None) -> None:
        """Note that generation of a claimed job has begun (sets started_at)."""
        with self._session(write=True) as session:
            self._transition(session, job_id, worker, started_at=_now())

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
        now = _now()
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
        fields.update(id=None, job_id=job_id, created_at=now)
        try:
            with self._session(write=True) as session:
                elapsed = seconds if seconds is not None else self._elapsed(session, job_id, now)
                self._transition(
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
        except exc.StatementError as error:  # constraint or type errors; connection errors are already mapped
            reason = redact(str(getattr(error, "orig", None) or error).splitlines()[0])
            raise CatalogError(f"cannot record the output of job {job_id}: {reason}") from None

    def mark_failed(self, job_id: int, error: str, *, retry: bool, worker: str | None = None) -> None:
        """Record a failed attempt: pending again when `retry`, else failed. The text is redacted and cut."""
        now = _now()
        with self._session(write=True) as session:
            self._transition(
                session, job_id, worker, status=JobStatus.pending if retry else JobStatus.failed,
                last_error=_clean_error(error), finished_at=now, seconds=self._elapsed(session, job_id, now),
            )  # fmt: skip

    def release(self, job_id: int) -> None:
        """Give a claimed job back (pending) without counting the attempt."""
        with self._session(write=True) as session:
            self._transition(
                session, job_id, status=JobStatus.pending, claimed_at=None, started_at=None, worker_id=None,
                attempts=sa.case((Job.attempts > 0, Job.attempts - 1), else_=0),
            )  # fmt: skip

    def fail_pending(self, job_ids: Iterable[int], error: str, *, run_id: int | None = None) -> int:
        """Mark the given jobs that are still pending failed with `error`, without an attempt (their worker
        could not start: a model that does not load, say); returns how many. `run_id` records whose work
        they were."""
        ids = list(job_ids)
        if not ids:
            return 0
        now = _now()
        values: dict[str, Any] = {"status": JobStatus.failed, "last_error": _clean_error(error),
                                  "finished_at": now, "seconds": None}  # fmt: skip
        if run_id is not None:
            values["last_run_id"] = run_id
        changed = 0
        with self._session(write=True) as session:
            for k in range(0, len(ids), _PLAN_CHUNK):
                chunk = ids[k : k + _PLAN_CHUNK]
                stmt = update(Job).where(Job.id.in_(chunk), Job.status == JobStatus.pending).values(**values)
                done = session.execute(stmt, execution_options={"synchronize_session": False})
                changed += done.rowcount  # type: ignore[attr-defined]
        return changed

    def requeue_stale(self, older_than: timedelta, *, run_id: int | None = None) -> int:
        """Put running jobs claimed more than `older_than` ago (their worker died) back to pending."""
        cutoff = _now() - older_than
        with self._session(write=True) as session:
            stmt = update(Job).where(Job.status == JobStatus.running, Job.claimed_at < cutoff)
            if run_id is not None:
                stmt = stmt.where(Job.id.in_(select(RunJob.job_id).where(RunJob.run_id == run_id)))
            stmt = stmt.values(
                status=JobStatus.pending, worker_id=None, claimed_at=None,
                last_error=f"claim expired after {older_than}",
            )  # fmt: skip
            return session.execute(stmt, execution_options={"synchronize_session": False}).rowcount  # type: ignore[attr-defined]

    # --- rejected manifest rows

    def record_rejections(self, run_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """Record manifest rows the run left out; each mapping has `line`, `reason` and optionally
        `item_id`, `field`, `raw`. Texts are redacted and cut. Returns how many were recorded."""
        now = _now()

        def cut(value: Any, limit: int) -> str | None:
            return None if value is None else _storable(redact(str(value)))[:limit]

        records = [
            {"run_id": run_id, "line": int(row["line"]), "item_id": cut(row.get("item_id"), 200),
             "field": cut(row.get("field"), 100), "reason": _clean_error(str(row["reason"])),
             "raw": cut(row.get("raw"), MAX_ERROR_CHARS), "created_at": now}
            for row in rows
        ]  # fmt: skip
        if not records:
            return 0
        with self._session(write=True) as session:
            self._run(session, run_id)
            session.execute(sa.insert(Rejection), records)
        return len(records)

    def rejections(self, run_id: int) -> list[RejectionRecord]:
        """The manifest rows a run left out, in manifest order."""
        with self._session() as session:
            rows = session.scalars(
                select(Rejection).where(Rejection.run_id == run_id).order_by(Rejection.line, Rejection.id)
            ).all()
            return [_record(RejectionRecord, row) for row in rows]

    # --- queries

    def get_run(self, id_or_name: int | str) -> RunRecord | None:
        """A run by id or by name (a digit string that names no run is taken as an id); None if absent."""
        with self._session() as session:
            run = None
            if isinstance(id_or_name, str):
                run = session.scalars(select(Run).where(Run.name == _storable(id_or_name))).one_or_none()
            by_id = isinstance(id_or_name, int) or (id_or_name.isascii() and id_or_name.isdigit())
            if run is None and by_id:
                number = int(id_or_name)
                run = session.get(Run, number) if 0 < number <= MAX_ID else None
            return None if run is None else _record(RunRecord, run)

    def runs(self, limit: int = 50) -> list[RunRecord]:
        """The newest runs first (`limit` of them, at least 1)."""
        if not 1 <= limit <= MAX_ID:
            raise ValueError(f"limit {limit}: expected a number from 1 to {MAX_ID}")
        with self._session() as session:
            rows = session.scalars(select(Run).order_by(Run.id.desc()).limit(limit)).all()
            return [_record(RunRecord, run) for run in rows]

    def get_jobs(self, job_ids: Iterable[int]) -> list[JobRecord]:
        """The jobs with these ids that exist, by id."""
        ids = list(job_ids)
        with self._session() as session:
            rows = []
            for k in range(0, len(ids), _PLAN_CHUNK):
                rows += session.scalars(select(Job).where(Job.id.in_(ids[k : k + _PLAN_CHUNK]))).all()
            return sorted((_record(JobRecord, job) for job in rows), key=lambda j: j.id)

    def get_job(self, job_id: int) -> JobRecord | None:
        """A job by id; None if absent."""
        if not 0 < job_id <= MAX_ID:
            return None
        with self._session() as session:
            job = session.get(Job, job_id)
            return None if job is None else _record(JobRecord, job)

    def find_jobs(self, keys: Iterable[str]) -> dict[str, tuple[JobRecord, OutputRecord | None]]:
        """Jobs by key (those that exist), each with its output if it has one."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, tuple[JobRecord, OutputRecord | None]] = {}
        with self._session() as session:
            for k in range(0, len(wanted), _PLAN_CHUNK):
                rows = session.execute(
                    select(Job, Output)
                    .outerjoin(Output, Output.job_id == Job.id)
                    .where(Job.key.in_(wanted[k : k + _PLAN_CHUNK]))
                ).all()
                for job, out in rows:
                    found[job.key] = (_record(JobRecord, job), out and _record(OutputRecord, out))
        return found

    def output_of(self, job_id: int) -> OutputRecord | None:
        """The output of a job; None if it has none (yet)."""
        with self._session() as session:
            row = session.scalars(select(Output).where(Output.job_id == job_id)).one_or_none()
            return None if row is None else _record(OutputRecord, row)

    def _run_status(self) -> sa.ColumnElement[str]:
        """A job's status as a run sees it: `skipped` where the run found it already done, or where another
        run made it (two runs of one manifest at once share the work; each counts only its own)."""
        made_elsewhere = sa.and_(Job.status == JobStatus.succeeded, _made_by() != RunJob.run_id)
        return sa.case(
            (RunJob.outcome == PlanOutcome.already_done.value, JobStatus.skipped.value),
            (made_elsewhere, JobStatus.skipped.value),
            else_=sa.cast(Job.status, sa.String),
        )

    def jobs(
        self, run_id: int | None = None, status: JobStatus | str | None = None, limit: int | None = None
    ) -> list[JobRecord]:
        """Jobs by id; with `run_id`, every job the run asked for, with that run's status and outcome."""
        with self._session() as session:
            if run_id is None:
                query = select(Job)
                if status is not None:
                    query = query.where(Job.status == JobStatus(status))
                rows = session.scalars(query.order_by(Job.id).limit(limit)).all()
                return [_record(JobRecord, job) for job in rows]
            run_status = self._run_status().label("run_status")
            query = select(Job, RunJob.outcome, run_status).join(RunJob, RunJob.job_id == Job.id)
            query = query.where(RunJob.run_id == run_id)
            if status is not None:
                query = query.where(run_status == JobStatus(status).value)
            rows = session.execute(query.order_by(Job.id).limit(limit)).all()
            return [
                _record(JobRecord, job, status=JobStatus(view), outcome=PlanOutcome(outcome))
                for job, outcome, view in rows
            ]

    def job_groups(self, run_id: int, status: JobStatus | str = JobStatus.pending) -> list[JobGroupRow]:
        """(job id, model id, size, frame_num) of a run's jobs in `status` (the run's view), by job id:
        what sharding needs, without loading every job's parameters."""
        run_status = self._run_status()
        query = (
            select(Job.id, Job.model_id, Job.params["size"].as_string(), Job.params["frame_num"].as_integer())
            .join(RunJob, RunJob.job_id == Job.id)
            .where(RunJob.run_id == run_id, run_status == JobStatus(status).value)
            .order_by(Job.id)
        )
        with self._session() as session:
            return [JobGroupRow(*row) for row in session.execute(query)]

    def outputs(self, run_id: int | None = None, limit: int | None = None) -> list[OutputRecord]:
        """Outputs by id; with `run_id`, the outputs of every job the run asked for (skipped ones too)."""
        with self._session() as session:
            query = select(Output).order_by(Output.id).limit(limit)
            if run_id is not None:
                query = query.join(RunJob, RunJob.job_id == Output.job_id).where(RunJob.run_id == run_id)
            return [_record(OutputRecord, row) for row in session.scalars(query).all()]

    def progress(self, run_id: int) -> tuple[int, int]:
        """(jobs finished, jobs) of a run as it sees them now: succeeded, failed and skipped are finished."""
        by = self.stats(run_id)["by_status"]
        done = by[JobStatus.succeeded] + by[JobStatus.failed] + by[JobStatus.skipped]
        return done, sum(by.values())

    def stats(self, run_id: int | None = None) -> dict[str, Any]:
        """Job counts by status (a run's view with `run_id`), output count and bytes, generation seconds."""
        with self._session() as session:
            if run_id is None:
                status_col: sa.ColumnElement[Any] = sa.cast(Job.status, sa.String)
                base = select(Job.id.label("job_id"), status_col.label("status"), Job.seconds)
            else:
                self._run(session, run_id)
                status_col = self._run_status()
                # time this run's own workers spent: not on jobs made earlier or by another run
                own = sa.case((_made_by() == run_id, Job.seconds), else_=None)
                base = (
                    select(Job.id.label("job_id"), status_col.label("status"), own.label("seconds"))
                    .join(RunJob, RunJob.job_id == Job.id)
                    .where(RunJob.run_id == run_id)
                )  # fmt: skip
            jobs = base.subquery()
            counts = dict.fromkeys((s.value for s in JobStatus), 0)
            for status, count in session.execute(
                select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)
            ):
                counts[status] = count
            done_here = jobs.c.status != JobStatus.skipped.value  # time spent by this run, not earlier ones
            seconds = session.scalar(
                select(sa.func.coalesce(sa.func.sum(jobs.c.seconds), 0.0)).where(done_here)
            )
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
