"""What `wanflow generate` and `wanflow demo` show in a terminal while a run goes and when it ends.

- A progress bar fed by the run's job events (`flows.events`): jobs done of the run's total, the rate in
  videos per minute and the time left at that rate, and the job in flight (`RunProgress`).
- One line per failed job with its reason, and one per retry, printed above the bar as they happen.
- Prefect's own log lines printed above the bar too, never through it, less those the bar and the summary
  already say: a job task's failure and retry lines, the batch flow's `BatchFailed` traceback, one crash line
  per task for a Ctrl-C (`prefect_lines_above`; `-v` keeps them all, at INFO).
- The summary last (`print_summary`): what was made, what failed and why (the failed jobs not already said
  above), where the videos and the catalog are.

Prefect's anonymous-usage telemetry (and its first-run notice) is off for these commands unless the user
turned it on (`quiet_prefect`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

__all__ = ["RunProgress", "prefect_lines_above", "print_summary", "quiet_prefect"]

MAX_FAILED_LINES = 20  # failed jobs the summary lists one by one


def quiet_prefect(verbose: bool) -> None:
    """Before Prefect is imported: its telemetry off unless the user set `DO_NOT_TRACK` or
    `PREFECT_SERVER_ANALYTICS_ENABLED` themselves, and its console lines at WARNING unless `verbose` (the UI
    still gets every line)."""
    if "DO_NOT_TRACK" not in os.environ and "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ:
        os.environ["DO_NOT_TRACK"] = "1"  # the client's telemetry, and its first-run notice
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # the local server's
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


def job_name(event: dict[str, Any]) -> str:
    """A job as the terminal, the task runs and the objects name it: `<item>-s<seed>`."""
    return f"{event['item_id']}-s{event['seed']}"


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _seconds_per_job(task: Any) -> float | None:
    """The run's pace so far: seconds from planning to the last finished job, per finished job."""
    since, last = task.fields.get("since"), task.fields.get("last_done")
    if since is None or last is None or not task.completed:
        return None
    return max(last - since, 1e-6) / task.completed


class _RateColumn(ProgressColumn):
    """Videos per minute (per hour when under one a minute), from planning to the last finished job."""

    def render(self, task: Any) -> Text:
        pace = _seconds_per_job(task)
        if pace is None:
            return Text("")
        per_minute = 60.0 / pace
        text = f"{per_minute:.1f} videos/min" if per_minute >= 1 else f"{per_minute * 60:.1f} videos/h"
        return Text(text, style="progress.data.speed")


class _TimeLeftColumn(ProgressColumn):
    """The time the rest of the jobs take at the run's rate so far."""

    def render(self, task: Any) -> Text:
        if task.fields.get("since") is None or not task.total or task.completed >= task.total:
            return Text("")
        pace = _seconds_per_job(task)
        if pace is None:
            return Text("ETA -:--:--", style="progress.remaining")
        left = (task.total - task.completed) * pace - (time.monotonic() - task.fields["last_done"])
        return Text(f"ETA {_clock(max(left, 0.0))}", style="progress.remaining")


class RunProgress:
    """The progress bar of one run, fed by `on_event` (a `flows.events` listener); use as a context manager.
    `said` collects the (item, seed) of each failed job printed above the bar."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeElapsedColumn(), _TimeLeftColumn(), TextColumn("[cyan]{task.fields[job]}"),
            console=console, transient=False,
        )  # fmt: skip
        self.console = console
        self.task = self.progress.add_task("starting Prefect and planning", total=None, job="", since=None,
                                           last_done=None)  # fmt: skip
        self.planned: dict[str, Any] = {}  # run_id and run_name, once the run is planned
        self.said: set[tuple[str, int]] = set()
        self._errors_said: set[str] = set()
        self._in_flight: dict[int, str] = {}  # job id -> name, for the job column

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.progress.stop()

    def _show_in_flight(self) -> None:
        names = list(self._in_flight.values())
        more = f" +{len(names) - 1}" if len(names) > 1 else ""
        self.progress.update(self.task, job=f"{names[-1]}{more}" if names else "")

    def on_event(self, event: dict[str, Any]) -> None:
        """One event of the run (`flows.events`): updates the bar, prints failures and retries above it."""
        kind = event.get("event")
        if kind == "planned":
            self.planned.update(run_id=event["run_id"], run_name=event["run_name"])
            self.progress.update(self.task, total=event["total"], completed=0, description=event["run_name"],
                                 since=time.monotonic())  # fmt: skip
        elif kind == "progress":  # shards on a work pool: counted from the catalog
            if event["completed"] != self.progress.tasks[0].completed:
                self.progress.update(self.task, completed=event["completed"], last_done=time.monotonic())
        elif kind == "started":
            self._in_flight[event["job_id"]] = job_name(event)
            self._show_in_flight()
        elif kind == "retrying":
            self.console.print(
                f"[yellow]retrying[/yellow] {escape(job_name(event))} (attempt {event['attempt']}/"
                f"{event['attempts']}): {escape(str(event['error']))}", highlight=False,
            )  # fmt: skip
        elif event.get("status") in ("succeeded", "failed"):
            self._in_flight.pop(event.get("job_id"), None)  # type: ignore[arg-type]
            self._show_in_flight()
            self.progress.update(self.task, advance=1, last_done=time.monotonic())
            if event["status"] == "failed":
                self._say_failed(event)

    def _say_failed(self, event: dict[str, Any]) -> None:
        error = str(event["error"])
        # one line per failed job; a reason already given (a model that does not load fails them all) once
        text = error if error not in self._errors_said else "(same error as above)"
        self._errors_said.add(error)
        self.said.add((str(event["item_id"]), int(event["seed"])))
        self.console.print(f"[red]failed[/red] {escape(job_name(event))}: {escape(text)}", highlight=False)


class _AboveTheBar(logging.Handler):
    """Prints Prefect's console log records through a rich console (above its live bar), leaving out those
    said better elsewhere (`_said_elsewhere`); without `verbose`, one line each, tracebacks left out."""

    def __init__(self, console: Console, verbose: bool, original: logging.Handler) -> None:
        super().__init__(level=original.level)
        self.setFormatter(original.formatter)
        self.console = console
        self.verbose = verbose

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if _said_elsewhere(record, self.verbose):
                return
            if not self.verbose:
                record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            lines = self.format(record).splitlines() or [""]
            text = "\n".join(lines) if self.verbose else lines[0] + (" (...)" if len(lines) > 1 else "")
            level = record.levelno
            style = "red" if level >= logging.ERROR else "yellow" if level >= logging.WARNING else ""
            self.console.print(Text(text, style=style), highlight=False)
        except Exception:
            self.handleError(record)


def _said_elsewhere(record: logging.LogRecord, verbose: bool) -> bool:
    """Records the terminal says better itself: a Ctrl-C's crash line per task and flow (said once), the
    batch's `BatchFailed` (its summary follows), records also sent as events (retries); and without
    `verbose`, a job task's own lines (its failure is said once, with its reason)."""
    from flows.reporting import BatchFailed
    from flows.shard import generate_job

    if "aborted by an interrupt signal" in record.getMessage() or getattr(record, "wanflow_event", False):
        return True
    if record.exc_info and isinstance(record.exc_info[1], BatchFailed):
        return True
    return not verbose and getattr(record, "task_name", None) == generate_job.name


