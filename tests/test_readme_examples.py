"""The README's commands, run as users run them, so the docs cannot drift from the code.

Every command of README.md's fenced shell blocks that runs `wanflow` or `wan.generate` (tests/
readme_commands.py finds them: continuations joined, the block's variables such as `M="--model ..."`
expanded) is either run here or listed in SKIPPED with the reason; a new README command that is neither
fails `test_every_readme_command_is_run_or_skipped_with_a_reason`. The other shell lines (make, infra/
scripts, benchmarks) must match OTHER_COMMANDS, so a new spelling of our commands cannot slip past.

`test_readme_commands_run` runs them in README order, each as a subprocess of the venv's `wanflow` or
`python -m wan.generate` (PROGRAMS), in one temporary working directory that holds what the commands name
(`prompts.jsonl` with tiny ROWS, the IMAGES, tiny random-weight CHECKPOINTS in the official layout under the
README's checkpoint directory names), with its own PREFECT_HOME (one local Prefect server shared by every
command, stopped at the end), a SQLite catalog and a storage root there, and these stand-ins, all listed
in SUBSTITUTIONS: real models become the tiny presets (with the checkpoints written here), sizes the tiny
ones, `postgresql+psycopg://...` the test PostgreSQL database (tests/databases.py; a SQLite file when no
server runs), and the placeholders `nightly` and `42` the run and job the commands before made. `s3://bucket/`
runs unchanged against moto's S3 server on 127.0.0.1, which has a bucket named `bucket`. Each command must
exit 0; a comment that documents another exit code ("exit 1 if any") is checked too, by running the command
again once the manifest has a bad row. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import s3fs
from readme_commands import Command, commands
from s3_server import s3_options

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BUCKET = "bucket"  # the README's own bucket name, created on the moto server

# ------------------------------------------------------------------------------------------- the tables

# README command (its words, from the start) -> why it is not run here.
SKIPPED: dict[str, str] = {
    "torchrun --nproc_per_node 8 -m wan.generate": (
        "eight processes (Ulysses 4 x CFG 2, ZeRO-3) of the 14B model: too many for 2 CPU cores; the same "
        "flags run under torchrun on the tiny presets in tests/test_parallel_generate.py"
    ),
}

# Shell lines that run neither `wanflow` nor `wan.generate` (regex on the words) -> where they are tested.
OTHER_COMMANDS: dict[str, str] = {
    r"make test": "runs ruff and the suite, this file included",
    r"make demo": "runs `wanflow demo`: 30 tiny videos, about 40 s, more than this file's time budget",
    r"infra/[\w-]+\.sh": "operations scripts: tests/test_integration_prefect.py runs all but start-server",
    r"prefect deployment run .*": "needs the deployed pools and workers: tests/test_integration_prefect.py",
    r"\.venv/bin/python benchmarks/\w+\.py.*": (
        "benchmarks, minutes at full size: tests/test_benchmarks.py runs the GPU ones and orchestration.py "
        "on reduced shapes"
    ),
}


@dataclass(frozen=True)
class Substitution:
    """Consecutive words of a README command replaced by others; `{name}` fields are filled at run time
    (see `_placeholders`)."""

    readme: str
    here: str
    why: str


TINY_CHECKPOINT = (
    "no real weights here: the tiny preset, on a tiny random-weight checkpoint in the official layout "
    "written under the README's directory name (CHECKPOINTS)"
)
SUBSTITUTIONS: list[Substitution] = [
    Substitution("--model t2v-1.3B", "--model tiny-t2v", TINY_CHECKPOINT),
    Substitution("--task t2v-1.3B", "--task tiny-t2v", TINY_CHECKPOINT),
    Substitution("--task i2v-14B-480P", "--task tiny-i2v", TINY_CHECKPOINT),
    Substitution("--task flf2v-14B", "--task tiny-flf2v", TINY_CHECKPOINT),
    Substitution("--size 832*480", "--size 64*48", "a tiny preset size (landscape, as 832*480 is)"),
    Substitution("--size 1280*720", "--size 64*48", "a tiny preset size (landscape, as 1280*720 is)"),
    Substitution("postgresql+psycopg://wanflow@db/wanflow", "{postgres}",
                 "the test PostgreSQL database (tests/databases.py); a SQLite file when no server runs"),
    Substitution("--run nightly", "--run {run}",
                 "`nightly` stands for a run's name: the run the README's `--skip-invalid` command made"),
    Substitution("show 42", "show {job}", "`42` stands for a job id: a job of that run"),
]  # fmt: skip

# The programs as the README spells them -> what runs them here.
PROGRAMS: dict[str, list[str]] = {
    "wanflow": [str(Path(sys.executable).with_name("wanflow"))],
    ".venv/bin/wanflow": [str(Path(sys.executable).with_name("wanflow"))],
    "python": [sys.executable],
    "python3": [sys.executable],
    ".venv/bin/python": [sys.executable],
}

# The rows of the manifest the commands name: tiny, so that each job takes about a second.
TINY_ROW = {"size": "64*48", "frame_num": 5, "steps": 2}
ROWS = [
    {"item_id": "fox-snow", "prompt": "a red fox runs through fresh snow at dawn", **TINY_ROW},
    {"item_id": "koi", "prompt": "koi circling in a clear pond", **TINY_ROW},
]
BAD_ROW = {"item_id": "cats", "prompt": "two cats boxing on a stage", "size": "50*48"}  # not a multiple of 16
# A command whose README words contain the key gets the manifest's bad row first (the README says it has
# bad rows to leave out).
BAD_ROW_BEFORE = "--skip-invalid"

# README checkpoint directory -> the tiny preset written there in the official layout.
CHECKPOINTS = {
    "Wan2.1-T2V-1.3B": "tiny-t2v",
    "Wan2.1-I2V-14B-480P": "tiny-i2v",
    "Wan2.1-FLF2V-14B-720P": "tiny-flf2v",
}
IMAGES = {"cat.jpg": (96, 64), "dawn.png": (96, 64), "dusk.png": (64, 96)}


# ----------------------------------------------------------------------------------------------- helpers


def readme_commands() -> list[Command]:
    """The README's `wanflow` and `wan.generate` commands."""
    return [c for c in commands(README.read_text()) if c.kind != "other"]


