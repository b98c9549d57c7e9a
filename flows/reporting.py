"""A run's outcome: its summary (counts, failures and why, outputs), the artifacts Prefect shows (outputs
table, markdown summary with a contact sheet of thumbnails, progress), and the run's end in the catalog.

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
from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact

from flows.models import ModelSource
from flows.planning import BatchPlan
from flows.settings import Settings
from storage.catalog import Catalog, JobStatus, RunStatus
from storage.layout import safe_name
from storage.urls import join_url, redact
from storage.video import contact_sheet, write_image

__all__ = ["BatchFailed", "failure_reasons", "publish", "summarise"]

MAX_TABLE_ROWS = 1000
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
        create_table_artifact(
            key="batch-outputs", table=_output_rows(catalog, plan.run_id) or [{"item": "", "uri": ""}],
            description=f"{plan.run_name}: outputs (first {MAX_TABLE_ROWS})",
        )  # fmt: skip
        sheet = _sheet(catalog, plan.run_id, plan.run_name, settings, store=by["succeeded"] > 0)
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


def _output_rows(catalog: Catalog, run_id: int) -> list[dict[str, Any]]:
    outputs = catalog.outputs(run_id, limit=MAX_TABLE_ROWS)
    jobs = {j.id: j for j in catalog.get_jobs(o.job_id for o in outputs if o.job_id is not None)}
    rows = []
    for out in outputs:
        job = jobs.get(out.job_id)
        rows.append({
            "item": job.item_id if job else "", "seed": job.seed if job else "",
            "status": job.status.value if job else "", "uri": out.uri,
            "seconds": round(job.seconds, 2) if job and job.seconds is not None else "",
            "thumbnail": out.thumbnail_uri or "",
        })  # fmt: skip
    return rows


def _sheet(
    catalog: Catalog, run_id: int, run_name: str, settings: Settings, *, store: bool
) -> tuple[str | None, str | None]:
    """A contact sheet of the run's first thumbnails: (data URI for the markdown, URL where it is stored)."""
    import numpy as np
    from PIL import Image

    options = settings.resolved_storage_options()
    images = []
    for out in catalog.outputs(run_id, limit=SHEET_THUMBNAILS):
        if not out.thumbnail_uri:
            continue
        try:
            with fsspec.open(out.thumbnail_uri, "rb", **options) as f:
                images.append(np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB")))
        except Exception:  # a missing thumbnail leaves a gap, not a failed run
            continue
    if not images:
        return None, None
    sheet = contact_sheet(images, columns=6, tile_width=160)
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="WEBP", quality=80)
    url: str | None = None
    if store:  # a run that made nothing new leaves no folder of its own behind
        url = join_url(settings.storage_root, safe_name(run_name, what="run name"), "contact_sheet.webp")
        try:
            write_image(url, sheet, format="webp", storage_options=options)
        except Exception:
            url = None
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode(), url


def _markdown(summary: dict[str, Any], plan: BatchPlan, sheet: tuple[str | None, str | None]) -> str:
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
    if summary["failed"]:
        lines += ["## Failed jobs", "", "| item | seed | error |", "|---|---|---|"]
        for f in summary["failed"][:100]:
            error = (f["error"] or "").replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {f['item']} | {f['seed']} | {error} |")
        lines.append("")
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