@contextlib.contextmanager
def prefect_lines_above(console: Console, verbose: bool) -> Iterator[None]:
    """While the block runs, Prefect's console log lines go through `console` (`_AboveTheBar`) instead of
    straight to the terminal, where they would break a live progress bar."""
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    originals = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    if not originals:
        yield
        return
    above = _AboveTheBar(console, verbose, originals[0])
    for handler in originals:
        root.removeHandler(handler)
    root.addHandler(above)
    try:
        yield
    finally:
        root.removeHandler(above)
        for handler in originals:
            root.addHandler(handler)


def print_summary(
    console: Console, summary: dict[str, Any], said: set[tuple[str, int]] | None = None
) -> None:
    """A run's outcome in a few lines: status and counts, the failed jobs with their reasons (those not in
    `said`, already printed while the run went: at most `MAX_FAILED_LINES`), notes, where the catalog is and
    where to see the run in the Prefect UI."""
    said = said or set()
    by = summary["by_status"]
    colour = "green" if summary["status"] == "succeeded" else "red"
    rejected = f", {summary['rejected']} rows rejected" if summary["rejected"] else ""
    unfinished = by["pending"] + by["running"]
    unfinished_text = f", {unfinished} unfinished" if unfinished else ""
    if summary.get("nothing_to_do") and summary["status"] == "succeeded":
        headline = f"nothing to do: all {by['skipped']} jobs already have verified videos"
    else:
        headline = (f"{by['succeeded']} made, {by['skipped']} already done, {by['failed']} failed"
                    f"{unfinished_text}{rejected}")  # fmt: skip
    unsaid = [f for f in summary["failed"] if (str(f["item"]), int(f["seed"])) not in said]
    if unsaid:  # the causes first, once each, then the jobs
        for reason in summary.get("failure_reasons", [])[:5]:
            console.print(f"[red]{reason['jobs']} failed:[/red] {escape(reason['error'])}", highlight=False)
        for failure in unsaid[:MAX_FAILED_LINES]:
            what = f"{failure['item']}-s{failure['seed']}: {failure['error']}"
            console.print(f"  [red]failed[/red] {escape(what)}", highlight=False)
        if len(unsaid) > MAX_FAILED_LINES:
            console.print(f"  ... and {len(unsaid) - MAX_FAILED_LINES} more", highlight=False)
    if summary.get("random_weights"):
        console.print(
            f"[yellow]note:[/yellow] {', '.join(summary['random_weights'])} ran random weights: the videos "
            "are noise, not the prompts (pass a real --model and --ckpt-dir for real videos)"
        )
    for name in summary.get("crashed_runs", []):
        console.print(f"[yellow]note:[/yellow] earlier run {escape(name)} had died; marked crashed")
    console.print(
        f"[{colour}]{escape(summary['run_name'])}: {summary['status']}[/{colour}]: {headline}; "
        f"{summary['outputs']} verified videos ({summary['output_bytes'] / 1e6:.1f} MB) under "
        f"{escape(summary['storage_root'])}; {summary['seconds']:.1f} s of generation",
        highlight=False,
    )
    if by["failed"]:
        run = escape(summary["run_name"])
        console.print(f"failed jobs: wanflow catalog jobs --run {run} --status failed", highlight=False)
    where = f"{summary['catalog']} (wanflow catalog outputs --run {summary['run_name']})"
    console.print(f"catalog: {escape(where)}", highlight=False)
    if summary.get("prefect_ui"):
        console.print(f"Prefect UI: {escape(summary['prefect_ui'])}", highlight=False)