def _skip_reason(command: Command) -> str | None:
    for prefix, reason in SKIPPED.items():
        if command.text.startswith(prefix):
            return reason
    return None


def _substitute(argv: list[str], values: dict[str, str] | None = None) -> tuple[list[str], set[int]]:
    """The command's words with SUBSTITUTIONS applied; the indexes of the substitutions used."""
    words = list(argv)
    used: set[int] = set()
    for n, sub in enumerate(SUBSTITUTIONS):
        old, new = sub.readme.split(), sub.here.split()
        if values is not None:
            new = [word.format(**values) for word in new]
        i = 0
        while i <= len(words) - len(old):
            if words[i : i + len(old)] == old:
                words[i : i + len(old)] = new
                used.add(n)
                i += len(new)
            else:
                i += 1
    return words, used


def _program(argv: list[str]) -> list[str]:
    if argv[0] not in PROGRAMS:
        raise AssertionError(f"no PROGRAMS entry for {argv[0]!r}: add how it runs here")
    return [*PROGRAMS[argv[0]], *argv[1:]]


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_files(work: Path) -> None:
    """What the README's commands name: the manifest, the images, the checkpoint directories."""
    from PIL import Image
    from twins import write_official

    from wan.pipeline import WanPipeline

    _write_manifest(work / "prompts.jsonl", ROWS)
    for name, (width, height) in IMAGES.items():
        Image.new("RGB", (width, height), (200, 90, 40)).save(work / name)
    for directory, preset in CHECKPOINTS.items():
        write_official(WanPipeline.from_config(preset, seed=0, device="cpu"), work / directory)


def _env(work: Path, moto_port: int) -> dict[str, str]:
    """The user's shell, reduced to ours: no Prefect API or wanflow or AWS settings of this machine; a
    PREFECT_HOME, catalog and storage root in the working directory; moto as the S3 endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WANFLOW_", "AWS_"))}
    env.update(
        PREFECT_HOME=str(work / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        WANFLOW_CATALOG_URL=f"sqlite:///{work / '.wanflow' / 'catalog.db'}",
        WANFLOW_STORAGE_ROOT=str(work / "outputs"),
        WANFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{moto_port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _placeholders(work: Path, postgres: str) -> dict[str, str]:
    """The values of SUBSTITUTIONS' `{fields}`, read when a command needs them (the run and job exist only
    once the commands before have made them)."""
    from storage.catalog import Catalog

    values = {"postgres": postgres, "run": "(no run yet)", "job": "0"}
    database = work / ".wanflow" / "catalog.db"
    if database.exists():
        with Catalog(f"sqlite:///{database}") as catalog:
            runs = catalog.runs(limit=1)
            if runs:
                values["run"] = runs[0].name
                jobs = catalog.jobs(run_id=runs[0].id, limit=1)
                values["job"] = str(jobs[0].id) if jobs else "0"
    return values


def _documented_exit(command: Command) -> int | None:
    """The exit code the README's comment promises for a bad manifest ("exit 1 if any"), if it does."""
    said = re.search(r"\bexit (\d+) if any\b", command.comment)
    return int(said.group(1)) if said else None


