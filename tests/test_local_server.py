"""The local Prefect server shared by concurrent runs (`flows.local_server`): real `prefect server start`
processes on 127.0.0.1, started by several processes at once on a fresh `PREFECT_HOME`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.local_server import (
    LOG_NAME,
    STATE_NAME,
    LocalServer,
    ensure_local_server,
    is_healthy,
    local_server,
    stop_local_server,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

ENSURE = """
import sys
from flows.local_server import ensure_local_server
print(ensure_local_server(sys.argv[1]))
"""

# A run on the defaults: a Prefect flow in a process with no PREFECT_API_URL. It is pointed at the local
# server either by `prefect_api` (any time) or by setting PREFECT_API_URL before Prefect is imported.
FLOW_RUN = """
import contextlib, os, sys
from flows.local_server import ensure_local_server, prefect_api

if sys.argv[2] == "environ":
    os.environ["PREFECT_API_URL"] = ensure_local_server()
from prefect import flow
from prefect.client.orchestration import get_client

@flow(name="wanflow-local-server-probe")
def probe(n: int) -> str:
    return f"{n} {str(get_client().api_url).rstrip('/')}"

api = prefect_api() if sys.argv[2] == "context" else contextlib.nullcontext(os.environ["PREFECT_API_URL"])
with api as url:
    print(url, probe(int(sys.argv[1])))
"""


def _env(home: Path) -> dict[str, str]:
    """This environment without a Prefect API, with `home` as PREFECT_HOME."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    return env


def _servers_of(home: Path) -> list[int]:
    """The ids of the running `prefect server start` processes whose PREFECT_HOME is `home`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        is_server = b"server" in args and b"start" in args and any(b"prefect" in a for a in args)
        if is_server and state != "Z" and f"PREFECT_HOME={home}".encode() in environ:
            found.append(int(entry.name))
    return found


def _spawn(script: str, home: Path, *args: str) -> subprocess.Popen:
    """`python -c script args...` on `home`, its output captured."""
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _state(home: Path) -> dict:
    return json.loads((home / STATE_NAME).read_text())


def _gone(pid: int, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A fresh PREFECT_HOME; its server is stopped afterwards, whatever happened."""
    path = tmp_path / "prefect-home"
    yield path
    stop_local_server(path)
    for pid in _servers_of(path):  # never leave a server behind
        os.killpg(pid, signal.SIGKILL)


def test_concurrent_callers_share_one_server_that_is_restarted_when_it_dies(home: Path) -> None:
    """Four processes ask at once on a fresh home: exactly one server starts, all four get its URL. A
    later call reuses it at once; once it is killed, the next calls (four threads) start exactly one new
    one; `stop` ends it."""
    started = time.monotonic()
    callers = [_spawn(ENSURE, home, str(home)) for _ in range(4)]
    answers = [caller.communicate(timeout=150) for caller in callers]
    took = time.monotonic() - started
    assert all(caller.returncode == 0 for caller in callers), answers
    urls = {out.strip() for out, _ in answers}
    assert len(urls) == 1, urls
    url = urls.pop()
    state = _state(home)
    assert url == f"http://127.0.0.1:{state['port']}/api" == state["url"]
    assert _servers_of(home) == [state["pid"]]
    assert is_healthy(url)
    print(f"\n4 concurrent callers, one cold start: {took:.1f} s")

    reused = time.monotonic()
    assert ensure_local_server(home) == url
    assert time.monotonic() - reused < 2.0
    server = local_server(home)
    assert server == LocalServer(pid=state["pid"], port=state["port"], home=home.resolve())
    assert server.ui_url == f"http://127.0.0.1:{state['port']}/"
    with urllib.request.urlopen(server.ui_url, timeout=10) as page:  # the UI is served too
        assert page.status == 200
    with urllib.request.urlopen(server.ui_url + "ui-settings", timeout=10) as ui:  # and calls this server
        assert json.load(ui)["api_url"] == url  # not the default port's (a blank page)

    os.killpg(state["pid"], signal.SIGKILL)  # the server dies; its state file stays behind
    assert _gone(state["pid"])
    assert local_server(home) is None and (home / STATE_NAME).exists()
    restarted = time.monotonic()
    with ThreadPoolExecutor(4) as pool:  # four threads of one process at once, this time
        urls = set(pool.map(lambda _: ensure_local_server(home), range(4)))
    print(f"restart after a kill: {time.monotonic() - restarted:.1f} s")
    assert len(urls) == 1, urls
    again = urls.pop()
    new_state = _state(home)
    assert new_state["pid"] != state["pid"] and again == new_state["url"]
    assert is_healthy(again) and _servers_of(home) == [new_state["pid"]]
    assert "starting the Prefect server" in (home / LOG_NAME).read_text()

    assert stop_local_server(home) is True
    assert _gone(new_state["pid"], within_s=1.0)
    assert not (home / STATE_NAME).exists() and local_server(home) is None
    assert not is_healthy(again)
    assert stop_local_server(home) is False


def test_concurrent_flow_runs_on_a_fresh_home_use_the_local_server(home: Path) -> None:
    """Three processes run a Prefect flow at once with no PREFECT_API_URL on a fresh PREFECT_HOME (on
    Prefect's per-process ephemeral servers, runs started together can time out, or collide migrating the
    one SQLite database): each runs against the one local server, which records the three flow runs. Two
    use `prefect_api`; one sets PREFECT_API_URL to `ensure_local_server()` before importing Prefect."""
    runs = [_spawn(FLOW_RUN, home, str(n), mode) for n, mode in enumerate(["context", "context", "environ"])]
    answers = [run.communicate(timeout=150) for run in runs]
    assert all(run.returncode == 0 for run in runs), answers
    lines = sorted(out.strip().splitlines()[-1] for out, _ in answers)
    url = _state(home)["url"]
    assert lines == [f"{url} {n} {url}" for n in range(3)]
    assert _servers_of(home) == [_state(home)["pid"]]

    request = urllib.request.Request(
        f"{url}/flow_runs/filter", data=json.dumps({"limit": 10}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        flow_runs = json.loads(response.read())
    assert sorted(r["parameters"]["n"] for r in flow_runs) == [0, 1, 2]
    assert {r["state_type"] for r in flow_runs} == {"COMPLETED"}
