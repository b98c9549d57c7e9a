"""Chaos: `wanflow generate` killed with SIGKILL at a random moment, then run again; is the record whole?

    python benchmarks/chaos.py                      # 20 trials
    python benchmarks/chaos.py --trials 5 --seed 3 --postgres-url postgresql://postgres@127.0.0.1:5432/postgres

Everything is real: a moto S3 server on 127.0.0.1 started here, a throwaway PostgreSQL database (created on
the server of `--postgres-url`, dropped at the end), one local Prefect server for all trials (one
`PREFECT_HOME`, started once before the first trial, as `wanflow generate` would start it) and the
`wanflow` command itself as a subprocess, with the tiny random-weight model.

Each trial has a storage root of its own (`s3://chaos/trial-NNN`) and a manifest of 3 rows x 2 seeds
(2 sampling steps, 5 frames of 64x48). It starts `wanflow generate`, waits for an anchor and sends SIGKILL
to its process group (the command and its ffmpeg encoders; the Prefect server lives in a session of its
own). A trial's re-run overlaps the next trial's killed run (two commands at a time, on two roots, sharing
the catalog, the bucket and the Prefect server as concurrent runs do; `--one-at-a-time` to not). Anchors
take turns, their parameters drawn from a seeded random generator:

- `start`: 0 to 6 s after the command started (imports, validation, Prefect, planning: the kill often lands
  before the run has a catalog row);
- `planned`: 0 to 6 s after the run's catalog row appeared (model load, first jobs);
- `upload`: as soon as the n-th multipart upload under the root is seen (n from 1 to the job count);
- `output`: 0 to 1.5 s after the n-th output row appeared (between jobs, or in the next job's upload);
- `sheet`: as soon as the run's contact sheet is stored (the run then writes its last Prefect artifact and
  finishes: the kill lands just before or just after the run ends in the catalog).

Videos of the tiny model are about 8 KB, so S3 uploads are made multipart with a 2 KiB part size
(`WANFLOW_S3_PART_SIZE`; moto's `S3_UPLOAD_PART_MIN_SIZE` is lowered to match): every video goes through an
upload that a kill can leave open. moto is also made to tell when an upload began (`moto_patches`): it says
2010 for all, which would let the planner's age-based clean-up end every upload and hide leaks. The same
command then runs again to completion, and the record is checked:

- every (row, seed) of the manifest has exactly one job under the root, succeeded, with exactly one output
  row and one video object (else it counts as duplicated, or unfinished);
- every output verifies: the object has the recorded size and sha256 (`storage.outputs.verifier`);
- no object under the root lacks a catalog row (outputs, thumbnails, posters, sidecars). Allowed: each run's
  `contact_sheet.webp` (written at the end of a run that made videos; the catalog keeps no row for it) and
  `_manifests/` (split large manifests; none here);
- no multipart upload is open under the root (and, after the last trial, none anywhere in the bucket);
- the killed run is marked `crashed` when its catalog row was still pending or running at the kill (a kill
  before the row existed leaves no run to mark: counted apart);
- no Prefect flow run of the trial is left unfinished (the killed batch and the shard subflows that ran in
  its process show Crashed), nor any of their task runs; a batch flow run killed before its catalog row
  existed is found by its owner tag and crashed too (counted apart as well, to see how often it happens).

Open uploads seen right after a kill tell a kill during an upload. Prints a line per trial on standard
error, then one JSON object. `tests/test_chaos.py` runs the same trials (fewer) on the test fixtures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ANCHORS = ("upload", "start", "output", "planned", "sheet")
PART_SIZE = 2048  # bytes: a tiny-model video is several parts
BUCKET = "chaos"
MODEL = "tiny-t2v"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
}  # fmt: skip
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PROMPTS = ("a red fox runs through fresh snow", "koi circling in a clear pond", "two cats boxing on a stage")
UNFINISHED = ("pending", "running")


@dataclass
class Setup:
    """Where the trials run: the catalog, the S3 server and bucket, the Prefect home, a scratch folder."""

    catalog_url: str
    s3_port: int
    prefect_home: Path
    workdir: Path
    bucket: str = BUCKET
    rows: int = 3
    seeds: int = 2
    steps: int = 2
    frame_num: int = 5
    part_size: int = PART_SIZE
    rerun_timeout_s: float = 300.0
    anchor_timeout_s: float = 180.0
    anchors: tuple[str, ...] = ANCHORS  # taken in turn

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The command's environment: this one without Prefect, wanflow or AWS settings, plus the trial's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WANFLOW_", "AWS_"))}
        env.update(CREDENTIALS)
        env.update(
            PREFECT_HOME=str(self.prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANFLOW_S3_ENDPOINT_URL=self.endpoint,
            WANFLOW_S3_PART_SIZE=str(self.part_size), PYTHONUNBUFFERED="1",
        )  # fmt: skip
        return env

    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip

    def s3(self) -> Any:
        import boto3

        # A session of its own: boto3's default session is not safe to share between threads.
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


@dataclass
class Trial:
    """One kill and re-run, and what the record looked like afterwards."""

    index: int
    root: str
    anchor: str
    anchor_n: int
    delay_s: float
    log: str
    reached_anchor: bool = False
    killed: bool = False  # the signal found the command still running
    victim_rc: int | None = None  # the command's exit status when it ended before the kill
    kill_at_s: float | None = None  # seconds after the command started
    open_uploads_at_kill: int = 0
    killed_run: str | None = None
    killed_run_status_at_kill: str | None = None
    killed_run_status: str | None = None
    rerun_rc: int | None = None
    rerun_s: float = 0.0
    rerun_timed_out: bool = False
    jobs_expected: int = 0
    jobs: int = 0
    duplicated: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    unexpected_jobs: list[str] = field(default_factory=list)
    failed_verification: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    allowed_extras: list[str] = field(default_factory=list)
    open_uploads_after: list[str] = field(default_factory=list)
    prefect_left_running: list[str] = field(default_factory=list)  # flow runs not final after the re-run
    prefect_runs_without_row: list[str] = field(default_factory=list)  # ... of a batch killed before its row
    prefect_tasks_left_running: list[str] = field(default_factory=list)  # task runs of the trial's flow runs
    rerun_tail: str = ""

    @property
    def during_upload(self) -> bool:
        return self.killed and self.open_uploads_at_kill > 0

    @property
    def no_run_row(self) -> bool:
        return self.killed and self.killed_run is None

    @property
    def crash_expected(self) -> bool:
        return self.killed and self.killed_run_status_at_kill in UNFINISHED

    @property
    def marked_crashed(self) -> bool:
        return self.crash_expected and self.killed_run_status == "crashed"

    def problems(self) -> list[str]:
        """What is wrong with the record after the re-run (empty: nothing)."""
        where = f"trial {self.index} ({self.anchor}, killed at {self.kill_at_s}s)"
        found = []
        if self.victim_rc:
            found.append(f"{where}: the command to kill failed by itself (exit {self.victim_rc})")
        if self.rerun_timed_out:
            found.append(f"{where}: the re-run hung (killed after {self.rerun_s:.0f} s)")
        elif self.rerun_rc != 0:
            found.append(f"{where}: the re-run exited {self.rerun_rc}:\n{self.rerun_tail}")
        for name, items in (("duplicated", self.duplicated), ("unfinished", self.unfinished),
                            ("unexpected jobs", self.unexpected_jobs),
                            ("failing verification", self.failed_verification),
                            ("orphan objects", self.orphans),
                            ("open uploads after the re-run", self.open_uploads_after),
                            ("Prefect flow runs left running", self.prefect_left_running),
                            ("Prefect flow runs without a catalog run left running",
                             self.prefect_runs_without_row),
                            ("Prefect task runs left running", self.prefect_tasks_left_running)):  # fmt: skip
            if items:
                found.append(f"{where}: {name}: {items}")
        if self.jobs != self.jobs_expected:
            found.append(f"{where}: {self.jobs} jobs under the root, expected {self.jobs_expected}")
        if self.crash_expected and not self.marked_crashed:
            found.append(f"{where}: killed run {self.killed_run} is {self.killed_run_status}, not crashed")
        return found


# ------------------------------------------------------------------------------------------- a trial


def write_manifest(path: Path, setup: Setup, index: int) -> list[tuple[str, int]]:
    """A manifest of `setup.rows` rows x `setup.seeds` seeds; returns its (item, seed) jobs."""
    jobs, lines = [], []
    for r in range(setup.rows):
        item, seed = f"item{r}", 1000 * index + 10 * r
        lines.append(json.dumps({"item_id": item, "prompt": PROMPTS[r % len(PROMPTS)], "seed": seed,
                                 "num_seeds": setup.seeds, "steps": setup.steps,
                                 "frame_num": setup.frame_num}))  # fmt: skip
        jobs += [(item, seed + k) for k in range(setup.seeds)]
    path.write_text("\n".join(lines) + "\n")
    return jobs


def wanflow_command(manifest: Path, root: str, catalog_url: str) -> list[str]:
    exe = Path(sys.executable).with_name("wanflow")
    head = [str(exe)] if exe.exists() else [sys.executable, "-c", "from flows.cli import main; main()"]
    return [*head, "generate", str(manifest), "--model", MODEL, "--out", root, "--catalog-url", catalog_url]


def _owned_by(owner: str | None, pid: int) -> bool:
    host, _, rest = (owner or "").partition(":")
    return host == socket.gethostname() and rest.split(":")[0] == str(pid)


class _Watch:
    """What the catalog and the bucket show of one trial, looked at while the command runs."""

    def __init__(self, setup: Setup, catalog: Any, root: str) -> None:
        self.setup, self.catalog, self.root = setup, catalog, root
        self.prefix = root.removeprefix(f"s3://{setup.bucket}/").rstrip("/") + "/"
        self.s3 = setup.s3()
        self.uploads_seen: set[str] = set()

    def open_uploads(self) -> list[dict[str, Any]]:
        """The multipart uploads open under the trial's root."""
        uploads: list[dict[str, Any]] = []
        query = {"Bucket": self.setup.bucket, "Prefix": self.prefix}
        while True:
            page = self.s3.list_multipart_uploads(**query)
            uploads += page.get("Uploads") or []
            if not page.get("IsTruncated"):
                return uploads
            query.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def runs_of(self, pid: int) -> list[Any]:
        from sqlalchemy import select

        from storage.catalog import Run

        with self.catalog.engine.connect() as conn:
            rows = conn.execute(select(Run.id, Run.name, Run.status, Run.owner)).all()
        return [row for row in rows if _owned_by(row.owner, pid)]

    def outputs(self) -> int:
        from sqlalchemy import func, select

        from storage.catalog import Job, Output

        query = select(func.count()).select_from(Output).join(Job, Job.id == Output.job_id)
        with self.catalog.engine.connect() as conn:
            return int(conn.execute(query.where(Job.storage_root == self.root)).scalar_one())

    def reached(self, anchor: str, n: int, pid: int) -> bool:
        if anchor == "start":
            return True
        if anchor == "planned":
            return bool(self.runs_of(pid))
        if anchor == "output":
            return self.outputs() >= n
        if anchor == "sheet":
            keys = _objects(self.s3, self.setup.bucket, self.prefix)
            return any(key.endswith("/contact_sheet.webp") for key in keys)
        self.uploads_seen.update(u["UploadId"] for u in self.open_uploads())
        return len(self.uploads_seen) >= n


