"""Alembic environment for the wanflow catalog.

Programmatic use (`Catalog.upgrade()`) hands over an open connection in `config.attributes["connection"]`,
inside a transaction the caller commits. From the command line (`alembic upgrade head` next to alembic.ini)
the database is `WANFLOW_CATALOG_URL` if set, else `sqlalchemy.url` from the ini file. SQLite gets
`render_as_batch`, so later revisions can alter columns through table copies.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from storage.catalog import Base, make_engine

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    url = os.environ.get("WANFLOW_CATALOG_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no catalog URL: set WANFLOW_CATALOG_URL or sqlalchemy.url in alembic.ini")
    return url


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def run_offline() -> None:
    """`alembic upgrade --sql`: print the SQL instead of running it."""
    url = _database_url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_database_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_offline()
else:
    run_online()
