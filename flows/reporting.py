"""A run's outcome: its summary (counts, failures and why, outputs), the artifacts Prefect shows (the
outputs, with their thumbnails, and the failed jobs with their reasons; a summary with a labelled contact
sheet of thumbnails; progress), and the run's end in the catalog.

Both artifacts are markdown with images as data URIs: Prefect's UI shows a table artifact's cells as plain
text (its default React UI; only the older Vue one reads them as markdown), and it cannot fetch an image from
a file:// or s3:// URL, but both UIs show a markdown image whose source is `data:image/...`.

`publish` is the flow's last step: it writes the artifacts and the contact sheet first and only then
finishes the run in the catalog, so a process killed while writing them leaves the run unfinished, for the
next run to mark crashed (with its Prefect flow run); finished first, the run said succeeded while its flow
run showed Running for ever.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import fsspec
from prefect.artifacts import create_markdown_artifact, update_progress_artifact

from flows.models import ModelSource
from flows.planning import BatchPlan
from flows.settings import Settings
from storage.catalog import Catalog, JobRecord, JobStatus, OutputRecord, RunStatus
from storage.layout import safe_name
from storage.urls import join_url, redact
from storage.video import contact_sheet, write_image

__all__ = ["BatchFailed", "failure_reasons", "publish", "summarise"]

MAX_TABLE_ROWS = 50  # outputs shown with a thumbnail each (about 3 KB apiece) in the outputs artifact
MAX_FAILED_ROWS = 200  # failed jobs listed, one line each
TABLE_THUMBNAIL_WIDTH = 160
SHEET_THUMBNAILS = 24


def publish(
    catalog: Catalog, plan: BatchPlan, sources: dict[str, ModelSource], settings: Settings, progress_id: Any
) -> dict[str, Any]:
    """Summarise the run, write its artifacts and contact sheet, then finish it in the catalog (succeeded
    when no job failed or stayed unfinished, else failed); returns the summary, or raises `BatchFailed`
    with it."""
    assert plan.run_id is not None
    summary = summarise(catalog, plan.run_id, settings)
    by = summary["by_status"]
    complete = by["failed"] == by["pending"] == by["running"] == 0
    status = RunStatus.succeeded if complete else RunStatus.failed
    summary["status"] = status.value
    summary["nothing_to_do"] = plan.to_generate == 0
    summary["crashed_runs"] = plan.crashed_runs
    summary["random_weights"] = sorted(name for name, source in sources.items() if source.ckpt_dir is None)
    try:
        update_progress_artifact(progress_id, progress=100.0)
        # The first outputs with their thumbnails, read from storage once for both artifacts.
        shown = _shown_outputs(catalog, plan.run_id, settings, max(MAX_TABLE_ROWS, SHEET_THUMBNAILS))
        create_markdown_artifact(
            key="batch-outputs", markdown=_outputs_markdown(catalog, summary, settings, shown=shown),
            description=f"{plan.run_name}: outputs and failed jobs",
        )  # fmt: skip
        sheet = _sheet(catalog, plan.run_id, plan.run_name, settings, store=by["succeeded"] > 0, shown=shown)
        create_markdown_artifact(
            key="batch-summary", markdown=_markdown(summary, plan, sheet),
            description=f"{plan.run_name}: summary",
        )  # fmt: skip
    finally:
        catalog.finish_run(plan.run_id, status)
    summary["plan"] = plan.to_dict()
    if not complete:
        raise BatchFailed(summary)
    return summary


def summarise(catalog: Catalog, run_id: int, settings: Settings) -> dict[str, Any]:
    """Counts, failures and outputs of a run, as the CLI prints it and the artifacts show it."""
    run = catalog.get_run(run_id)
    stats = catalog.stats(run_id)
    failed = [
        {"item": j.item_id, "seed": j.seed, "error": j.last_error}
        for j in catalog.jobs(run_id, status=JobStatus.failed)
    ]
    return {
        "run_id": run_id, "run_name": run.name if run else None, "status": run.status.value if run else None,
        "jobs": stats["jobs"], "by_status": stats["by_status"], "outputs": stats["outputs"],
        "output_bytes": stats["output_bytes"], "seconds": round(stats["seconds"], 1),
        "rejected": stats["rejected"], "failed": failed, "failure_reasons": failure_reasons(failed),
        "storage_root": redact(settings.storage_root), "catalog": redact(settings.catalog_url),
    }  # fmt: skip


def failure_reasons(failed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct first lines of the failed jobs' errors, most frequent first: what a summary leads with."""
    counts: dict[str, int] = {}
    for failure in failed:
        line = (failure.get("error") or "unknown error").strip().splitlines()[0][:300]
        counts[line] = counts.get(line, 0) + 1
    return [{"error": e, "jobs": n} for e, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


Shown = list[tuple[OutputRecord, JobRecord | None, Any]]  # (output, its job, its thumbnail [H, W, 3] or None)


def _shown_outputs(catalog: Catalog, run_id: int, settings: Settings, limit: int) -> Shown:
    """The run's first `limit` outputs, each with its job and its thumbnail read from storage."""
    options = settings.resolved_storage_options()
    return [(out, job, _read_thumbnail(out.thumbnail_uri, options))
            for out, job in _with_jobs(catalog, catalog.outputs(run_id, limit=limit))]  # fmt: skip


def _outputs_markdown(
    catalog: Catalog, summary: dict[str, Any], settings: Settings, *, shown: Shown | None = None
) -> str:
    """The outputs artifact: the run's first `MAX_TABLE_ROWS` outputs with a small thumbnail each (a data URI,
    which the Prefect UI shows whatever the storage), then its failed jobs, one line each with the reason;
    says how many of each it leaves out and which command lists them all. `shown`: those outputs already
    read (`_shown_outputs`)."""
    run_id, run_name = summary["run_id"], summary["run_name"]
    if shown is None:
        shown = _shown_outputs(catalog, run_id, settings, MAX_TABLE_ROWS)
    outputs = shown[:MAX_TABLE_ROWS]
    lines = [f"# {run_name}: outputs", ""]
    if outputs:
        lines += ["| thumbnail | item | seed | status | seconds | output |", "|---|---|---|---|---|---|"]
    for out, job, image in outputs:
        thumbnail = (
            f"![{_cell(_label(job))}]({_data_uri(image, TABLE_THUMBNAIL_WIDTH)})" if image is not None else ""
        )
        seconds = f"{job.seconds:.1f}" if job and job.seconds is not None else ""
        lines.append(
            f"| {thumbnail} | {_cell(job.item_id if job else '')} | {job.seed if job else ''} | "
            f"{job.status.value if job else ''} | {seconds} | `{_cell(out.uri, code=True)}` |"
        )
    shown, total = len(outputs), summary["outputs"]
    if not total:
        lines.append("No outputs.")
    elif shown < total:
        lines += ["", f"{total - shown} more outputs not shown: `wanflow catalog outputs --run {run_name}`."]
    failed = summary["failed"]
    if failed:
        lines += ["", "## Failed jobs", "", "| item | seed | reason |", "|---|---|---|"]
        for f in failed[:MAX_FAILED_ROWS]:
            reason = ((f["error"] or "").strip().splitlines() or ["unknown error"])[0][:300]
            lines.append(f"| {_cell(f['item'])} | {f['seed']} | {_cell(reason)} |")
        if len(failed) > MAX_FAILED_ROWS:
            lines += ["", f"{len(failed) - MAX_FAILED_ROWS} more failed jobs not shown: "
                      f"`wanflow catalog jobs --run {run_name} --status failed`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _with_jobs(catalog: Catalog, outputs: list[OutputRecord]) -> list[tuple[OutputRecord, JobRecord | None]]:
    """Each output with its job (None for one whose job is gone)."""
    jobs = {j.id: j for j in catalog.get_jobs(o.job_id for o in outputs if o.job_id is not None)}
    return [(out, jobs.get(out.job_id) if out.job_id is not None else None) for out in outputs]


def _label(job: JobRecord | None) -> str:
    """A video's label on the contact sheet and its thumbnail's alt text: the task name, `<item>-s<seed>`."""
    return f"{job.item_id}-s{job.seed}" if job else "?"


def _cell(text: Any, *, code: bool = False) -> str:
    """Text for one markdown table cell, on one line: pipes escaped (they would end the cell), and markdown's
    other punctuation too unless the text goes in a code span (`code`: backticks become quotes there)."""
    text = " ".join(str(text).split())
    if code:
        return text.replace("`", "'").replace("|", "\\|")
    return "".join("\\" + c if c in _MARKDOWN_PUNCTUATION else c for c in text)


_MARKDOWN_PUNCTUATION = set("\\`*_[]<>|#!~")


def _read_thumbnail(uri: str | None, options: dict[str, Any]) -> Any:
    """A stored thumbnail as a uint8 array [H, W, 3]; None when there is none or it cannot be read (a gap
    in an artifact, never a failed run)."""
    import numpy as np
    from PIL import Image

    if not uri:
        return None
    try:
        with fsspec.open(uri, "rb", **options) as f:
            return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
    except Exception:
        return None


def _data_uri(image: Any, width: int | None = None, quality: int = 70) -> str:
    """An image [H, W, 3] as a `data:image/webp;base64,...` URI, shrunk to at most `width` pixels wide."""
    from PIL import Image

    picture = Image.fromarray(image)
    if width is not None and picture.width > width:
        picture = picture.resize(
            (width, max(1, round(picture.height * width / picture.width))), Image.Resampling.BILINEAR
        )
    buffer = io.BytesIO()
    picture.save(buffer, format="WEBP", quality=quality)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()


def _sheet(
    catalog: Catalog, run_id: int, run_name: str, settings: Settings, *, store: bool,
    shown: Shown | None = None,
) -> tuple[str | None, str | None]:  # fmt: skip
    """A contact sheet of the run's first thumbnails, each labelled with its item and seed: (data URI for the
    markdown, URL where it is stored). `shown`: the first outputs already read (`_shown_outputs`)."""
    options = settings.resolved_storage_options()
    if shown is None:
        shown = _shown_outputs(catalog, run_id, settings, SHEET_THUMBNAILS)
    images, labels = [], []
    for _out, job, image in shown[:SHEET_THUMBNAILS]:  # a missing thumbnail leaves a gap
        if image is not None:
            images.append(image)
            labels.append(_label(job))
    if not images:
        return None, None
    sheet = contact_sheet(images, columns=6, tile_width=160, labels=labels)
    url: str | None = None
    if store:  # a run that made nothing new leaves no folder of its own behind
        url = join_url(settings.storage_root, safe_name(run_name, what="run name"), "contact_sheet.webp")
        try:
            write_image(url, sheet, format="webp", storage_options=options)
        except Exception:
            url = None
    return _data_uri(sheet, quality=85), url  # the labels stay sharp


def _markdown(summary: dict[str, Any], plan: BatchPlan, sheet: tuple[str | None, str | None]) -> str:
    """The summary artifact: the failures' reasons first (grouped, most frequent first), the counts, where
    things are, and the labelled contact sheet; the per-job lists are in the outputs artifact."""
    by = summary["by_status"]
    lead = []
    for reason in summary.get("failure_reasons", [])[:5]:
        lead.append(f"> **{reason['jobs']} failed:** {reason['error'].replace('|', '/')}")
    if summary.get("random_weights"):
        names = ", ".join(summary["random_weights"])
        lead.append(f"> Random weights ({names}): the videos are noise, not the prompts.")
    lines = [
        f"# {summary['run_name']}",
        "",
        *([*lead, ""] if lead else []),
        f"**{by['succeeded']} made, {by['skipped']} already done, {by['failed']} failed** of "
        f"{summary['jobs']} jobs from `{plan.manifest}` ({plan.rows} rows, {plan.invalid} rejected).",
        "",
        f"- videos: `{summary['storage_root']}` ({summary['outputs']} outputs, "
        f"{summary['output_bytes'] / 1e6:.1f} MB)",
        f"- catalog: `{summary['catalog']}`, run id {summary['run_id']}",
        f"- generation time: {summary['seconds']:.1f} s over {len(plan.shards)} shards",
        "",
    ]
    data_uri, url = sheet
    if data_uri:
        lines += ["## Contact sheet", "", f"![contact sheet]({data_uri})", ""]
        if url:
            lines += [f"Stored at `{url}`.", ""]
    if summary["outputs"] or summary["failed"]:
        lines += ["Each output with its thumbnail, and each failed job with its reason: the `batch-outputs` "
                  "artifact.", ""]  # fmt: skip
    return "\n".join(lines)


class BatchFailed(RuntimeError):
    """A run ended with failed or unfinished jobs; `summary` is what the run made and what it did not."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        by = summary["by_status"]
        unfinished = by["pending"] + by["running"]
        reasons = summary.get("failure_reasons") or []
        jobs = reasons[0]["jobs"] if reasons else 0
        lead = f"{reasons[0]['error']} ({jobs} job{'s' if jobs != 1 else ''}); " if reasons else ""
        super().__init__(
            f"run {summary['run_name']}: {lead}{by['failed']} of {summary['jobs']} jobs failed, {unfinished} "
            f"unfinished (see `wanflow catalog jobs --run {summary['run_name']} --status failed`)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.summary,))