def _end_group(process: subprocess.Popen) -> None:
    """SIGKILL the command's process group (it leads one: started in a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _kill_at_anchor(process: subprocess.Popen, watch: _Watch, trial: Trial, deadline: float) -> None:
    """Wait for the trial's anchor, then its delay, then SIGKILL the command (if it still runs)."""
    start = time.monotonic()
    poll = 0.02 if trial.anchor in ("upload", "sheet") else 0.1  # each look costs CPU the command could use
    while process.poll() is None and time.monotonic() < deadline:
        if watch.reached(trial.anchor, trial.anchor_n, process.pid):
            trial.reached_anchor = True
            break
        time.sleep(poll)
    if trial.reached_anchor:
        until = time.monotonic() + trial.delay_s
        while process.poll() is None and time.monotonic() < until:
            time.sleep(min(0.02, max(until - time.monotonic(), 0)))
    if process.poll() is None:
        _end_group(process)
        trial.killed = True
        trial.kill_at_s = round(time.monotonic() - start, 2)
    rc = process.wait()
    if not trial.killed:
        trial.victim_rc = rc


@dataclass
class _Killed:
    """A trial after its kill, ready for its re-run."""

    trial: Trial
    command: list[str]
    expected: list[tuple[str, int]]
    killed_runs: list[Any]