# ------------------------------------------------------------------------------------------------- tests


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    """The README has commands, each is run or skipped with a reason, every table entry still matches the
    README (none stale), and every other shell line is one we know is tested elsewhere."""
    found = readme_commands()
    assert found, "no `wanflow` or `wan.generate` command found in README.md's shell blocks"
    assert {c.kind for c in found} == {"wanflow", "wan.generate"}
    for prefix in SKIPPED:
        assert any(c.text.startswith(prefix) for c in found), f"SKIPPED entry {prefix!r} matches no command"
    used: set[int] = set()
    for command in found:
        if _skip_reason(command) is None:
            assert command.argv[0] in PROGRAMS, f"README.md:{command.line}: no PROGRAMS entry: {command.text}"
            used |= _substitute(list(command.argv))[1]
    unused = [SUBSTITUTIONS[n].readme for n in range(len(SUBSTITUTIONS)) if n not in used]
    assert not unused, f"SUBSTITUTIONS entries that no README command uses: {unused}"
    others = [c for c in commands(README.read_text()) if c.kind == "other"]
    unknown = [f"README.md:{c.line}: {c.text}" for c in others
               if not any(re.fullmatch(p, c.text) for p in OTHER_COMMANDS)]  # fmt: skip
    assert not unknown, "neither run here nor known to be tested elsewhere:\n" + "\n".join(unknown)
    assert any(_documented_exit(c) is not None for c in found)  # the validate line's promise, checked below


def test_the_parser_reads_what_a_shell_would():
    text = "\n".join([
        "```bash",
        'M="--model tiny-t2v --ckpt-dir ./ck"',
        "wanflow validate p.jsonl $M   # exit 1 if any",
        "wanflow generate p.jsonl ${M} --seeds 2 \\",
        "    --out s3://b/v",
        "A=1 wanflow catalog runs && python -m wan.generate --prompt 'a # b'",
        "```",
        "```console",
        "$ wan-generate --task tiny-t2v",
        "output line",
        "```",
        "```python",
        "wanflow = 1",
        "```",
    ])  # fmt: skip
    found = commands(text)
    assert [c.argv for c in found] == [
        ("wanflow", "validate", "p.jsonl", "--model", "tiny-t2v", "--ckpt-dir", "./ck"),
        ("wanflow", "generate", "p.jsonl", "--model", "tiny-t2v", "--ckpt-dir", "./ck", "--seeds", "2",
         "--out", "s3://b/v"),
        ("wanflow", "catalog", "runs"),
        ("python", "-m", "wan.generate", "--prompt", "a # b"),
        ("wan-generate", "--task", "tiny-t2v"),
    ]  # fmt: skip
    assert found[0].comment == "exit 1 if any" and found[2].env == {"A": "1"}
    assert [c.kind for c in found] == ["wanflow"] * 3 + ["wan.generate"] * 2
    assert [c.line for c in found] == [3, 4, 6, 6, 9]


@pytest.fixture
def postgres_or_sqlite(request: pytest.FixtureRequest, tmp_path: Path):
    """The test PostgreSQL database (emptied afterwards, for the tests that follow), or a SQLite file when
    no server runs (unless WANFLOW_REQUIRE_POSTGRES=1, which fails instead)."""
    try:
        url = request.getfixturevalue("postgres_database")
    except pytest.skip.Exception as skipped:
        print(f"no PostgreSQL, a SQLite file stands in: {skipped}")
        yield f"sqlite:///{tmp_path / 'stand-in-for-postgres.db'}"
        return
    from databases import reset_postgres

    reset_postgres(url)
    yield url
    reset_postgres(url)


