"""Connecting to the catalog database: URLs, engines, SQLite settings, transactions, and the schema (its check
against the packaged Alembic migrations, and the upgrade to them).

Transactions: every catalog call is one short transaction (`transaction`) and safe to call from many
processes. `lifecycle.claim` picks pending rows with `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL; on
SQLite the file runs in WAL mode with a busy timeout and every writing transaction starts with
`BEGIN IMMEDIATE`, which serialises writers up front instead of failing on a lock upgrade.

The schema is checked explicitly, by `check_schema`: `Catalog` calls it before its first transaction, so a
database without the catalog tables, or at another revision, is reported then (`upgrade` brings it to the
newest revision). Database URLs only appear in messages through `redact`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from storage.catalog.records import CatalogError
from storage.urls import redact

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
SUPPORTED_SCHEMES = ("sqlite", "postgresql")
_SQLITE_BUSY_MS = 60_000
_PG_CONNECT_TIMEOUT_S = 5


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


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


# ----------------------------------------------------------------------------------------- transactions


@contextmanager
def database_errors(url: str, doing: str) -> Iterator[None]:
    """Connection and database errors as `CatalogError("cannot <doing> catalog database <url>: ...")`."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        reason_text = redact(" ".join(line.strip() for line in reason))
        raise CatalogError(f"cannot {doing} catalog database {redact(url)}: {reason_text}") from None


def connect(engine: Engine, url: str) -> None:
    """Connect once (cheaply, with a short timeout); CatalogError if the database cannot be reached."""
    with database_errors(url, "connect to"), engine.connect():
        pass


@contextmanager
def transaction(engine: Engine, url: str, *, write: bool = False) -> Iterator[Session]:
    """A session in one transaction, committed when the block ends; `write` starts it with `BEGIN IMMEDIATE`
    on SQLite. It does not check the schema: that is `check_schema`, which callers run first."""
    with database_errors(url, "use"), Session(engine, expire_on_commit=False) as session, session.begin():
        if write and is_sqlite(engine):
            session.connection(execution_options={"wanflow_write": True})
        yield session


# ---------------------------------------------------------------------------------------------- schema


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


def is_head(revision: str | None) -> bool:
    """Whether `revision` is the newest revision of the packaged migrations."""
    return revision == _revisions()[0]


def current_revision(engine: Engine, url: str) -> str | None:
    """The schema revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with database_errors(url, "read"), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_schema(engine: Engine, url: str) -> None:
    """CatalogError unless the database is at the schema revision this code needs."""
    current = current_revision(engine, url)
    head, known = _revisions()
    where = f"catalog database {redact(url)}"
    if current is not None and current not in known:
        raise CatalogError(
            f"{where} is at schema revision {current}, which this wanflow does not know"
            " (written by a newer wanflow?): use that version, or a fresh database"
        )
    if current != head:
        state = "has no catalog tables" if current is None else f"is at schema revision {current}"
        raise CatalogError(f"{where} {state}; this wanflow needs {head}: run `wanflow catalog upgrade` first")


def upgrade(engine: Engine, url: str, revision: str = "head") -> str | None:
    """Migrate the schema (Alembic, packaged migrations) to `revision`; returns the revision reached (None
    at base)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    sqlite = is_sqlite(engine)
    with database_errors(url, "upgrade"), engine.connect() as conn:
        if sqlite:
            conn = conn.execution_options(wanflow_write=True)
        with conn.begin():
            if not sqlite:  # one migrator at a time; the others then find the schema current
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7745104519)")
            try:
                command.upgrade(alembic_config(conn), revision)
            except CommandError as error:  # e.g. a revision from a newer wanflow
                raise CatalogError(f"cannot upgrade catalog {redact(url)}: {error}") from None
            return MigrationContext.configure(conn).get_current_revision()
