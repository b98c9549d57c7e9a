"""wanflow deployed for real: a `prefect server` process, the work pools, prefect.yaml's deployments and
process workers started by the infra/ scripts, the PostgreSQL catalog and the S3 test server.

1. A 6-item x 2-seed manifest, run as the `generate-batch` deployment on the CPU pool, fans its shards
   out to the GPU pool (two workers with `--limit 1`, concurrency limit 2) and finishes with 12 verified
   objects and 12 catalog outputs, and nothing else in the bucket.
2. On a fresh manifest, the GPU workers and their flow-run processes are SIGKILLed mid-run. The batch
   run is cancelled (the operator's move, infra/README.md "Resuming"), the workers are started again
   and the manifest runs again: jobs finished before the kill are skipped, the rest are generated once
   each, every job ends with exactly one verified output, and storage matches the catalog.
3. The workers hold secrets in their environment only, as infra/README.md tells operators to: a catalog URL
   with a password (a PostgreSQL role made for this module) and S3 keys. After run 1, no secret is found
   in Prefect's database (flow run parameters, names, logs, artifacts, events: the server's SQLite file
   read byte for byte), in any catalog table, in any stored object, in the `prefect` and `wanflow` command
   outputs, or in the workers' logs.

The flow runs are real processes that import torch (several seconds each on 2 cores): the module takes
about two to three minutes. Everything runs under `tmp_path`; the server uses SQLite for its own data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from databases import reset_postgres
from psycopg import sql
from s3_server import BUCKET, Target, free_port
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from storage.catalog import Catalog, JobStatus, PlanOutcome
from storage.video import verify_object

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PREFECT = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
SERVER_START_TIMEOUT = 90
RUN_TIMEOUT = 240
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
# Fast enough for a test, representative of a real job: a few seconds each (test 2 needs time to kill).
QUICK = {"size": "64*48", "frame_num": 5, "steps": 2}
SLOWER = {"size": "64*48", "frame_num": 9, "steps": 8}


# --------------------------------------------------------------------------------------- processes


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (flow runs start in sessions of their own, so a process group
    does not hold them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal a process and all its descendants; returns the pids signalled."""
    pids = _descendants(pid)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
    return pids


