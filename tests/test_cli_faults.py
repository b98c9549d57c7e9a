"""`wanflow` under the faults its users cause: Ctrl-C in the middle of a run, several runs of one manifest
started at once, and manifests full of malformed rows.

1. Ctrl-C: `wanflow generate` on the embedded defaults (no PREFECT_API_URL, a fresh PREFECT_HOME, a SQLite
   catalog, a local folder) is started as a terminal would start it, in a process group of its own, and the
   group gets SIGINT in the middle of a job, once, then (next run) twice in quick succession. Each time the
   command ends within a few seconds with exit code 130; the job in flight is pending again, the run is
   `cancelled` in the catalog and Cancelled in Prefect; the folder holds exactly the recorded outputs (no
   `.partial` file, no object without its catalog row); the local Prefect server lives on. A third run
   makes only what is missing.
2. Eight `wanflow generate` runs of one manifest at once, on a fresh PREFECT_HOME, one SQLite catalog and one
   folder: all succeed, every job is made exactly once, and the runs' "made" counts add up to the jobs.
3. Fuzz through the CLI: the seeded malformed manifests of test_manifest_fuzz.py (JSON Lines, CSV, Parquet;
   well over 1,000 malformed rows) through `wanflow validate` and `wanflow generate --skip-invalid
   --dry-run` on a PostgreSQL catalog: no traceback, every bad row named on its line, rows and jobs counted.

The subprocess tests run real `wanflow` processes that import torch and Prefect: test 1 takes one to two
minutes on 2 busy cores, test 2 about a minute and a half.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_local_server import _servers_of
from test_manifest_fuzz import Expected, _csv_file, _jsonl_file, _parquet_file
from typer.testing import CliRunner

from flows.cli import _interrupt_once, app
from flows.local_server import is_healthy, local_server, stop_local_server
from storage.catalog import Catalog, JobStatus

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "wanflow"
WANFLOW = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "flows.cli"]
STOP_WITHIN_S = 10.0  # "within a few seconds", with room for 2 busy cores
# A job of a few seconds on the CPU, so that the signal lands inside one.
SLOW_ROW = {"size": "128*96", "frame_num": 33, "steps": 30}  # several seconds a job, even on a quiet machine
QUICK_ROW = {"size": "64*48", "frame_num": 5, "steps": 2}


# ------------------------------------------------------------------------------------------- helpers


def _env(home: Path) -> dict[str, str]:
    """The embedded defaults: no Prefect API, no wanflow or cloud settings; `home` as PREFECT_HOME. One
    torch thread per process (several processes share 2 cores here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "WANFLOW_", "AWS_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # fmt: skip
    return env


def _manifest(path: Path, rows: int, params: dict[str, Any]) -> str:
    lines = [json.dumps({"item_id": f"clip-{n}", "prompt": f"a slow pan over scene {n}", **params})
             for n in range(rows)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _generate(tmp_path: Path, manifest: str, catalog_url: str, out: Path, *extra: str) -> subprocess.Popen:
    """`wanflow generate` as a terminal starts it: the leader of its own process group (the group a Ctrl-C
    reaches), here without a terminal."""
    command = [*WANFLOW, "generate", manifest, "--model", "tiny-t2v", "--catalog-url", catalog_url,
               "--out", str(out), *extra]  # fmt: skip
    return subprocess.Popen(
        command, cwd=tmp_path, env=_env(tmp_path / "prefect-home"), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def _running_job(url: str, process: subprocess.Popen, after_s: float = 0.5, timeout: float = 240):
    """The job the run is working on, once it has worked on it for `after_s` seconds."""
    deadline = time.monotonic() + timeout
    catalog: Catalog | None = None
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                out, err = process.communicate()
                pytest.fail(f"wanflow ended ({process.returncode}) before a job ran:\n{out}\n{err}")
            if catalog is None and Path(url.removeprefix("sqlite:///")).exists():
                catalog = Catalog(url)
            if catalog is not None:
                with_tables = catalog.current_revision() is not None
                running = catalog.jobs(status=JobStatus.running) if with_tables else []
                started = [j for j in running if j.started_at is not None]
                if started and time.time() - started[0].started_at.timestamp() > after_s:
                    return started[0]
            time.sleep(0.2)
        pytest.fail(f"no job ran within {timeout} s")
    finally:
        if catalog is not None:
            catalog.close()


def _interrupt(process: subprocess.Popen, times: int = 1, gap_s: float = 0.2) -> tuple[float, str, str]:
    """Ctrl-C at the terminal: SIGINT to the process group, `times` times; (seconds until the command
    ended, its stdout, its stderr)."""
    start = time.monotonic()
    for n in range(times):
        if n:
            time.sleep(gap_s)
        os.killpg(process.pid, signal.SIGINT)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"wanflow still ran 60 s after Ctrl-C:\n{out}\n{err}")
    return time.monotonic() - start, out, err


def _stored(root: Path) -> set[str]:
    """Every file under `root` (hidden ones included), relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _expected_objects(catalog: Catalog, root: Path) -> set[str]:
    """What the catalog says the folder holds: each output's video, thumbnail, poster and sidecar, and the
    contact sheet of every succeeded run that made something."""
    names = set()
    for out in catalog.outputs():
        for uri in (out.uri, out.thumbnail_uri, out.poster_uri, out.sidecar_uri):
            assert uri and uri.startswith(f"{root}/"), uri
            names.add(uri[len(str(root)) + 1 :])
    for run in catalog.runs(limit=100):
        if run.status.value == "succeeded" and catalog.stats(run.id)["by_status"]["succeeded"]:
            names.add(f"{run.name}/contact_sheet.webp")
    return names


def _prefect_flow_runs(home: Path) -> list[dict[str, Any]]:
    server = local_server(home)
    assert server is not None, "the local Prefect server is gone"
    request = urllib.request.Request(
        f"{server.url}/flow_runs/filter", data=json.dumps({"limit": 200}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def prefect_home(tmp_path: Path) -> Iterator[Path]:
    """A fresh PREFECT_HOME whose local server (started by the runs) is stopped afterwards."""
    home = tmp_path / "prefect-home"
    yield home
    stop_local_server(home)
    for pid in _servers_of(home):
        os.killpg(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ 1. Ctrl-C


def test_a_second_ctrl_c_while_stopping_is_answered_not_obeyed(capfd: pytest.CaptureFixture[str]) -> None:
    """The first SIGINT raises KeyboardInterrupt; a second one, while the run gives its job back and marks
    itself cancelled, only gets a line (it would break that clean-up off half-way); a third quits."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a handler other than Python's default here")
    with _interrupt_once():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # (the handler runs here: answered, not raised)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "stopping: giving the job in flight back" in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_ctrl_c_stops_generate_cleanly_and_a_rerun_resumes(tmp_path: Path, prefect_home: Path) -> None:
    started = time.monotonic()
    manifest = _manifest(tmp_path / "clips.jsonl", 3, SLOW_ROW)
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    out = tmp_path / "videos"
    catalog = Catalog(url)
    stops = []
    try:
        # Run 1: one Ctrl-C once a job has been under way for a moment. Run 2: two, 0.2 s apart (a user
        # pressing twice), the second landing while the first is being handled.
        for presses in (1, 2):
            process = _generate(tmp_path, manifest, url, out)
            job = _running_job(url, process)
            done_before = {j.id for j in catalog.jobs(status=JobStatus.succeeded)}
            server = local_server(prefect_home)
            took, stdout, stderr = _interrupt(process, times=presses)
            stops.append(took)
            assert process.returncode == 130, f"exit code {process.returncode}\n{stdout}\n{stderr}"
            assert took < STOP_WITHIN_S, f"{took:.1f} s from Ctrl-C to exit\n{stderr}"
            assert "interrupted" in stderr and "is marked cancelled" in stderr, stderr
            for noise in ("Traceback", "ConnectError", "Crash detected", "Aborted!", "error:"):
                assert noise not in stderr, stderr
            assert stdout == ""

            run = catalog.runs(limit=1)[0]
            assert run.status.value == "cancelled"
            assert catalog.get_job(job.id).status == JobStatus.pending  # the job in flight, given back
            assert not catalog.jobs(status=JobStatus.running)
            assert {j.id for j in catalog.jobs(status=JobStatus.succeeded)} >= done_before
            stored = _stored(out)
            assert not [name for name in stored if name.endswith(".partial")], stored
            assert stored == _expected_objects(catalog, out)  # nothing without its catalog row

            # Prefect says Cancelled (not Crashed) for the run and its shard; its server lives on.
            flow_runs = _prefect_flow_runs(prefect_home)
            batch = [r for r in flow_runs if r["name"] == run.name]
            assert [r["state_type"] for r in batch] == ["CANCELLED"], batch
            shards = [r for r in flow_runs if r["parent_task_run_id"] and r["name"].startswith("shard-")]
            assert "CRASHED" not in {r["state_type"] for r in shards}
            assert "RUNNING" not in {r["state_type"] for r in flow_runs}
            assert local_server(prefect_home) == server and server is not None and is_healthy(server.url)

        # Run 3, uninterrupted: the rest is made, what was done is skipped.
        done_before = {j.id for j in catalog.jobs(status=JobStatus.succeeded)}
        process = _generate(tmp_path, manifest, url, out, "--json")
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{stdout}\n{stderr}"
        summary = json.loads(stdout)
        assert summary["status"] == "succeeded"
        assert summary["by_status"]["skipped"] == len(done_before)
        assert summary["by_status"]["succeeded"] == 3 - len(done_before)
        jobs = catalog.jobs()
        assert len(jobs) == 3 and {j.status for j in jobs} == {JobStatus.succeeded}
        outputs = catalog.outputs()
        assert len(outputs) == len({o.job_id for o in outputs}) == 3
        assert _stored(out) == _expected_objects(catalog, out)
        assert len(_servers_of(prefect_home)) == 1  # one server served the three runs
    finally:
        catalog.close()
    print(f"\nCtrl-C to exit: {', '.join(f'{s:.1f} s' for s in stops)}; "
          f"test: {time.monotonic() - started:.0f} s")  # fmt: skip


# -------------------------------------------------------------------------------------- 2. concurrency


@pytest.mark.slow
@pytest.mark.integration
def test_eight_runs_of_one_manifest_at_once_make_each_job_once(tmp_path: Path, prefect_home: Path) -> None:
    started = time.monotonic()
    manifest = _manifest(tmp_path / "clips.jsonl", 4, QUICK_ROW)
    url = f"sqlite:///{tmp_path / 'catalog' / 'catalog.db'}"  # created by the runs themselves
    out = tmp_path / "videos"
    runs = [_generate(tmp_path, manifest, url, out, "--json") for _ in range(8)]
    results = []
    for process in runs:
        try:
            results.append(process.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for other in runs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            pytest.fail("a run did not finish within 300 s")
    took = time.monotonic() - started
    failed = [(p.returncode, err[-3000:]) for p, (_, err) in zip(runs, results, strict=True) if p.returncode]
    assert not failed, failed
    for _, err in results:
        assert "Traceback" not in err and "ConnectError" not in err, err[-3000:]
    summaries = [json.loads(stdout) for stdout, _ in results]
    assert {s["status"] for s in summaries} == {"succeeded"}
    assert len({s["run_name"] for s in summaries}) == 8
    made = [s["by_status"]["succeeded"] for s in summaries]
    assert sum(made) == 4, made  # each run counts only the jobs it made
    for summary in summaries:
        by = summary["by_status"]
        assert by["succeeded"] + by["skipped"] == summary["jobs"] == 4, summary

    catalog = Catalog(url)
    try:
        jobs = catalog.jobs()
        assert len(jobs) == 4 and {j.status for j in jobs} == {JobStatus.succeeded}
        assert [j.attempts for j in jobs] == [1] * 4  # claimed once each: made exactly once
        outputs = catalog.outputs()
        assert len(outputs) == len({o.job_id for o in outputs}) == 4
        assert _stored(out) == _expected_objects(catalog, out)
    finally:
        catalog.close()
    server = local_server(prefect_home)
    assert server is not None and _servers_of(prefect_home) == [server.pid]  # one shared server
    print(f"\n8 concurrent runs of 4 jobs: {took:.0f} s; made per run: {made}")


# ---------------------------------------------------------------------------------------- 3. fuzzing

_FUZZ = [(_jsonl_file, 500), (_csv_file, 420), (_parquet_file, 300)]
_FUZZ_SEEDS = [21, 22, 23]


def _valid_rows(url: str, expected: Expected) -> list[dict[str, Any]]:
    """The valid rows of a generated manifest, read back from the file by their lines (Parquet: rows)."""
    if url.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(url).to_pylist()
        return [table[line - 1] for line in expected.valid]
    data = Path(url).read_bytes().removeprefix(b"\xef\xbb\xbf")
    if url.endswith(".jsonl"):
        lines = data.split(b"\n")
        return [json.loads(lines[line - 1]) for line in expected.valid]
    # CSV: each valid record parsed from its first line on (lines as the loader counts them: by "\n")
    lines = [line + "\n" for line in data.decode("utf-8", errors="replace").split("\n")]
    header = next(csv.reader(lines[:1]))
    return [dict(zip(header, next(csv.reader(iter(lines[line - 1 :]))), strict=False))
            for line in expected.valid]  # fmt: skip


def _jobs_of(rows: list[dict[str, Any]]) -> int:
    """One job per seed: `num_seeds` of each row, default 1."""
    return sum(int(row["num_seeds"]) if row.get("num_seeds") not in (None, "") else 1 for row in rows)


def _write_images(rows: list[dict[str, Any]], folder: Path) -> None:
    """The images that valid image-to-video rows name (paths relative to the manifest): a run refuses a row
    whose local image is missing, and these rows are meant to be valid."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, format="PNG")
    for row in rows:
        if row.get("image"):
            path = folder / row["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.getvalue())


@pytest.mark.integration
def test_fuzzed_manifests_through_the_cli(tmp_path: Path, postgres_database: str) -> None:
    from databases import reset_postgres

    runner = CliRunner()
    reset_postgres(postgres_database)
    upgrade = runner.invoke(app, ["catalog", "upgrade", "--catalog-url", postgres_database])
    assert upgrade.exit_code == 0, upgrade.output
    malformed_total = 0
    try:
        for make, count in _FUZZ:
            for seed in _FUZZ_SEEDS:
                url, expected = make(tmp_path, seed, count)
                valid = _valid_rows(url, expected)
                _write_images(valid, tmp_path)
                malformed_total += len(expected.malformed)
                rows = len(expected.valid) + len(expected.malformed)
                jobs = _jobs_of(valid)
                name = Path(url).name

                checked = runner.invoke(app, ["validate", url, "--model", "tiny-t2v", "--json"])
                assert checked.exception is None or isinstance(checked.exception, SystemExit), (
                    name, checked.exception, checked.output[-2000:])  # fmt: skip
                assert checked.exit_code == 1, (name, checked.output[-2000:])
                doc = json.loads(checked.stdout)
                assert (doc["rows"], doc["invalid"], doc["valid"], doc["jobs"]) == (
                    rows, len(expected.malformed), len(expected.valid), jobs), name  # fmt: skip
                named: dict[int, set[str | None]] = {}
                for problem in doc["problems"]:
                    named.setdefault(problem["line"], set()).add(problem["field"])
                assert set(named) == set(expected.malformed), (
                    name, sorted(set(named) ^ set(expected.malformed))[:10])  # fmt: skip
                for line, fields in expected.malformed.items():
                    assert fields & named[line], (name, line, fields, named[line])

                # The same, as a person reads it: one line per problem, naming the file and the line.
                text = runner.invoke(app, ["validate", url, "--model", "tiny-t2v"])
                assert text.exception is None or isinstance(text.exception, SystemExit), name
                unit = "row" if url.endswith(".parquet") else "line"
                said = {int(n) for n in re.findall(rf"{re.escape(name)} {unit} (\d+)\b", text.stderr)}
                assert said == set(expected.malformed), (name, sorted(said ^ set(expected.malformed))[:10])

                plan = runner.invoke(app, [
                    "generate", url, "--model", "tiny-t2v", "--skip-invalid", "--dry-run", "--json",
                    "--catalog-url", postgres_database, "--out", str(tmp_path / "videos"),
                ])  # fmt: skip
                assert plan.exception is None or isinstance(plan.exception, SystemExit), (
                    name, plan.exception, plan.output[-2000:])  # fmt: skip
                assert plan.exit_code == 0, (name, plan.output[-2000:])
                planned = json.loads(plan.stdout)
                assert (planned["rows"], planned["invalid"], planned["jobs"]) == (
                    rows, len(expected.malformed), jobs), name  # fmt: skip
                assert planned["already_done"] == 0 and planned["to_generate"] == jobs
                assert f"{len(expected.malformed)} invalid rows would be left out" in plan.stderr
                for result in (checked, text, plan):
                    assert "Traceback" not in result.output, (name, result.output[-3000:])
        assert malformed_total >= 1000, malformed_total
    finally:
        reset_postgres(postgres_database)
