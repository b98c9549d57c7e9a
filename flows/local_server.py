"""One local Prefect server per `PREFECT_HOME`, shared by every wanflow run on this machine.

Without `PREFECT_API_URL`, Prefect starts an ephemeral API server inside each process, on the SQLite
database in `PREFECT_HOME`: runs started together then time out waiting for their servers, or fail as each
migrates the same fresh database at once. Instead, the first run starts `prefect server start` on
127.0.0.1 and a free port, as a detached background process, and every later run reuses it.

Files in `PREFECT_HOME`:

- `wanflow-server.lock`: locked (`flock`) while a process checks, starts or stops the server, so that
  exactly one process starts it;
- `wanflow-server.json`: the running server's port and process id (no secrets);
- `wanflow-server.log`: the server's output.

A recorded server whose process is gone (a reboot, a kill) is replaced by a new one. One whose process
runs but does not answer is waited for, never killed behind the back of the runs using it:
`stop_local_server` (`wanflow server stop`) ends it.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LocalServer",
    "LocalServerError",
    "ensure_local_server",
    "is_healthy",
    "local_server",
    "prefect_api",
    "prefect_home",
    "stop_local_server",
]

HOST = "127.0.0.1"  # never another interface: the server has no authentication
LOCK_NAME = "wanflow-server.lock"
STATE_NAME = "wanflow-server.json"
LOG_NAME = "wanflow-server.log"
START_TIMEOUT_S = 120.0  # a cold start (migrations of a fresh database) takes 10-30 s on 2 busy cores
STOP_TIMEOUT_S = 30.0
HEALTH_REQUEST_S = 2.0
POLL_S = 0.25
LOG_ROTATE_BYTES = 10 * 2**20
# Left out of the server's environment: client-side API settings, and storage and catalog credentials it
# has no use for.
_NOT_FOR_SERVER = ("PREFECT_API_URL", "PREFECT_API_KEY")
_NOT_FOR_SERVER_PREFIXES = ("WANFLOW_", "AWS_")

# The servers this process started: polled, so that one that died is reaped rather than left a zombie
# that still looks alive.
_children: dict[int, subprocess.Popen] = {}


class LocalServerError(RuntimeError):
    """The local Prefect server could not be started, or does not answer."""


@dataclass(frozen=True)
class LocalServer:
    """A local Prefect server, as recorded in `PREFECT_HOME`."""

    pid: int
    port: int
    home: Path

    @property
    def url(self) -> str:
        """The API URL, for `PREFECT_API_URL`."""
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def log(self) -> Path:
        return self.home / LOG_NAME

    @property
    def running(self) -> bool:
        """Its process still runs (and is a Prefect server on its port, where that can be told)."""
        return _alive(self.pid) and _is_server_process(self.pid, self.port)

    @property
    def healthy(self) -> bool:
        return is_healthy(self.url)


def prefect_home(home: str | os.PathLike[str] | None = None) -> Path:
    """`home`, else `$PREFECT_HOME`, else Prefect's default `~/.prefect`.

    Read from the environment, without importing Prefect: Prefect reads its settings once, when imported,
    so a caller may still set `PREFECT_API_URL` in the environment after this and before importing it.
    """
    if home is None:
        home = os.environ.get("PREFECT_HOME") or "~/.prefect"
    return Path(home).expanduser().resolve()


def is_healthy(url: str, timeout: float = HEALTH_REQUEST_S) -> bool:
    """Whether the Prefect API at `url` (".../api") answers its health check, bypassing any proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200 and json.loads(response.read()) is True
    except (OSError, ValueError, http.client.HTTPException):
        return False


def local_server(home: str | os.PathLike[str] | None = None) -> LocalServer | None:
    """The server recorded in `home` if its process still runs (healthy or not), else None."""
    server = _read_state(prefect_home(home))
    return server if server is not None and server.running else None


def ensure_local_server(
    home: str | os.PathLike[str] | None = None, timeout: float = START_TIMEOUT_S, *, port: int | None = None
) -> str:
    """The API URL (`http://127.0.0.1:PORT/api`) of the local Prefect server of `home` (default: the
    current `PREFECT_HOME`), started first if none runs. Safe to call from many processes at once: one of
    them starts the server, the others wait for it and share it.

    `port`: the port for a server started now (default: a free one). Raises `LocalServerError` when no
    healthy server is there within `timeout` seconds.
    """
    home = prefect_home(home)
    home.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    server = _read_state(home)
    if server is not None and server.running and server.healthy:  # the usual case: no lock needed
        return server.url
    with _locked(home, deadline):
        server = _read_state(home)
        if server is not None and server.running:  # starting, or busy: wait for it
            if _wait_healthy(server, None, deadline):
                return server.url
            raise LocalServerError(
                f"the local Prefect server at {server.url} (process {server.pid}) did not answer within "
                f"{timeout:.0f} s; its log is {server.log}; `wanflow server stop` ends it"
            )
        _remove_state(home)  # none, or its process is gone
        return _start(home, deadline, port).url