@pytest.fixture
def readme_bucket(moto_port: int) -> dict[str, Any]:
    """moto's S3 server, emptied, with the README's bucket; the s3fs options that reach it."""
    urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset", method="POST")
    )
    options = s3_options(moto_port)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    return options


@dataclass
class Ran:
    """One command as it ran here."""

    command: Command
    argv: list[str]  # after SUBSTITUTIONS
    wanted: int
    code: int
    seconds: float
    output: str  # stdout and stderr

    def __str__(self) -> str:
        verdict = "ok " if self.code == self.wanted else "BAD"
        return (f"{verdict} exit {self.code} (wanted {self.wanted}) {self.seconds:5.1f}s  "
                f"README.md:{self.command.line}: {shlex.join(self.argv)}")  # fmt: skip


@pytest.mark.slow
@pytest.mark.integration
def test_readme_commands_run(tmp_path: Path, moto_port: int, readme_bucket, postgres_or_sqlite: str):
    from test_local_server import _servers_of

    from flows.local_server import stop_local_server
    from storage.catalog import Catalog

    work = tmp_path / "work"
    work.mkdir()
    _write_files(work)
    env = _env(work, moto_port)
    ran: list[Ran] = []
    skipped: list[tuple[Command, str]] = []
    promised: list[tuple[Command, int]] = []  # commands whose README comment promises an exit code

    def run(command: Command, wanted: int) -> None:
        argv = _substitute(list(command.argv), _placeholders(work, postgres_or_sqlite))[0]
        start = time.monotonic()
        done = subprocess.run(
            _program(argv), cwd=work, env={**env, **command.env}, capture_output=True, text=True, timeout=300
        )
        ran.append(Ran(command, argv, wanted, done.returncode, time.monotonic() - start,
                       done.stdout + done.stderr))  # fmt: skip

    try:
        for command in readme_commands():
            reason = _skip_reason(command)
            if reason is not None:
                skipped.append((command, reason))
                continue
            if BAD_ROW_BEFORE in command.argv:
                _write_manifest(work / "prompts.jsonl", [*ROWS, BAD_ROW])
            run(command, 0)
            if _documented_exit(command) is not None:
                promised.append((command, _documented_exit(command)))
        assert promised and (work / "prompts.jsonl").read_text().count("\n") == len(ROWS) + 1
        for command, code in promised:  # the manifest has its bad row by now
            run(command, code)
    finally:
        stop_local_server(work / ".prefect")
        left = _servers_of(work / ".prefect")

    report = [*map(str, ran), *(f"skipped README.md:{c.line}: {c.text} ({why})" for c, why in skipped)]
    print("\n".join(report))
    failures = [f"{r}\n{r.output[-3000:]}" for r in ran if r.code != r.wanted]
    assert not failures, "\n\n".join(failures) + "\n\n" + "\n".join(report)
    assert not left, f"a `prefect server start` was left running: {left}"

    # What the commands say they did, they did.
    s3 = s3fs.S3FileSystem(**readme_bucket)
    videos = [p for p in s3.find(f"{BUCKET}/videos") if p.endswith(".mp4")]
    assert len(videos) == len(ROWS) * 2, videos  # --seeds 2
    with Catalog(postgres_or_sqlite) as catalog:  # that run's --catalog-url
        assert catalog.stats()["outputs"] == len(ROWS) * 2
    skip_invalid, keeping_latents = [" ".join(r.output.split()) for r in ran if BAD_ROW_BEFORE in r.argv]
    assert "succeeded: 2 made" in skip_invalid and "1 rows rejected" in skip_invalid, skip_invalid
    # The good rows, twice: "Making a training set" runs them again keeping their latents (new jobs).
    assert "succeeded: 2 made" in keeping_latents, keeping_latents
    assert len(list((work / "outputs").rglob("*.mp4"))) == len(ROWS) * 2
    assert len(list((work / "outputs").rglob("*.latents.safetensors"))) == len(ROWS)
    assert list((work / "datasets" / "train").glob("shard-*.tar"))  # the training set's export
    (refused,) = [r.output for r in ran if r.wanted != 0]
    assert "line 3" in refused and "size" in refused, refused  # "every bad row: line, field, reason"
    assert (work / "cats.mp4").exists() and (work / "cat.mp4").exists()
    assert list(work.glob("tiny-flf2v_*.mp4"))  # no --save_file: a name from task, size and seed
    assert s3.exists(f"{BUCKET}/datasets/nightly.parquet")
