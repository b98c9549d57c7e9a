"""S3 for tests: moto's threaded server on 127.0.0.1 and storage targets (local directory or S3).

Loaded as a pytest plugin by conftest.py. `target` is parametrized over a local directory and a bucket
on the module's moto server (reset before each test, the way s3fs tests itself); `s3_target` is the
S3 case alone. `Target.listing()` shows everything stored, hidden temporary objects and open
multipart uploads included, so fault tests can check that nothing is left behind.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import s3fs
from moto.server import ThreadedMotoServer

BUCKET = "wanflow-test"
SECRET = "testing-secret-xyz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server() -> tuple[ThreadedMotoServer, int]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


def stop_server(server: ThreadedMotoServer) -> None:
    """Stop serving and close the listening socket (`stop()` alone leaves it open, so clients would hang
    in the backlog instead of being refused)."""
    server.stop()
    server._server.server_close()


def s3_options(port: int, secret: str = SECRET) -> dict:
    """s3fs options for moto: no region (moto rejects the location constraint) and one attempt per call,
    so an outage fails in about a second. (`aws_env` clears s3fs's instance cache between tests.)"""
    return {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "key": "testing",
        "secret": secret,
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    server, port = start_server()
    yield port
    stop_server(server)


@dataclass
class Target:
    """A storage root under test and the helpers to look at what is stored there."""

    root: str
    options: dict | None = None

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs = fsspec.core.url_to_fs(self.root, **(self.options or {}))[0]
        fs.invalidate_cache()
        return fs

    def _path(self, name: str) -> str:
        return fsspec.core.url_to_fs(self.url(name), **(self.options or {}))[1]

    def listing(self) -> list[str]:
        """Every object under the root, hidden ones included, relative to it; plus open S3 uploads."""
        fs, base = fsspec.core.url_to_fs(self.root, **(self.options or {}))
        fs.invalidate_cache()
        names = sorted(path[len(base) + 1 :] for path in fs.find(base)) if fs.exists(base) else []
        if isinstance(fs, s3fs.S3FileSystem):
            names += [f"upload:{u['Key']}" for u in fs.list_multipart_uploads(BUCKET)]
        return names

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def put(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)


def target_objects(target: Target) -> list[str]:
    """Objects only, without open multipart uploads."""
    return [name for name in target.listing() if not name.startswith("upload:")]


@pytest.fixture
def s3_target(moto_port: int, aws_env: None) -> Target:
    urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset", method="POST")
    )
    options = s3_options(moto_port)
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    return Target(f"s3://{BUCKET}/videos", options)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "s3":
        return request.getfixturevalue("s3_target")
    return Target(str(tmp_path / "videos"))
