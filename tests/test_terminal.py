"""What `wanflow generate` shows in a terminal: a run with one failing job, printed through a pseudo-terminal
into a terminal emulator (pyte), reads as one line for the failure, no traceback, the summary last; and the
pieces (rate and time left, which lines of Prefect's are left out, the summary's failed jobs) one by one."""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pyte
import pytest
from PIL import Image
from rich.console import Console

from flows.reporting import BatchFailed
from flows.terminal import RunProgress, _said_elsewhere, print_summary, quiet_prefect

WANFLOW = str(Path(sys.executable).with_name("wanflow"))
COLUMNS, LINES = 320, 400  # wide enough that no line wraps, tall enough that nothing scrolls off


def run_in_terminal(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 240
) -> tuple[int, list[str]]:
    """Run `argv` with a pseudo-terminal as stdin, stdout and stderr; returns its exit code and the screen
    a terminal of COLUMNS x LINES shows at the end (trailing blanks stripped)."""
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.ByteStream(screen)
    master, slave = pty.openpty()
    env = {**env, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(LINES)}
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed its side
                    break
                if not data:
                    break
                stream.feed(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{argv} ran past {timeout} s")
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return code, lines


@pytest.mark.integration
def test_a_run_with_one_bad_image_reads_well_in_a_terminal(tmp_path):
    """Before: the failure said three times (our line, Prefect's task line, the summary), Prefect's 20-line
    BatchFailed traceback through the bar, the telemetry notice at the top. Now: one line per failed job, no
    traceback, and the summary last with the Prefect UI's link to the run."""
    from flows.local_server import stop_local_server

    (tmp_path / "images").mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "images" / "red.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    fast = {"size": "64*48", "frame_num": 5, "steps": 2}
    rows = [
        {"item_id": "fox", "prompt": "a red fox runs through fresh snow", **fast},
        {"item_id": "red", "prompt": "a red scene", "model": "tiny-i2v", "image": "images/red.png", **fast},
        {"item_id": "broken", "prompt": "a broken picture", "model": "tiny-i2v", "image": "images/broken.png",
         **fast},
    ]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WANFLOW_", "DO_NOT_TRACK"))}
    env.update(PREFECT_HOME=str(home), WANFLOW_CATALOG_URL=f"sqlite:///{tmp_path / 'catalog.db'}")
    env.pop("CI", None)  # Prefect keeps its telemetry notice off on CI machines by itself: not what is tested
    try:
        code, screen = run_in_terminal([WANFLOW, "generate", "m.jsonl", "--model", "tiny-t2v", "--out",
                                        str(tmp_path / "out")], tmp_path, env)  # fmt: skip
    finally:
        stop_local_server(home)
    text = "\n".join(screen)
    assert code == 1, text
    assert "Traceback" not in text and "BatchFailed" not in text, text
    assert "anonymous usage data" not in text, text  # telemetry (and its notice) off for our commands
    assert sum("not a readable image" in line for line in screen) == 1, text  # one line for the failure
    broken = [line for line in screen if "broken-s" in line]
    assert len(broken) == 1 and broken[0].startswith("failed broken-s"), text
    bar = next(line for line in screen if line.startswith("batch-m-"))
    assert " 3/3 " in bar and "videos/" in bar, bar  # the bar ends full, with the rate
    # the summary last: the run's outcome, where the failed jobs are listed, the catalog, the Prefect UI
    tail = screen[-4:]
    assert tail[0].startswith("batch-m-") and ": failed: 2 made, 0 already done, 1 failed" in tail[0], text
    assert tail[1].startswith("failed jobs: wanflow catalog jobs --run batch-m-"), text
    assert tail[2].startswith("catalog: sqlite:///"), text
    assert tail[3].startswith("Prefect UI: http://127.0.0.1:") and "/runs/flow-run/" in tail[3], text
    assert not any(line.startswith(("ERROR", "WARNING")) or "| ERROR" in line for line in screen), text


def bar_text(progress: RunProgress) -> str:
    console = progress.console
    with console.capture() as capture:
        console.print(progress.progress.get_renderable())
    return capture.get()


def test_the_bar_shows_the_rate_the_time_left_and_the_job_in_flight(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("flows.terminal.time.monotonic", lambda: clock[0])
    console = Console(width=150, force_terminal=False, color_system=None)
    progress = RunProgress(console)
    progress.on_event({"event": "planned", "run_id": 1, "run_name": "batch-x", "total": 10})
    progress.on_event({"event": "started", "run_id": 1, "job_id": 1, "item_id": "fox", "seed": 3,
                       "attempt": 1})  # fmt: skip
    text = bar_text(progress)
    assert "batch-x" in text and "0/10" in text and "ETA -:--:--" in text and "fox-s3" in text, text
    for job_id in (1, 2):  # two jobs in 60 s: 2 videos/min, 8 left: 4 minutes
        clock[0] += 30
        progress.on_event({"run_id": 1, "job_id": job_id, "item_id": "fox", "seed": 3, "status": "succeeded"})
    text = bar_text(progress)
    assert "2/10" in text and "2.0 videos/min" in text and "ETA 0:04:00" in text, text
    assert "fox-s3" not in text, text  # no job in flight
    clock[0] += 60  # the next job takes longer than the pace so far: the time left goes down as time passes
    assert "ETA 0:03:00" in bar_text(progress)
    progress.on_event({"run_id": 1, "job_id": 3, "item_id": "owl", "seed": 1, "status": "failed",
                       "error": "BadImage: owl.png is not a readable image"})  # fmt: skip
    assert progress.said == {("owl", 1)}
    slow = RunProgress(console)
    slow.on_event({"event": "planned", "run_id": 2, "run_name": "batch-y", "total": 4})
    clock[0] += 600  # one video in 10 minutes
    slow.on_event({"run_id": 2, "job_id": 9, "item_id": "a", "seed": 0, "status": "succeeded"})
    assert "6.0 videos/h" in bar_text(slow) and "ETA 0:30:00" in bar_text(slow)


def record(message: str, level: int = logging.ERROR, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("prefect.task_runs", level, __file__, 1, message, None, None)
    rec.__dict__.update(extra)
    return rec


def test_prefect_lines_said_elsewhere_are_left_out():
    job_failed = record("Finished in state Failed('BadImage ...')", task_name="generate_job")
    assert _said_elsewhere(job_failed, verbose=False) and not _said_elsewhere(job_failed, verbose=True)
    retry = record("retrying fox-s1 (attempt 2/3): OSError", logging.WARNING, wanflow_event=True)
    assert _said_elsewhere(retry, verbose=False)
    assert _said_elsewhere(record("Crash detected! Execution was aborted by an interrupt signal."), False)
    summary = {"run_name": "r", "jobs": 1, "by_status": {"failed": 1, "pending": 0, "running": 0}}
    try:
        raise BatchFailed(summary)
    except BatchFailed:
        batch = record("Encountered exception during execution: BatchFailed(...)", exc_info=sys.exc_info())
    assert _said_elsewhere(batch, verbose=False) and _said_elsewhere(batch, verbose=True)
    other = record("Flow run could not reach the API", logging.WARNING, flow_run_name="batch-x")
    assert not _said_elsewhere(other, verbose=False)


def summary(**over) -> dict:
    base = {
        "run_id": 1, "run_name": "batch-x", "status": "failed", "jobs": 3, "rejected": 0, "outputs": 2,
        "by_status": {"succeeded": 2, "skipped": 0, "failed": 1, "pending": 0, "running": 0},
        "output_bytes": 2_000_000, "seconds": 12.0, "storage_root": "/videos", "catalog": "sqlite:///c.db",
        "failed": [{"item": "owl", "seed": 1, "error": "BadImage: owl.png is not a readable image"}],
        "failure_reasons": [{"error": "BadImage: owl.png is not a readable image", "jobs": 1}],
        "prefect_ui": "http://127.0.0.1:4200/runs/flow-run/abc",
    }  # fmt: skip
    return {**base, **over}


def printed(summary: dict, said=None) -> list[str]:
    console = Console(width=200, color_system=None)
    with console.capture() as capture:
        print_summary(console, summary, said)
    return capture.get().splitlines()


def test_the_summary_lists_only_failures_not_said_above_and_ends_with_where_to_look():
    said_above = printed(summary(), said={("owl", 1)})
    assert not any("not a readable image" in line for line in said_above)
    assert said_above[0].startswith("batch-x: failed: 2 made, 0 already done, 1 failed; 2 verified videos")
    assert said_above[1:] == ["failed jobs: wanflow catalog jobs --run batch-x --status failed",
                              "catalog: sqlite:///c.db (wanflow catalog outputs --run batch-x)",
                              "Prefect UI: http://127.0.0.1:4200/runs/flow-run/abc"]  # fmt: skip
    unsaid = printed(summary())  # --json-less output of a run whose failures happened on other machines
    assert unsaid[:2] == ["1 failed: BadImage: owl.png is not a readable image",
                          "  failed owl-s1: BadImage: owl.png is not a readable image"]  # fmt: skip
    many = [{"item": f"i{n}", "seed": 0, "error": "E"} for n in range(25)]
    lines = printed(summary(failed=many, failure_reasons=[{"error": "E", "jobs": 25}]))
    assert sum(line.startswith("  failed i") for line in lines) == 20 and "  ... and 5 more" in lines


def test_prefect_telemetry_is_off_unless_the_user_turned_it_on(monkeypatch):
    for name in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    quiet_prefect(verbose=False)
    assert os.environ["DO_NOT_TRACK"] == "1" and os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    monkeypatch.delenv("DO_NOT_TRACK")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")  # the user's choice stands
    quiet_prefect(verbose=False)
    assert "DO_NOT_TRACK" not in os.environ and os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"