def kill_phase(setup: Setup, index: int, rng: random.Random) -> _Killed:
    """Start trial `index`'s `wanflow generate` and SIGKILL it at the trial's anchor; note what it left."""
    from storage.catalog import Catalog

    root_key = f"trial-{index:03d}"
    root = f"s3://{setup.bucket}/{root_key}"
    manifest = setup.workdir / f"{root_key}.jsonl"
    expected = write_manifest(manifest, setup, index)
    anchor = setup.anchors[index % len(setup.anchors)]
    n = rng.randint(1, len(expected))
    delay = {"start": rng.uniform(0, 6), "planned": rng.uniform(0, 6), "upload": 0.0,
             "output": rng.uniform(0, 1.5), "sheet": 0.0}[anchor]  # fmt: skip
    log = setup.workdir / f"{root_key}.log"
    trial = Trial(index, root, anchor, n, round(delay, 2), str(log), jobs_expected=len(expected))
    command = wanflow_command(manifest, root, setup.catalog_url)
    with Catalog(setup.catalog_url) as catalog, log.open("ab") as out:
        watch = _Watch(setup, catalog, root)
        out.write(b"--- chaos: the run to kill ---\n")
        out.flush()
        victim = subprocess.Popen(command, env=setup.env(), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            _kill_at_anchor(victim, watch, trial, time.monotonic() + setup.anchor_timeout_s)
        finally:
            _end_group(victim)
            victim.wait()
        trial.open_uploads_at_kill = len(watch.open_uploads())
        killed_runs = watch.runs_of(victim.pid)
    if killed_runs:
        trial.killed_run = killed_runs[-1].name
        trial.killed_run_status_at_kill = _status(killed_runs[-1].status)
    return _Killed(trial, command, expected, killed_runs)


def rerun_phase(setup: Setup, killed: _Killed) -> Trial:
    """Run the killed trial's command again to its end, then check the record."""
    from storage.catalog import Catalog

    trial = killed.trial
    log = Path(trial.log)
    with log.open("ab") as out:
        out.write(b"\n--- chaos: the re-run ---\n")
        out.flush()
        start = time.monotonic()
        rerun = subprocess.Popen(killed.command, env=setup.env(), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            trial.rerun_rc = rerun.wait(timeout=setup.rerun_timeout_s)
        except subprocess.TimeoutExpired:
            trial.rerun_timed_out = True
        finally:
            _end_group(rerun)
            rerun.wait()
        trial.rerun_s = round(time.monotonic() - start, 2)
    if trial.rerun_rc != 0:
        trial.rerun_tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    with Catalog(setup.catalog_url) as catalog:
        check_record(setup, catalog, _Watch(setup, catalog, trial.root), trial, killed.expected,
                     killed.killed_runs)  # fmt: skip
    return trial


def run_trial(setup: Setup, index: int, rng: random.Random) -> Trial:
    """One trial: start `wanflow generate`, SIGKILL it at the trial's anchor, run it again to its end, check
    the record."""
    return rerun_phase(setup, kill_phase(setup, index, rng))


# --------------------------------------------------------------------------------------- the checks


def check_record(
    setup: Setup, catalog: Any, watch: _Watch, trial: Trial, expected: list[tuple[str, int]],
    killed_runs: list[Any],
) -> None:  # fmt: skip
    """Fill in `trial`'s findings: jobs, outputs and their verification, orphan objects, open uploads, and
    the killed run's status."""
    from sqlalchemy import select

    from storage.catalog import Job, Run
    from storage.layout import safe_name
    from storage.outputs import verifier

    with catalog.engine.connect() as conn:
        jobs = conn.execute(
            select(Job.id, Job.item_id, Job.seed, Job.status).where(Job.storage_root == trial.root)
        ).all()
        runs = {row.id: row for row in conn.execute(select(Run.id, Run.name, Run.status)).all()}
    trial.jobs = len(jobs)
    by_job = {o.job_id: o for o in catalog.outputs() if o.job_id is not None}
    outputs = [by_job[j.id] for j in jobs if j.id in by_job]
    objects = _objects(watch.s3, setup.bucket, watch.prefix)
    videos = Counter(key.rsplit("/", 1)[-1] for key in objects if key.endswith(".mp4"))
    pairs: dict[tuple[str, int], list[Any]] = {}
    for job in jobs:
        pairs.setdefault((job.item_id, int(job.seed)), []).append(job)
    for item, seed in expected:
        found = pairs.pop((item, seed), [])
        name = f"{item}-s{seed}"
        done = [j for j in found if _status(j.status) == "succeeded" and j.id in by_job]
        if len(found) > 1 or videos.get(f"{name}.mp4", 0) > 1:
            trial.duplicated.append(f"{name}: {len(found)} jobs, {videos.get(f'{name}.mp4', 0)} videos")
        elif len(done) != 1:
            status = [_status(j.status) for j in found]
            trial.unfinished.append(f"{name}: {status or 'no job'}")
    trial.unexpected_jobs = [f"{item}-s{seed}" for item, seed in pairs]
    verify = verifier(setup.storage_options())
    trial.failed_verification = [o.uri for o in outputs if not verify(o)]
    known = {
        uri.removeprefix(f"s3://{setup.bucket}/")
        for o in outputs for uri in (o.uri, o.thumbnail_uri, o.poster_uri, o.sidecar_uri) if uri
    }  # fmt: skip
    sheets = {f"{watch.prefix}{safe_name(r.name, what='run name')}/contact_sheet.webp" for r in runs.values()}
    for key in objects:
        if key in known:
            continue
        if key in sheets or key.startswith(f"{watch.prefix}_manifests/"):
            trial.allowed_extras.append(key)
        else:
            trial.orphans.append(key)
    trial.open_uploads_after = [f"{u['Key']} ({u['UploadId']})" for u in watch.open_uploads()]
    if killed_runs:
        trial.killed_run_status = _status(runs[killed_runs[-1].id].status)
    # This trial's flow runs: its batches (named after the manifest, trial-NNN) and their shards. A batch
    # killed after its flow run began but before its catalog row was made has no run to reap: counted apart.
    batch = f"batch-{watch.prefix.rstrip('/')}-"
    mine = [r for r in runs.values() if r.name.startswith(batch)]
    names = tuple([f"{r.name} " for r in mine] + [f"shard-{r.id}-" for r in mine])
    left = unfinished_flow_runs(setup.prefect_home)
    trial.prefect_left_running = [n for n in left if n.startswith(names) or n.startswith("(")]
    trial.prefect_runs_without_row = [n for n in left if n.startswith(batch) and not n.startswith(names)]
    trial.prefect_tasks_left_running = [
        f"{task} in {flow}" for task, flow in unfinished_task_runs(setup.prefect_home)
        if flow.startswith((*names, batch))
    ]  # fmt: skip


FINAL_STATES = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]


def _ask_prefect(prefect_home: Path, path: str, query: dict[str, Any]) -> list[dict[str, Any]] | None:
    """POST `query` to `path` of the local Prefect server of `prefect_home` (over HTTP: this process does not
    import Prefect); None when that server is gone."""
    from flows.local_server import local_server

    server = local_server(prefect_home)
    if server is None:
        return None
    request = urllib.request.Request(f"{server.url}{path}", data=json.dumps(query).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        return json.loads(response.read())


def unfinished_flow_runs(prefect_home: Path) -> list[str]:
    """Names of the flow runs that the local Prefect server of `prefect_home` shows as not yet final."""
    query = {"flow_runs": {"state": {"type": {"not_any_": FINAL_STATES}}}, "limit": 200}
    runs = _ask_prefect(prefect_home, "/flow_runs/filter", query)
    if runs is None:
        return ["(the local Prefect server is gone)"]
    return [f"{run['name']} ({run['state_type']})" for run in runs]


def unfinished_task_runs(prefect_home: Path) -> list[tuple[str, str]]:
    """(task run name, its flow run's name) of the task runs the local Prefect server shows as not final."""
    unfinished = ["SCHEDULED", "PENDING", "RUNNING"]
    query = {"task_runs": {"state": {"type": {"any_": unfinished}}}, "limit": 200}
    tasks = _ask_prefect(prefect_home, "/task_runs/filter", query) or []
    flow_ids = sorted({t["flow_run_id"] for t in tasks if t.get("flow_run_id")})
    query = {"flow_runs": {"id": {"any_": flow_ids}}, "limit": 200}
    flows = _ask_prefect(prefect_home, "/flow_runs/filter", query) if flow_ids else []
    names = {run["id"]: run["name"] for run in flows or []}
    return [(t["name"], names.get(t.get("flow_run_id"), "(no flow run)")) for t in tasks]


def _status(value: Any) -> str:
    """A status column's value (an enum member) as its text."""
    return str(getattr(value, "value", value))


def _objects(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents") or []]
    return keys


# ------------------------------------------------------------------------------------- many trials


def run_trials(
    setup: Setup, trials: int, seed: int = 0, *, echo: bool = True, overlap: bool = True
) -> list[Trial]:
    """`trials` trials on one local Prefect server (started first, stopped at the end).

    With `overlap`, a trial's re-run and checks go on in a thread while the next trial's command is started
    and killed (two commands at a time at most, each trial on its own root and manifest: they share the
    catalog, the bucket and the Prefect server, as concurrent runs do); else one trial after another.
    """
    from flows.local_server import ensure_local_server, stop_local_server

    rng = random.Random(seed)
    ensure_local_server(setup.prefect_home)

    def finish(killed: _Killed) -> Trial:
        trial = rerun_phase(setup, killed)
        if echo:
            print(describe(trial), file=sys.stderr, flush=True)
        return trial

    try:
        with ThreadPoolExecutor(max_workers=1) as reruns:
            futures = []
            for index in range(trials):
                killed = kill_phase(setup, index, rng)
                futures.append(reruns.submit(finish, killed))
                if not overlap:
                    futures[-1].result()
            return [future.result() for future in futures]
    finally:
        stop_local_server(setup.prefect_home)


def bucket_uploads(setup: Setup) -> list[str]:
    """Multipart uploads open anywhere in the bucket: '<key> (<upload id>)'."""
    s3, query, found = setup.s3(), {"Bucket": setup.bucket}, []
    while True:
        page = s3.list_multipart_uploads(**query)
        found += [f"{u['Key']} ({u['UploadId']})" for u in page.get("Uploads") or []]
        if not page.get("IsTruncated"):
            return found
        query.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])


def describe(trial: Trial) -> str:
    """One line about a trial."""
    if not trial.killed:
        kill = "finished before the kill"
    else:
        upload = f", {trial.open_uploads_at_kill} uploads open" if trial.during_upload else ""
        run = f"run {trial.killed_run_status_at_kill}" if trial.killed_run else "no run row yet"
        kill = f"killed at {trial.kill_at_s:.1f}s ({run}{upload})"
    problems = trial.problems()
    verdict = "ok" if not problems else f"{len(problems)} PROBLEMS"
    return (f"trial {trial.index:3d} {trial.anchor:>7} n={trial.anchor_n} +{trial.delay_s:.1f}s: {kill}; "
            f"re-run {trial.rerun_s:.1f}s: {verdict}")  # fmt: skip


def summarise(
    trials: list[Trial], seconds: float | None = None, uploads_in_bucket: list[str] | None = None
) -> dict[str, Any]:
    """The counts over all trials (`uploads_in_bucket`: `bucket_uploads` after the last one)."""
    return {
        "trials": len(trials),
        "killed": sum(t.killed for t in trials),
        "finished_before_kill": sum(not t.killed for t in trials),
        "kills_during_upload": sum(t.during_upload for t in trials),
        "uploads_open_at_kill": sum(t.open_uploads_at_kill for t in trials),
        "kills_before_run_row": sum(t.no_run_row for t in trials),
        "jobs": sum(t.jobs_expected for t in trials),
        "duplicated_jobs": sum(len(t.duplicated) for t in trials),
        "unfinished_jobs": sum(len(t.unfinished) for t in trials),
        "unexpected_jobs": sum(len(t.unexpected_jobs) for t in trials),
        "outputs_failing_verification": sum(len(t.failed_verification) for t in trials),
        "orphan_objects": sum(len(t.orphans) for t in trials),
        "contact_sheets": sum(len(t.allowed_extras) for t in trials),
        "open_uploads_after_rerun": sum(len(t.open_uploads_after) for t in trials),
        "prefect_flow_runs_left_running": sum(len(t.prefect_left_running) for t in trials),
        "prefect_orphan_flow_runs_left_running": sum(len(t.prefect_runs_without_row) for t in trials),
        "prefect_task_runs_left_running": sum(len(t.prefect_tasks_left_running) for t in trials),
        "runs_to_mark_crashed": sum(t.crash_expected for t in trials),
        "runs_marked_crashed": sum(t.marked_crashed for t in trials),
        "killed_runs_already_finished": sum(
            t.killed and t.killed_run_status_at_kill not in (None, *UNFINISHED) for t in trials
        ),
        "reruns_failed": sum(t.rerun_rc != 0 and not t.rerun_timed_out for t in trials),
        "reruns_hung": sum(t.rerun_timed_out for t in trials),
        "trials_with_problems": sum(bool(t.problems()) for t in trials),
        "anchors": dict(Counter(t.anchor for t in trials)),
        "rerun_seconds_median": sorted(t.rerun_s for t in trials)[len(trials) // 2] if trials else None,
        **({"seconds": round(seconds, 1)} if seconds is not None else {}),
        **({} if uploads_in_bucket is None else {"open_uploads_in_bucket_at_end": len(uploads_in_bucket)}),
    }


# --------------------------------------------------------------------------------- the benchmark


def moto_patches(part_size: int = PART_SIZE) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value) to set on this process's moto so that it behaves as S3 does in the trials:

    - parts of `part_size` bytes are taken (S3's minimum, which moto keeps too, is 5 MiB);
    - ListMultipartUploads says when each upload was started. moto answers a fixed date in 2010 for all,
      so every upload looks older than any timeout and the planner's age-based clean-up (`abort_open_uploads`
      with `older_than_s`) would abort them all, hiding uploads that only that clean-up would ever end.

    The test sets them with `monkeypatch.setattr`; the benchmark with `setattr`.
    """
    import moto.s3.models
    from moto.s3.models import FakeMultipart
    from moto.s3.responses import S3Response

    created, listed = FakeMultipart.__init__, S3Response.list_multipart_uploads

    def created_now(self: Any, *args: Any, **kwargs: Any) -> None:
        created(self, *args, **kwargs)
        self.wanflow_initiated = datetime.now(UTC)

    def listed_with_dates(self: Any) -> Any:
        status, headers, body = listed(self)
        uploads = self.backend.list_multipart_uploads(self.bucket_name)
        text = body.decode() if isinstance(body, bytes) else body

        def dated(match: re.Match) -> str:
            block = match.group(0)
            upload_id = re.search(r"<UploadId>([^<]*)</UploadId>", block)
            upload = uploads.get(upload_id.group(1)) if upload_id else None
            when = getattr(upload, "wanflow_initiated", None)
            if when is None:
                return block
            stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
            return re.sub(r"<Initiated>[^<]*</Initiated>", f"<Initiated>{stamp}</Initiated>", block)

        text = re.sub(r"<Upload>.*?</Upload>", dated, text, flags=re.S)
        return status, headers, text.encode() if isinstance(body, bytes) else text

    return [
        (moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", part_size),
        (FakeMultipart, "__init__", created_now),
        (S3Response, "list_multipart_uploads", listed_with_dates),
    ]


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """A moto S3 server in this process on 127.0.0.1 and a free port; yields the port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield port
    finally:
        server.stop()
        server._server.server_close()


@contextlib.contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    """A new database on the server of `admin_url`, dropped afterwards; yields its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"wanflow_chaos_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                          " AND pid <> pg_backend_pid()", (name,))  # fmt: skip
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--postgres-url", default=os.environ.get("WANFLOW_TEST_POSTGRES_URL", ADMIN_URL),
                        help="a server and a database to connect to; a new database is made there")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (manifests, logs)")
    parser.add_argument("--anchors", default=",".join(ANCHORS),
                        help=f"comma-separated, taken in turn: {', '.join(ANCHORS)}")  # fmt: skip
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="re-run each trial before starting the next (default: a re-run overlaps the "
                        "next trial's killed run)")  # fmt: skip
    args = parser.parse_args()
    anchors = tuple(a.strip() for a in args.anchors.split(",") if a.strip())
    if not anchors or set(anchors) - set(ANCHORS):
        parser.error(f"--anchors {args.anchors!r}: expected some of {', '.join(ANCHORS)}")
    from storage.catalog import Catalog

    work = Path(tempfile.mkdtemp(prefix="wanflow-chaos-"))
    for target, name, value in moto_patches():
        setattr(target, name, value)
    started = time.monotonic()
    try:
        with moto_server() as port, throwaway_database(args.postgres_url) as url:
            Catalog(url).upgrade()
            setup = Setup(url, port, work / "prefect", work, anchors=anchors)
            setup.s3().create_bucket(Bucket=setup.bucket)
            trials = run_trials(setup, args.trials, args.seed, overlap=not args.one_at_a_time)
            left_open = bucket_uploads(setup)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for trial in trials:
        for problem in trial.problems():
            print(problem, file=sys.stderr)
    for upload in left_open:
        print(f"open upload at the end: {upload}", file=sys.stderr)
    print(json.dumps(summarise(trials, time.monotonic() - started, left_open), sort_keys=True))
    if args.keep:
        (work / "trials.json").write_text(json.dumps([asdict(t) for t in trials], default=str, indent=1))
        print(f"kept {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
