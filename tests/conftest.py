"""Shared test setup: offline, deterministic, CPU."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Prefect: a private home (its own SQLite database and profiles), no telemetry, quiet consoles. Set before
# anything imports prefect, which reads its settings at import time.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="wanflow-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


@pytest.fixture(scope="session", autouse=True)
def _no_local_prefect_server_left():
    """A test that runs `wanflow generate` outside a Prefect test harness starts the local server of this
    session's PREFECT_HOME (flows/local_server.py): stop it when the session ends."""
    yield
    from flows.local_server import stop_local_server

    stop_local_server(os.environ["PREFECT_HOME"])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fixtures: databases.py (SQLite file, throwaway PostgreSQL database), s3_server.py (moto S3 on 127.0.0.1).
pytest_plugins = ["databases", "s3_server"]