def _stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """TERM the process (it stops its own children), then KILL whatever is left of its tree."""
    pids = _descendants(process.pid)
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    if process.poll() is None:
        process.wait(5)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    return f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _base_env(**extra: str) -> dict[str, str]:
    """This environment without Prefect or wanflow settings, plus quiet-and-offline and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WANFLOW_", "AWS_"))}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )  # fmt: skip
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------- the Prefect API


@dataclass
class PrefectServer:
    url: str  # .../api
    home: Path
    log: Path

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/flow_runs/{run_id}")

    def subflow_runs(self, parent_id: str) -> list[dict[str, Any]]:
        body = {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}, "limit": 200}
        return self.request("POST", "/flow_runs/filter", body)

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
        """Run the `prefect` CLI against this server; its output (AssertionError with it on failure)."""
        done = subprocess.run(
            [PREFECT, *args], cwd=REPO, env=env or self.env(), capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def env(self, **extra: str) -> dict[str, str]:
        return _base_env(PREFECT_API_URL=self.url, PREFECT_HOME=str(self.home / "client"), **extra)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1 (SQLite for Prefect's own data), healthy."""
    if PREFECT is None:
        pytest.skip("the `prefect` command is not installed (pip install prefect)")
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    server = PrefectServer(f"http://127.0.0.1:{port}/api", home, home / "server.log")
    env = _base_env(
        PREFECT_HOME=str(home / "server"),
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        # Subflows of a cancelled batch run are cancelled within seconds, not the default 20 s.
        PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS="2",
    )
    with server.log.open("wb") as log:
        process = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            try:
                if server.request("GET", "/health") is True:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not become healthy in {SERVER_START_TIMEOUT} s\n"
                            + _tail(server.log))  # fmt: skip
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer) -> PrefectServer:
    """The pools (infra/create-pools.sh: GPU pool limited to 2) and prefect.yaml's deployments
    (infra/deploy.sh), exactly as an operator sets them up."""
    env = prefect_server.env(GPU_POOL_LIMIT="2", CPU_POOL_LIMIT="2", WANFLOW_HOME=str(REPO))
    for script in ("create-pools.sh", "deploy.sh"):
        done = subprocess.run([str(INFRA / script)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=180)  # fmt: skip
        assert done.returncode == 0, f"infra/{script} failed:\n{done.stdout}\n{done.stderr}"
    pool = prefect_server.request("GET", "/work_pools/wanflow-gpu")
    assert (pool["type"], pool["concurrency_limit"]) == ("process", 2)
    assert prefect_server.request("GET", "/work_pools/wanflow-cpu")["type"] == "process"
    deployment = prefect_server.request("GET", "/deployments/name/generate-batch/generate-batch")
    assert deployment["parameters"]["shard_deployment"] == "generate-shard/generate-shard"
    assert [s["active"] for s in deployment["schedules"]] == [False]  # the nightly example stays off
    # Stored unresolved: each worker fills in its own checkout.
    assert json.dumps(deployment["pull_steps"]).count("{{ $WANFLOW_HOME }}") == 1
    shard = prefect_server.request("GET", "/deployments/name/generate-shard/generate-shard")
    assert shard["work_pool_name"] == "wanflow-gpu"
    automations = prefect_server.request("POST", "/automations/filter", {})
    assert "wanflow-crash-silent-runs" in {a["name"] for a in automations}
    # The snapshot deployment, and its example trigger (a snapshot after every generate-batch run), off.
    export = prefect_server.request("GET", "/deployments/name/export-dataset/export-dataset")
    assert export["work_pool_name"] == "wanflow-cpu" and export["parameters"]["name"] == "nightly"
    linked = [a for a in automations
              if any(action.get("deployment_id") == export["id"] for action in a["actions"])]  # fmt: skip
    assert len(linked) == 1 and linked[0]["enabled"] is False, linked
    assert linked[0]["trigger"]["match_related"]["prefect.resource.name"] == "generate-batch"
    return prefect_server


# --------------------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class WorkerSecrets:
    """What only the workers' environment holds: a catalog URL with a password (a PostgreSQL role of its
    own; the test server trusts local connections, so any password works, but the URL carries it) and S3
    keys (moto takes any). The `wanflow` commands also get the password percent-encoded."""

    role: str
    password: str
    catalog_url: str
    aws_key_id: str
    aws_secret: str

    @property
    def needles(self) -> dict[str, bytes]:
        """What must be found nowhere: the password's random core (in whatever URL form, raw or
        percent-encoded) and both S3 keys."""
        core = self.password.split("-")[1]
        return {"catalog password": core.encode(), "S3 key id": self.aws_key_id.encode(),
                "S3 secret key": self.aws_secret.encode()}  # fmt: skip


def _grant(admin_url: str, role: str) -> None:
    """Let `role` read and write the catalog's tables in the test database (made by the admin role)."""
    conninfo = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
        conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
        conn.execute(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"')


@pytest.fixture(scope="module")
def worker_secrets(postgres_database: str) -> Iterator[WorkerSecrets]:
    role = f"wanflow_worker_{secrets.token_hex(4)}"
    # Written by hand, as an operator would: spaces left as they are (SQLAlchemy takes them), around a
    # random core, which is what is searched for.
    password = f"Pw-{secrets.token_hex(12)}-with spaces"
    test_db = make_url(postgres_database)
    url = f"postgresql+psycopg://{role}:{password}@{test_db.host}:{test_db.port or 5432}/{test_db.database}"
    assert make_url(url).password == password
    admin = test_db.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        create = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
        conn.execute(create.format(sql.Identifier(role), sql.Literal(password)))
    yield WorkerSecrets(
        role, password, url,
        aws_key_id=f"AKIA{secrets.token_hex(8).upper()}", aws_secret=f"S3k{secrets.token_hex(16)}",
    )  # fmt: skip
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


@dataclass
class Stack:
    """Server, catalog, bucket and this machine's workers (started by infra/start-workers.sh)."""

    server: PrefectServer
    catalog_url: str
    s3: Target
    s3_port: int
    run_dir: Path
    secrets: WorkerSecrets
    catalog: Catalog = field(init=False)
    outputs: list[str] = field(default_factory=list)  # what the `prefect` commands printed

    def __post_init__(self) -> None:
        self.catalog = Catalog(self.catalog_url)

    def worker_env(self) -> dict[str, str]:
        # What each GPU machine exports before infra/start-workers.sh: settings and credentials live in
        # the workers' environment, never in flow parameters.
        return self.server.env(
            WANFLOW_HOME=str(REPO), RUN_DIR=str(self.run_dir), GPUS="0,1", STOP_TIMEOUT="10",
            WANFLOW_CATALOG_URL=self.secrets.catalog_url, WANFLOW_STORAGE_ROOT=self.s3.root,
            WANFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{self.s3_port}", AWS_DEFAULT_REGION="us-east-1",
            AWS_ACCESS_KEY_ID=self.secrets.aws_key_id, AWS_SECRET_ACCESS_KEY=self.secrets.aws_secret,
            WANFLOW_RETRY_DELAY_S="0.5",
            PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1",
            PREFECT_LOGGING_LEVEL="INFO",
        )  # fmt: skip

    def start_workers(self, *args: str) -> None:
        done = subprocess.run([str(INFRA / "start-workers.sh"), *args], cwd=REPO, env=self.worker_env(),
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, f"start-workers.sh failed:\n{done.stdout}\n{done.stderr}"

    def stop_workers(self) -> None:
        subprocess.run([str(INFRA / "start-workers.sh"), "stop"], cwd=REPO, env=self.worker_env(),
                       capture_output=True, timeout=120)  # fmt: skip
        for pidfile in self.run_dir.glob("worker-*.pid"):  # whatever `stop` left
            _kill_tree(int(pidfile.read_text()))

    def worker_pid(self, name: str) -> int:
        return int((self.run_dir / f"worker-{name}.pid").read_text())

    def logs(self) -> str:
        return "\n".join(_tail(p) for p in sorted(self.run_dir.glob("worker-*.log")))

    def put_manifest(self, name: str, items: list[str]) -> str:
        rows = [
            {"item_id": item, "prompt": f"{item.replace('-', ' ')}, slow drifting camera"} for item in items
        ]
        key = f"manifests/{name}.jsonl"
        self.s3.fs.pipe_file(f"{BUCKET}/{key}", "".join(json.dumps(r) + "\n" for r in rows).encode())
        return f"s3://{BUCKET}/{key}"

    def run_batch(self, manifest: str, shard_size: int, defaults: dict[str, Any]) -> str:
        """`prefect deployment run generate-batch/generate-batch` (as infra/README.md shows); the run id."""
        params = {"manifest": manifest, "model": "tiny-t2v", "seeds": 2, "shard_size": shard_size,
                  "defaults": defaults}  # fmt: skip
        out = self.server.cli(
            "deployment", "run", "generate-batch/generate-batch", "--params", json.dumps(params)
        )
        self.outputs.append(out)
        found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert found, f"no flow run id in:\n{out}"
        return found.group(1)

    def wait_for(self, what: str, done: Callable[[], Any], timeout: float = RUN_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while not (result := done()):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")
            time.sleep(0.5)
        return result

    def wait_final(self, run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            run = self.server.flow_run(run_id)
            return run if run["state_type"] in FINAL else None

        return self.wait_for(f"flow run {run_id} to finish", final, timeout)

    def catalog_run(self, flow_run_id: str):
        runs = [r for r in self.catalog.runs(limit=100) if r.flow_run_id == flow_run_id]
        assert len(runs) == 1, f"catalog runs for flow run {flow_run_id}: {runs}"
        return runs[0]


@pytest.fixture
def stack(
    deployed: PrefectServer, postgres_database: str, s3_target: Target, moto_port: int, tmp_path: Path,
    worker_secrets: WorkerSecrets,
) -> Iterator[Stack]:  # fmt: skip
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log: thousands of lines
    reset_postgres(postgres_database)
    Catalog(postgres_database).upgrade()
    _grant(postgres_database, worker_secrets.role)
    run_dir = tmp_path / "run"
    stack = Stack(deployed, postgres_database, s3_target, moto_port, run_dir, worker_secrets)
    try:
        yield stack
    finally:
        stack.stop_workers()
        stack.catalog.close()


# -------------------------------------------------------------------------------------------- checks


def _poster(uri: str) -> str:
    return uri.removesuffix(".mp4") + ".poster.webp"


def _run_prefix(uri: str, root: str) -> str:
    """The run's folder of an output URI: {root}/{run}/..."""
    return uri[len(root) + 1 :].split("/", 1)[0]


def check_storage_matches_catalog(stack: Stack) -> None:
    """Every recorded output verifies (size and sha256); the bucket holds exactly those videos with
    their thumbnails, posters and sidecars, plus the contact sheets of finished runs; no multipart
    upload is left open."""
    options = stack.s3.options
    outputs = stack.catalog.outputs()
    for out in outputs:
        assert verify_object(out.uri, out.sha256, out.bytes, options), f"{out.uri} does not verify"
    root = stack.s3.root
    expected = set()
    for out in outputs:
        for uri in (out.uri, out.thumbnail_uri, out.sidecar_uri, _poster(out.uri)):
            assert uri and uri.startswith(root + "/"), uri
            expected.add(uri[len(root) + 1 :])
    runs = {r.name for r in stack.catalog.runs(limit=100) if r.status.value == "succeeded"}
    expected |= {f"{run}/contact_sheet.webp" for run in runs}
    listing = stack.s3.listing()
    uploads = [name for name in listing if name.startswith("upload:")]
    assert not uploads, f"multipart uploads left open: {uploads}"
    stored = {name for name in listing if not name.startswith("upload:")}
    assert not expected - stored, f"recorded in the catalog but not stored: {sorted(expected - stored)}"
    assert not stored - expected, f"stored without a catalog row: {sorted(stored - expected)}"


def _hits(data: bytes, needles: dict[str, bytes]) -> list[str]:
    """Which needles occur in `data`, each with a little context."""
    found = []
    for what, needle in needles.items():
        at = data.find(needle)
        if at >= 0:
            found.append(f"{what}: ...{data[max(0, at - 120) : at + 60]!r}...")
    return found


def wanflow_outputs(stack: Stack, manifest: str) -> list[str]:
    """What `wanflow` prints (stdout and stderr) when an operator queries the catalog with the secret URL
    and plans the manifest again with the secret keys in the environment."""
    from flows.cli import app

    runner = CliRunner()
    url = stack.secrets.catalog_url
    env = {"AWS_ACCESS_KEY_ID": stack.secrets.aws_key_id, "AWS_SECRET_ACCESS_KEY": stack.secrets.aws_secret,
           "WANFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{stack.s3_port}", "WANFLOW_CATALOG_URL": url,
           "WANFLOW_STORAGE_ROOT": stack.s3.root}  # fmt: skip
    commands = [["catalog", "runs"], ["catalog", "jobs"], ["catalog", "outputs"], ["catalog", "stats"],
                ["catalog", "show", str(stack.catalog.jobs()[0].id)]]  # fmt: skip
    said = []
    for command in commands:
        for extra in (["--json"], []):
            result = runner.invoke(app, [*command, "--catalog-url", url, *extra], env=env)
            assert result.exit_code == 0, result.output
            said.append(result.output)
    generate = ["generate", manifest, "--model", "tiny-t2v", "--out", stack.s3.root]
    plan = runner.invoke(app, [*generate, "--seeds", "2", "--dry-run", "--json", "--catalog-url", url],
                         env=env)  # fmt: skip
    assert plan.exit_code == 0, plan.output
    said.append(plan.output)
    unreachable = f"postgresql+psycopg://u:{quote(stack.secrets.password, safe='')}@127.0.0.1:1/db"
    refused = runner.invoke(app, [*generate, "--catalog-url", unreachable], env=env)
    assert refused.exit_code == 1, refused.output  # the error names the catalog, masked
    said.append(refused.output)
    return said


def check_no_secret_anywhere(stack: Stack, manifest: str) -> None:
    """No worker secret in Prefect's database (every table: flow run parameters and names, task runs,
    logs, artifacts, events), the catalog's tables, the stored objects, the command outputs or the workers'
    logs. Each place is also checked for something that must be there, so an empty search proves nothing."""
    started = time.monotonic()
    needles = stack.secrets.needles
    found: dict[str, list[str]] = {}

    def search(where: str, data: bytes, control: bytes | None = None) -> None:
        if control is not None:
            assert control in data, f"{where}: {control!r} is not there: the search would see nothing"
        if hits := _hits(data, needles):
            found[where] = hits

    # Prefect's own database: the server's SQLite file and its write-ahead log, byte for byte.
    database = stack.server.home / "server" / "prefect.db"
    blob = b"".join(p.read_bytes() for p in sorted(database.parent.glob("prefect.db*")))
    search("Prefect's database", blob, control=manifest.encode())
    assert b"ready on" in blob, "the shards' log lines are not in Prefect's database"
    # The same through the API: every flow run's parameters and name, every log line, every artifact.
    api = [stack.server.request("POST", "/flow_runs/filter", {"limit": 200}),
           stack.server.request("POST", "/task_runs/filter", {"limit": 200}),
           stack.server.request("POST", "/logs/filter", {"limit": 200}),
           stack.server.request("POST", "/artifacts/filter", {"limit": 200})]  # fmt: skip
    search("the Prefect API", json.dumps(api).encode(), control=b"batch-outputs")

    # Every catalog table, row by row; the runs record the workers' catalog, masked (role name, no password).
    admin = make_url(stack.catalog_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, connect_timeout=3) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]  # fmt: skip
        rows = []
        for table in tables:
            query = sql.SQL("SELECT row_to_json(t)::text FROM {} t").format(sql.Identifier(table))
            rows += [row[0] for row in conn.execute(query)]
    search("the catalog", "\n".join(rows).encode(), control=stack.secrets.role.encode())

    # Every stored object: videos, thumbnails, posters, sidecars, contact sheets, manifests.
    fs = stack.s3.fs
    objects = list(fs.find(BUCKET))
    assert any(path.endswith(".json") for path in objects)
    for path in objects:
        search(f"object s3://{path}", fs.cat_file(path))

    # What the commands printed, and the workers' logs.
    search("`prefect deployment run` output", "\n".join(stack.outputs).encode(), control=b"UUID")
    search("`wanflow` outputs", "\n".join(wanflow_outputs(stack, manifest)).encode(), control=b"***")
    for log in sorted(stack.run_dir.glob("worker-*.log")):
        search(f"worker log {log.name}", log.read_bytes())
    assert not found, f"secrets found: {json.dumps(found, indent=2)}"
    print(f"\nno secret in {len(objects)} objects, Prefect's database, the catalog and the outputs "
          f"({time.monotonic() - started:.1f} s)")  # fmt: skip


def max_overlap(runs: list[dict[str, Any]]) -> int:
    """How many of these flow runs ran at the same time, at most."""
    edges = []
    for run in runs:
        if run["start_time"] and run["end_time"]:
            edges += [(run["start_time"], 1), (run["end_time"], -1)]
    now = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        now += step
        peak = max(peak, now)
    return peak


# --------------------------------------------------------------------------------------------- tests


def test_gpu_pool_templates_are_accepted(prefect_server: PrefectServer) -> None:
    """Both GPU base job templates pass the server's validation (no prefect-kubernetes needed for that),
    and the Kubernetes one renders to a pod that requests and limits one NVIDIA GPU."""
    from prefect.utilities.templating import apply_values

    for kind in ("process", "kubernetes"):
        path = INFRA / "pools" / f"{kind}-gpu.json"
        template = json.loads(path.read_text())
        prefect_server.cli(
            "work-pool", "create", f"check-{kind}", "--type", kind, "--base-job-template", str(path)
        )
        assert prefect_server.request("GET", f"/work_pools/check-{kind}")["base_job_template"] == template
        prefect_server.cli("--no-prompt", "work-pool", "delete", f"check-{kind}")
    variables = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    job = apply_values(template["job_configuration"], {**values, "image": "wanflow:test", "name": "shard"})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert (
        pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["containers"][0]["image"] == "wanflow:test"
    )


def test_manifest_finishes_on_the_deployed_pools(stack: Stack) -> None:
    stack.start_workers("--cpu")
    items = ["fox-snow", "harbor-night", "city-rain", "desert-wind", "koi-pond", "robot-kitchen"]
    manifest = stack.put_manifest("six", items)
    batch_id = stack.run_batch(manifest, shard_size=4, defaults=QUICK)
    batch = stack.wait_final(batch_id)
    assert batch["state_type"] == "COMPLETED", f"{batch['state']}\n{stack.logs()}"

    run = stack.catalog_run(batch_id)
    assert run.status.value == "succeeded"
    stats = stack.catalog.stats(run.id)
    assert (stats["jobs"], stats["by_status"]["succeeded"], stats["outputs"]) == (12, 12, 12)
    jobs = stack.catalog.jobs(run.id)
    assert sorted(j.item_id for j in jobs) == sorted(items * 2)
    assert len({(j.item_id, j.seed) for j in jobs}) == 12  # two seeds per item
    assert all(j.attempts == 1 and j.outcome == PlanOutcome.created for j in jobs)
    outputs = stack.catalog.outputs(run.id)
    assert len({o.job_id for o in outputs}) == len({o.uri for o in outputs}) == 12

    # Shards ran as generate-shard deployment runs on the GPU pool, two at a time at most; each job was
    # recorded by the flow-run process of one of them ('<host>:<pid>:<flow run id>').
    shards = stack.server.subflow_runs(batch_id)
    assert len(shards) == 3 and {s["state_type"] for s in shards} == {"COMPLETED"}
    assert {s["work_pool_name"] for s in shards} == {"wanflow-gpu"}
    assert max_overlap(shards) <= 2
    assert {j.worker_id.rsplit(":", 1)[1] for j in jobs} <= {s["id"] for s in shards}

    check_storage_matches_catalog(stack)
    check_snapshots(stack, run.name)
    check_no_secret_anywhere(stack, manifest)


def check_snapshots(stack: Stack, run_name: str) -> None:
    """The export-dataset deployment, run on the CPU pool as an operator runs it: v1 of a selection, then
    v2 when the selection picks other videos; the catalog lists both with their samples, the bucket holds
    their shards and cards under snapshots/<name>/v<N>/."""
    motions = sorted(o.motion for o in stack.catalog.outputs())
    assert len(motions) == 12 and None not in motions
    cut = (motions[5] + motions[6]) / 2  # the six calmest videos
    versions = []
    for where in (f"motion < {cut!r}", "frames >= 1"):
        params = {"name": "six", "runs": [run_name], "where": where}
        out = stack.server.cli("deployment", "run", "export-dataset/export-dataset", "--params",
                               json.dumps(params))  # fmt: skip
        stack.outputs.append(out)
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        final = stack.wait_final(run_id)
        assert final["state_type"] == "COMPLETED", f"{final['state']}\n{stack.logs()}"
        versions.append(run_id)
    listed = stack.catalog.snapshots("six")
    found = [(s.version, s.samples, s.flow_run_id) for s in listed]
    assert found == [(1, 6, versions[0]), (2, 12, versions[1])]
    assert len(stack.catalog.snapshot_samples(listed[1].id)) == 12
    for snapshot in listed:
        assert snapshot.uri == f"{stack.s3.root}/snapshots/six/v{snapshot.version}"
        names = {path.rsplit("/", 1)[1] for path in stack.s3.fs.find(snapshot.uri.removeprefix("s3://"))}
        assert {"README.md", "export.json", "index.parquet", "shard-000000.tar"} <= names, names


def test_killed_workers_then_rerun_completes_only_missing_jobs(stack: Stack) -> None:
    stack.start_workers("--cpu")
    items = ["aurora", "market-spices", "surf-drone", "forest-fog", "paper-crane", "volcano"]
    manifest = stack.put_manifest("six-more", items)
    first_id = stack.run_batch(manifest, shard_size=3, defaults=SLOWER)

    # Kill this machine's GPU workers, with the flow runs they started, once some videos exist.
    def some_outputs() -> list | None:
        outs = stack.catalog.outputs()
        return outs if len(outs) >= 2 else None

    stack.wait_for("the first outputs", some_outputs)
    for name in ("gpu0", "gpu1"):
        _kill_tree(stack.worker_pid(name))
        (stack.run_dir / f"worker-{name}.pid").unlink()
    first_run = stack.catalog_run(first_id)
    before = {j.id: j for j in stack.catalog.jobs(first_run.id)}
    done_before = {o.job_id: o for o in stack.catalog.outputs()}
    abandoned = {i for i, j in before.items() if j.status == JobStatus.running}
    assert 2 <= len(done_before) < 12, "the kill must land mid-run"
    assert {i for i, j in before.items() if j.status == JobStatus.succeeded} == set(done_before)

    # The operator cancels the stuck batch run; its waiting shard runs are cancelled with it and the
    # dead ones stop holding GPU slots (Cancelling).
    stack.server.cli("flow-run", "cancel", first_id)
    assert stack.wait_final(first_id, timeout=60)["state_type"] == "CANCELLED"

    def shards_released() -> bool:
        states = {s["state_type"] for s in stack.server.subflow_runs(first_id)}
        return not states & {"SCHEDULED", "PENDING", "RUNNING"}

    stack.wait_for("the first run's shard runs to be cancelled", shards_released, timeout=60)
    assert stack.catalog.get_run(first_run.id).status.value == "cancelled"

    # Workers back, same manifest again: a new batch run.
    stack.start_workers()
    second_id = stack.run_batch(manifest, shard_size=3, defaults=SLOWER)
    second = stack.wait_final(second_id)
    assert second["state_type"] == "COMPLETED", f"{second['state']}\n{stack.logs()}"

    second_run = stack.catalog_run(second_id)
    assert second_run.status.value == "succeeded"
    after = {j.id: j for j in stack.catalog.jobs(second_run.id)}
    assert set(after) == set(before)  # the same 12 jobs
    for job_id, job in after.items():
        if job_id in done_before:  # finished before the kill: skipped, not made again
            assert job.outcome == PlanOutcome.already_done and job.status == JobStatus.skipped
            assert job.attempts == 1
        else:
            assert job.outcome == PlanOutcome.already_planned and job.status == JobStatus.succeeded
            # Interrupted jobs were claimed twice (the dead attempt and this one), the rest once.
            assert job.attempts == (2 if job_id in abandoned else 1), job
    outputs = stack.catalog.outputs()
    assert len(outputs) == len({o.job_id for o in outputs}) == len({o.uri for o in outputs}) == 12
    for job_id, out in done_before.items():  # untouched: same row, same object
        now = next(o for o in outputs if o.job_id == job_id)
        assert (now.id, now.uri, now.sha256) == (out.id, out.uri, out.sha256)
    # A job's objects live under the run that first planned it: the redo of an interrupted job wrote
    # over whatever its dead attempt had committed, so storage holds exactly what the catalog records
    # (the second run adds only its contact sheet) and no upload is left open.
    assert {_run_prefix(o.uri, stack.s3.root) for o in outputs} == {first_run.name}
    check_storage_matches_catalog(stack)
