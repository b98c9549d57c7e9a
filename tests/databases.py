"""Database fixtures for catalog tests: a throwaway SQLite file or PostgreSQL database per test.

`catalog_url` is parametrized over both backends; the PostgreSQL case is marked `integration`. PostgreSQL
comes from `WANFLOW_TEST_POSTGRES_URL` (default: the local server, user postgres). One database named
`wanflow_test_<hex>` is made per session and dropped at the end; each test starts with an empty schema.
When the server is unreachable the PostgreSQL cases are skipped, or fail if WANFLOW_REQUIRE_POSTGRES=1 (CI).
conftest.py loads this module as a plugin, so every test module can use the fixtures.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from storage.urls import redact

ADMIN_URL = os.environ.get("WANFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
START_HINT = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def _admin_connection() -> psycopg.Connection:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """SQLAlchemy URL of a fresh database on the test server, dropped after the session."""
    try:
        admin = _admin_connection()
    except psycopg.OperationalError as error:
        reason = redact(" ".join(str(error).split()))
        message = f"PostgreSQL not reachable at {redact(ADMIN_URL)} ({reason}): start it with `{START_HINT}`"
        if os.environ.get("WANFLOW_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + " (WANFLOW_REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    name = f"wanflow_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    yield url.render_as_string(hide_password=False)
    with _admin_connection() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def reset_postgres(url: str) -> None:
    """Drop everything in the public schema (tables, alembic_version) of the database at `url`."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.integration),
    ]
)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty catalog database (no tables yet): SQLite in tmp_path, or the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog' / 'catalog.db'}"  # parent directory does not exist yet
        return
    url = request.getfixturevalue("postgres_database")
    yield url
    reset_postgres(url)


def claim_until_empty(url: str, worker: str, limit: int, barrier: Any, results: Any) -> None:
    """Process body for the concurrency tests: claim until nothing is left, report the ids claimed."""
    from catalog_helpers import claim

    from storage.catalog import Catalog

    claimed: list[int] = []
    try:
        catalog = Catalog(url)
        barrier.wait(timeout=60)
        while jobs := claim(catalog, limit, worker=worker):
            claimed.extend(job.id for job in jobs)
            time.sleep(0.002)  # a moment of "work", so one process cannot drain the queue alone
        catalog.close()
        results.put((worker, claimed, None))
    except Exception as error:  # reported to the test, which fails with it
        results.put((worker, claimed, f"{type(error).__name__}: {error}"))