def stop_local_server(home: str | os.PathLike[str] | None = None, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the local Prefect server of `home` (SIGTERM, then SIGKILL after `timeout` seconds) and forget
    it; True if one was running."""
    home = prefect_home(home)
    if not home.is_dir():
        return False
    deadline = time.monotonic() + timeout
    with _locked(home, deadline):
        server = _read_state(home)
        if server is None:
            return False
        running = server.running
        if running:
            _end(server.pid, deadline)
        _remove_state(home)
        return running


@contextlib.contextmanager
def prefect_api(
    home: str | os.PathLike[str] | None = None, timeout: float = START_TIMEOUT_S
) -> Iterator[str]:
    """Run the block against a Prefect API server; yields its URL.

    The API configured (`PREFECT_API_URL` in the environment, the active profile or a settings file) is
    used as it is. Without one, the local server of `home` (`ensure_local_server`) is used: its URL is set
    both in this process's Prefect settings (which Prefect reads once, at import) and in the environment,
    for the processes the block starts; both are restored afterwards.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url  # the active settings: a test harness's server counts
    if configured:
        yield configured
        return
    url = ensure_local_server(home, timeout)
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


# ------------------------------------------------------------------------------------------ internals
@contextlib.contextmanager
def _locked(home: Path, deadline: float) -> Iterator[None]:
    """Hold the exclusive lock of `home`'s server; LocalServerError if it cannot be had by `deadline`."""
    with (home / LOCK_NAME).open("a") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LocalServerError(
                        f"timed out waiting for another process to start the local Prefect server "
                        f"({home / LOCK_NAME}); its log is {home / LOG_NAME}"
                    ) from None
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_state(home: Path) -> LocalServer | None:
    try:
        state = json.loads((home / STATE_NAME).read_text())
        return LocalServer(pid=int(state["pid"]), port=int(state["port"]), home=home)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(server: LocalServer) -> None:
    """Record `server` (written whole, then renamed: a reader never sees half a file)."""
    state = {"pid": server.pid, "port": server.port, "url": server.url, "started_at": time.time()}
    path = server.home / STATE_NAME
    partial = path.with_name(f".{STATE_NAME}.{os.getpid()}")
    partial.write_text(json.dumps(state) + "\n")
    os.replace(partial, path)


def _remove_state(home: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (home / STATE_NAME).unlink()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: trust the signal
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _is_server_process(pid: int, port: int) -> bool:
    """Whether `pid` is a `prefect server start ... --port PORT` (True where /proc cannot tell): a
    recorded process id may have been reused by an unrelated process since."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False
    return b"prefect" in b" ".join(args) and b"server" in args and str(port).encode() in args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _server_env(home: Path, port: int) -> dict[str, str]:
    """The server's environment: this one less API settings and credentials, with its home, and its host and
    port as settings too, for the URL its UI calls the API at (`--port` alone leaves the UI calling the
    default port, 4200: a blank page saying it cannot connect)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _NOT_FOR_SERVER and not name.startswith(_NOT_FOR_SERVER_PREFIXES)
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _start(home: Path, deadline: float, port: int | None) -> LocalServer:
    """Start a server (the lock held): detached, in its own session, logging to `home`; wait until
    healthy. A port taken between choosing and binding it is retried on another."""
    log = home / LOG_NAME
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log, log.with_name(LOG_NAME + ".1"))
    for attempt in range(1 if port is not None else 3):
        chosen = port if port is not None else _free_port()
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(chosen),
                   "--analytics-off"]  # fmt: skip
        with log.open("ab") as out:
            offset = out.tell()
            out.write(f"--- wanflow: starting the Prefect server on {HOST}:{chosen} ---\n".encode())
            out.flush()
            process = subprocess.Popen(
                command, cwd=home, env=_server_env(home, chosen), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _children[process.pid] = process
        server = LocalServer(pid=process.pid, port=chosen, home=home)
        _write_state(server)  # at once: a caller that gives up leaves a server the next one can find
        if _wait_healthy(server, process, deadline):
            return server
        said = _redact(log.read_bytes()[offset:].decode(errors="replace"))
        _end(process.pid, time.monotonic() + STOP_TIMEOUT_S)
        _remove_state(home)
        if process.poll() is not None and "already in use" in said and attempt < 2 and port is None:
            continue
        tail = "\n".join(said.splitlines()[-15:])
        raise LocalServerError(f"the local Prefect server did not start (its log is {log}):\n{tail}")
    raise AssertionError("unreachable")


def _wait_healthy(server: LocalServer, process: subprocess.Popen | None, deadline: float) -> bool:
    """Wait until `server` answers (True), its process ends or `deadline` passes (False)."""
    while True:
        if server.healthy:
            return True
        ended = process.poll() is not None if process is not None else not server.running
        if ended or time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)


def _end(pid: int, deadline: float) -> None:
    """End the server `pid` and the process group it leads: SIGTERM, then SIGKILL at `deadline`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        limit = deadline if sig == signal.SIGTERM else time.monotonic() + 10
        while _alive(pid) and time.monotonic() < limit:
            time.sleep(0.1)
        if not _alive(pid):
            break
    child = _children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1)


def _redact(text: str) -> str:
    """`text` with the passwords of any URLs in it masked."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)
