"""The `generate_batch` flow: manifest -> catalog run and jobs -> shards on the GPU pool -> summary.

    validate the manifest (every bad row reported at once; `skip_invalid` records them in the catalog)
    record the run and one job per (row, seed); jobs already done with a verified output are skipped
    requeue jobs whose worker died (a local worker's process is gone, or the claim is older than the timeout)
    group the pending jobs into shards by (model, size, frame_num), `shard_size` jobs at most
    run the shards: subflows in this process (embedded default), or `generate-shard` deployment runs on
    the GPU work pool (`shard_deployment`), whose concurrency limit decides how many GPUs work at once
    summarise: the run's status in the catalog, a table artifact of outputs, a markdown summary with a
    contact sheet of thumbnails; a progress artifact follows the run throughout

The planning steps are plain functions (`plan_run`, `plan_shards`, `dry_run`) that tests and the CLI
call without Prefect.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import fsspec
from prefect import flow, get_run_logger, tags
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from flows.events import notify
from flows.inputs import LazyManifest, check_requests, model_names, resolve_image_uri
from flows.manifest import (
    Manifest,
    ManifestError,
    RunDefaults,
    load_manifest,
    manifest_format,
    manifest_sha256,
    read_shard,
    split_manifest,
)
from flows.models import ModelSource, memory_options, model_source
from flows.recovery import process_owner, reap_crashed_runs, requeue_abandoned
from flows.settings import Settings, check_secret_free, get_settings, parameter_safe
from flows.shard import generate_shard
from storage.catalog import (
    Catalog,
    CatalogError,
    JobGroupRow,
    JobSpec,
    JobStatus,
    OutputRecord,
    RunStatus,
    spec_key,
)  # fmt: skip
from storage.faults import abort_open_uploads, filesystem, probe_storage_root
from storage.layout import safe_name
from storage.outputs import verifier
from storage.urls import absolute_url, is_under, join_url, redact
from storage.video import contact_sheet, write_image

__all__ = [
    "BatchPlan", "ShardPlan", "dry_run", "generate_batch", "job_specs", "plan_run", "plan_shards",
    "requeue_abandoned", "summarise",
]  # fmt: skip

log = logging.getLogger(__name__)

MAX_TABLE_ROWS = 1000
DEPLOYED_POLL_S = 5.0
SHEET_THUMBNAILS = 24


@dataclass(frozen=True)
class ShardPlan:
    """Jobs that share a model, size and frame count, for one `generate_shard` run."""

    model: str
    size: str
    frame_num: int
    job_ids: list[int]
    label: str

    @property
    def tags(self) -> list[str]:
        from wan.configs import get_preset

        return [f"model:{self.model}", f"task:{get_preset(self.model).task}", f"size:{self.size}"]


@dataclass
class BatchPlan:
    """What a run will do: how many jobs, how many are done already, which shards run."""

    run_id: int | None
    run_name: str
    manifest: str
    rows: int
    invalid: int
    jobs: int
    created: int = 0
    already_done: int = 0
    requeued: int = 0
    already_planned: int = 0
    abandoned: int = 0
    shards: list[ShardPlan] = field(default_factory=list)
    crashed_runs: list[str] = field(default_factory=list)  # earlier runs found dead and marked crashed
    inputs_unread: int = 0  # dry runs: jobs whose images were not read (counted as to generate)

    @property
    def to_generate(self) -> int:
        return sum(len(s.job_ids) for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["to_generate"] = self.to_generate
        return out


# ------------------------------------------------------------------------------------------ planning


def read_manifest(
    url: str, defaults: RunDefaults, settings: Settings, *, skip_invalid: bool, split_to: str | None = None
) -> Manifest:
    """Load and validate; without `skip_invalid`, any bad row stops the run (ManifestError lists all).

    A manifest larger than `settings.large_manifest_bytes` is split with dask into shard manifests under
    `split_to` (default: `<storage root>/_manifests/<file>-<sha256 prefix>/`) and its requests are read
    back from them lazily, so no process holds all its rows.
    """
    options = settings.storage_options_for(url)
    if not is_large_manifest(url, settings):
        manifest = load_manifest(url, defaults, storage_options=options)
        if manifest.problems and not skip_invalid:
            raise ManifestError(url, manifest.problems, manifest.rows)
        return manifest
    sha256 = manifest_sha256(url, options)
    stem = PurePosixPath(url.rstrip("/")).name.split(".")[0] or "manifest"
    # One directory per (manifest, run defaults): runs of the same file with other defaults do not share it.
    digest = hashlib.sha256(f"{sha256}\0{defaults.model_dump_json()}".encode()).hexdigest()[:12]
    out = split_to or join_url(settings.storage_root, "_manifests", f"{safe_name(stem)}-{digest}")
    out_options = settings.storage_options_for(out)
    result = split_manifest(url, out, defaults, storage_options=options, overwrite=True)
    if result.invalid and not skip_invalid:
        raise ManifestError(url, result.problems, result.rows)
    requests = (r for shard in result.shards for r in read_shard(shard, storage_options=out_options))
    models = sorted({key.split("/")[0] for key in result.groups})
    return LazyManifest(
        url, manifest_format(url), sha256, result.rows, requests, result.problems, models,  # type: ignore[arg-type]
        invalid_rows=result.invalid_rows,
    )


def is_large_manifest(url: str, settings: Settings) -> bool:
    """Whether a manifest is over `settings.large_manifest_bytes` (then it is split with dask, never
    loaded whole). An unreadable one counts as small: `load_manifest` reports it with its name."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **settings.storage_options_for(url))
        size = int(fs.size(path) or 0)
    except Exception:
        return False
    return size > settings.large_manifest_bytes


def load_inputs(
    url: str, defaults: RunDefaults, settings: Settings, *, skip_invalid: bool, ckpt_dir: str | None,
    split_to: str | None = None,
) -> tuple[Manifest, dict[str, ModelSource], list[Any]]:  # fmt: skip
    """The manifest as the run takes it: its valid rows, less those whose model has no weights here or whose
    local image is missing (`flows.inputs.check_requests`), with a source for every model still used, and
    the problems a split manifest's rows will show as they stream (recorded when the run is planned).
    Without `skip_invalid`, any problem raises ManifestError listing them all."""
    manifest = read_manifest(url, defaults, settings, skip_invalid=True, split_to=split_to)
    checked, sources, late = check_requests(manifest, settings, ckpt_dir, defaults.model)
    whole_file = [p for p in checked.problems if p.line == 0]  # unreadable: --skip-invalid cannot help
    if whole_file or (checked.problems and not skip_invalid):
        raise ManifestError(url, whole_file or checked.problems, checked.rows)
    return checked, sources, late


def model_sources(
    manifest: Manifest, settings: Settings, ckpt_dir: str | None, model: str
) -> dict[str, ModelSource]:
    """A source (weights + fingerprint) for every model the manifest uses; `ckpt_dir` is the run model's."""
    sources = {}
    for name in model_names(manifest):
        directory = ckpt_dir if name == model and ckpt_dir else settings.checkpoints.get(name)
        sources[name] = model_source(name, directory)
    return sources


def job_specs(
    manifest: Manifest, sources: dict[str, ModelSource], settings: Settings | None = None, *,
    read_images: bool = True,
) -> Iterator[JobSpec]:  # fmt: skip
    """One job per (valid row, seed). Image paths are resolved against the manifest's location and
    each image's sha256 joins the job's parameters (its identity): an edited image makes a new job.
    Images are hashed a chunk of rows at a time, in parallel, each distinct image once. The jobs are for
    `settings.storage_root` (their outputs go there; a run into another root has jobs of its own)."""
    root = settings.storage_root if settings else None
    requests = iter(manifest.requests)
    while chunk := list(itertools.islice(requests, IMAGE_HASH_CHUNK)):
        uris = {
            resolve_image_uri(getattr(r, name), manifest.url)
            for r in chunk for name in ("image", "last_image") if getattr(r, name)
        }  # fmt: skip
        digests = _hash_images(sorted(uris), settings) if read_images else dict.fromkeys(uris)
        for request in chunk:
            fingerprint = sources[request.model].fingerprint
            params = request.params()
            for field_name in ("image", "last_image"):
                if params.get(field_name):
                    uri = resolve_image_uri(params[field_name], manifest.url)
                    params[field_name] = uri
                    params[f"{field_name}_sha256"] = digests[uri]
            for seed in request.seeds:
                yield JobSpec(request.item_id, seed, request.model, fingerprint, params, root)


IMAGE_HASH_CHUNK = 512
IMAGE_HASH_THREADS = 16


def _hash_images(uris: list[str], settings: Settings | None) -> dict[str, str | None]:
    if not uris:
        return {}
    with ThreadPoolExecutor(max_workers=min(IMAGE_HASH_THREADS, len(uris))) as pool:
        return dict(zip(uris, pool.map(lambda uri: image_sha256(uri, settings), uris), strict=True))


def image_sha256(uri: str, settings: Settings | None, attempts: int = 3) -> str | None:
    """sha256 of an image's bytes; None if it cannot be read (the job then fails with the reason).
    A missing file is not retried; other errors (a throttled object store) are, twice."""
    options = settings.storage_options_for(uri) if settings else {}
    for attempt in range(1, attempts + 1):
        digest = hashlib.sha256()
        try:
            fs, path = filesystem(uri, options)  # connect and read timeouts
            with fs.open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            log.warning("image %s cannot be read: %s", redact(uri), redact(str(exc)))
            return None
        except Exception as exc:
            if attempt == attempts:
                log.warning("image %s cannot be read: %s", redact(uri), redact(str(exc)))
                return None
            time.sleep(0.5 * attempt)
    return None


def plan_shards(jobs: Iterable[JobGroupRow], shard_size: int) -> list[ShardPlan]:
    """Group jobs by (model, size, frame_num), then cut each group into shards of `shard_size` at most."""
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size}: must be at least 1")
    groups: dict[tuple[str, str, int], list[int]] = {}
    for job_id, model, size, frame_num in jobs:
        groups.setdefault((model, str(size), int(frame_num or 0)), []).append(job_id)
    shards = []
    for (model, size, frames), ids in sorted(groups.items()):
        for k in range(0, len(ids), shard_size):
            label = f"{model}-{size.replace('*', 'x')}-f{frames}-{k // shard_size + 1}"
            shards.append(ShardPlan(model, size, frames, ids[k : k + shard_size], label))
    return shards


def _run_settings(settings: Settings, defaults: RunDefaults, **extra: Any) -> dict[str, Any]:
    return {
        "defaults": defaults.model_dump(), "storage_root": redact(settings.storage_root),
        "catalog": redact(settings.catalog_url), **extra,
    }  # fmt: skip


def _create_run(catalog: Catalog, name: str, manifest: Manifest, run_settings: dict, flow_run_id: str | None):
    """A new catalog run named `name`, or `name-2`, `name-3`, ... if taken (also by a concurrent start),
    owned by this process."""
    owner = process_owner()
    for n in range(1, 1000):
        candidate = name if n == 1 else f"{name}-{n}"
        if catalog.get_run(candidate) is not None:
            continue
        try:
            return catalog.create_run(
                candidate, manifest.url, manifest.sha256, run_settings, flow_run_id, owner=owner
            )
        except CatalogError:
            if catalog.get_run(candidate) is None:
                raise
    raise CatalogError(f"no free run name like {name!r}")


def plan_run(
    catalog: Catalog,
    manifest: Manifest,
    sources: dict[str, ModelSource],
    settings: Settings,
    defaults: RunDefaults,
    *,
    run_name: str,
    shard_size: int,
    flow_run_id: str | None = None,
    extra_settings: dict[str, Any] | None = None,
    late_problems: list[Any] | None = None,
) -> BatchPlan:
    """Record the run, its rejected rows and its jobs in the catalog; requeue abandoned jobs; cut shards.
    If planning fails, the run is marked failed."""
    run_settings = _run_settings(settings, defaults, shard_size=shard_size, **(extra_settings or {}))
    crashed = reap_crashed_runs(catalog)
    run = _create_run(catalog, run_name, manifest, run_settings, flow_run_id)
    try:
        catalog.start_run(run.id, flow_run_id=flow_run_id)
        catalog.record_rejections(run.id, (p._asdict() for p in manifest.problems))
        for source in sources.values():
            weights = source.ckpt_dir or "random"
            catalog.register_model(source.model, source.fingerprint, weights, source.describe())
        summary = catalog.plan_jobs(run.id, job_specs(manifest, sources, settings), verify=_verify(settings))
        if late_problems:  # rows of a split manifest refused as they streamed by
            catalog.record_rejections(run.id, (p._asdict() for p in late_problems))
        abandoned = requeue_abandoned(catalog, run.id, timedelta(seconds=settings.claim_timeout_s))
        # Uploads older than any job may run were left by killed workers: abort them (each job also aborts
        # those under its own keys when it starts again).
        abort_open_uploads(settings.storage_root, settings.resolved_storage_options(),
                           older_than_s=settings.job_timeout_s)  # fmt: skip
        shards = plan_shards(catalog.job_groups(run.id, JobStatus.pending), shard_size)
    except BaseException as exc:
        catalog.finish_run(run.id, RunStatus.failed if isinstance(exc, Exception) else RunStatus.cancelled)
        raise
    return BatchPlan(
        run_id=run.id, run_name=run.name, manifest=redact(manifest.url), rows=manifest.rows,
        invalid=manifest.invalid_rows + len({p.line for p in late_problems or ()}),
        jobs=summary.total, created=summary.created,
        already_done=summary.already_done, requeued=summary.requeued,
        already_planned=summary.already_planned, abandoned=abandoned, shards=shards,
        crashed_runs=[r.name for r in crashed],
    )  # fmt: skip


def _verify(settings: Settings) -> Callable[[OutputRecord], bool]:
    """Whether an output counts as done for a run into `settings.storage_root`: it lies under that root and
    its object is there with the recorded size and sha256."""
    check = verifier(settings.resolved_storage_options())
    root = settings.storage_root
    return lambda output: is_under(output.uri, root) and check(output)


def dry_run(
    catalog: Catalog | None,
    manifest: Manifest,
    sources: dict[str, ModelSource],
    settings: Settings,
    *,
    shard_size: int,
    read_images: bool = False,
) -> BatchPlan:
    """What `plan_run` would do, writing nothing: jobs done already (output verified) are counted as
    skipped, the rest are cut into shards (job ids are left empty for jobs not yet in the catalog).

    Images are not read unless `read_images`: a job's identity holds its image's sha256, so without it the
    jobs with images count as to generate (`inputs_unread` says how many), an upper bound."""
    verify = _verify(settings)
    known = {}
    specs = list(job_specs(manifest, sources, settings, read_images=read_images))
    with_images = sum(1 for spec in specs if spec.params.get("image") or spec.params.get("last_image"))
    unread = 0 if read_images else with_images
    keys = [spec_key(s) for s in specs]
    if catalog is not None:
        known = catalog.find_jobs(keys)
    done = 0
    pending: list[JobGroupRow] = []
    for key, spec in zip(keys, specs, strict=True):
        found = known.get(key)
        if found is not None and found[0].status == JobStatus.succeeded and found[1] and verify(found[1]):
            done += 1
            continue
        size, frames = spec.params.get("size"), spec.params.get("frame_num")
        pending.append(JobGroupRow(found[0].id if found else 0, spec.model_id, size, frames))
    shards = plan_shards(pending, shard_size)
    return BatchPlan(
        run_id=None, run_name="(dry run)", manifest=redact(manifest.url), rows=manifest.rows,
        invalid=manifest.invalid_rows, jobs=len(specs), already_done=done, shards=shards,
        inputs_unread=unread,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ summaries


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


# ------------------------------------------------------------------------------------------- the flow


def _batch_run_name() -> str:
    manifest = str(flow_run.get_parameters().get("manifest", "manifest"))
    stem = PurePosixPath(manifest.rstrip("/")).name.split(".")[0] or "manifest"
    return f"batch-{safe_name(stem)}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


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


@flow(name="generate-batch", flow_run_name=_batch_run_name, log_prints=True, persist_result=False)
def generate_batch(
    manifest: str,
    model: str | None = None,
    ckpt_dir: str | None = None,
    out: str | None = None,
    catalog_url: str | None = None,
    seeds: int | None = None,
    base_seed: int = 0,
    shard_size: int = 16,
    skip_invalid: bool = False,
    shard_deployment: str | None = None,
    defaults: dict[str, Any] | None = None,
    memory: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate every (row, seed) of `manifest` that is not done yet; returns the run's summary.

    `model` is the run's model for rows without one (default `WANFLOW_MODEL`; there is no built-in default,
    so the random-weight `tiny-*` presets run only when named). `out` (storage root) and `catalog_url`
    default to the `WANFLOW_*` settings (a URL with a credential is refused as a parameter: flow
    parameters are stored and shown by Prefect); `defaults` holds run-wide
    generation parameters (size, frame_num, steps, shift, guide_scale, solver, negative_prompt) that rows
    override. With `shard_deployment` (or `WANFLOW_SHARD_DEPLOYMENT`), shards run as flow runs of that
    deployment on its work pool; otherwise in this process. `memory` holds GPU-memory options for every
    shard (offload_model, t5_cpu, vae_tiling; default each worker's `WANFLOW_*` settings), recorded with
    the run. Raises `BatchFailed` (the flow run ends Failed) when any job failed or did not finish; its
    `summary` is the same dict.
    """
    check_secret_free(catalog_url, out=out, manifest=manifest, ckpt_dir=ckpt_dir)
    manifest = absolute_url(manifest)  # recorded once, the same wherever the catalog is read from
    settings = get_settings(catalog_url=catalog_url, storage_root=out, shard_deployment=shard_deployment)
    model = resolve_model(model, settings)
    logger = get_run_logger()
    memory = None if memory is None else memory_options(memory, "memory", partial=True)
    run_defaults = RunDefaults(model=model, base_seed=base_seed, **({"num_seeds": seeds} if seeds else {}),
                               **(defaults or {}))  # fmt: skip
    loaded, sources, late = load_inputs(manifest, run_defaults, settings, skip_invalid=skip_invalid,
                                        ckpt_dir=ckpt_dir)  # fmt: skip
    if loaded.problems:
        logger.warning("%d invalid rows left out (recorded in the catalog)", loaded.invalid_rows)
    # A root nothing can be written to fails the run here, in one line, before anything is recorded or loaded.
    probe_storage_root(settings.storage_root, settings.resolved_storage_options())
    catalog = Catalog(settings.catalog_url)
    try:
        catalog.check_schema()
        return _run(catalog, loaded, sources, settings, run_defaults, shard_size=shard_size, extra_settings={
            "ckpt_dir": ckpt_dir, "skip_invalid": skip_invalid, "shard_deployment": settings.shard_deployment,
            "memory": {**(memory or {}), "others": "the workers' WANFLOW_* settings"},
        }, memory=memory, catalog_param=catalog_url, late_problems=late)  # fmt: skip
    finally:
        catalog.close()


def resolve_model(model: str | None, settings: Settings) -> str:
    """The run's model: the one given, else `WANFLOW_MODEL`; ValueError when neither names one."""
    model = model or settings.model
    if not model:
        from wan.configs import PRESETS

        raise ValueError(
            "no model given: pass --model (or set WANFLOW_MODEL) to one of "
            f"{', '.join(PRESETS)}; the tiny-* presets run random weights, for trying the platform"
        )
    return model


def _run(
    catalog: Catalog,
    loaded: Manifest,
    sources: dict[str, ModelSource],
    settings: Settings,
    run_defaults: RunDefaults,
    *,
    shard_size: int,
    extra_settings: dict[str, Any],
    memory: dict[str, Any] | None = None,
    catalog_param: str | None = None,
    late_problems: list[Any] | None = None,
) -> dict[str, Any]:
    """Plan, run the shards, summarise. `catalog_param` is the batch's own `catalog_url` parameter (free of
    credentials): local shards get that, or nothing and read the same environment as this process."""
    logger = get_run_logger()
    plan = plan_run(
        catalog, loaded, sources, settings, run_defaults, run_name=flow_run.get_name() or _batch_run_name(),
        shard_size=shard_size, flow_run_id=flow_run.get_id(), extra_settings=extra_settings,
        late_problems=late_problems,
    )  # fmt: skip
    assert plan.run_id is not None
    try:
        logger.info(
            "run %s: %d jobs (%d new, %d done already, %d requeued, %d abandoned requeued); %d to generate "
            "in %d shards", plan.run_name, plan.jobs, plan.created, plan.already_done, plan.requeued,
            plan.abandoned, plan.to_generate, len(plan.shards),
        )  # fmt: skip
        notify(
            {"event": "planned", "run_id": plan.run_id, "run_name": plan.run_name, "total": plan.to_generate}
        )
        progress_id = create_progress_artifact(
            progress=0.0 if plan.to_generate else 100.0, description=f"{plan.run_name}: jobs finished"
        )
        if settings.shard_deployment:
            _run_deployed(plan, settings, catalog, str(progress_id), memory)
        else:

            def run_here(shards: list[ShardPlan]) -> None:
                for shard in shards:
                    with tags(*shard.tags):
                        state = generate_shard(
                            plan.run_id, shard.job_ids, shard.model, ckpt_dir=sources[shard.model].ckpt_dir,
                            catalog_url=catalog_param, storage_root=parameter_safe(settings.storage_root),
                            progress_artifact_id=str(progress_id), label=shard.label, run_name=plan.run_name,
                            memory=memory, return_state=True,
                        )  # fmt: skip
                    if not state.is_completed():
                        logger.error("shard %s ended %s: %s", shard.label, state.type.value, state.message)

            run_here(plan.shards)
            _finish_shared_jobs(catalog, plan.run_id, settings, shard_size, run_here)
    except BaseException as exc:
        catalog.finish_run(
            plan.run_id, RunStatus.failed if isinstance(exc, Exception) else RunStatus.cancelled
        )
        raise
    summary = summarise(catalog, plan.run_id, settings)
    by = summary["by_status"]
    complete = by["failed"] == by["pending"] == by["running"] == 0
    status = RunStatus.succeeded if complete else RunStatus.failed
    summary["status"] = status.value
    summary["nothing_to_do"] = plan.to_generate == 0
    summary["crashed_runs"] = plan.crashed_runs
    summary["random_weights"] = sorted(name for name, source in sources.items() if source.ckpt_dir is None)
    # Finished in the catalog only after its artifacts and contact sheet: a process killed while writing them
    # leaves the run unfinished, for the next run to mark crashed, its Prefect flow run too (finished first,
    # the run said succeeded while its flow run showed Running for ever).
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


SHARED_POLL_S = 1.0
SHARED_JOB_TRIES = 3


def _finish_shared_jobs(
    catalog: Catalog, run_id: int, settings: Settings, shard_size: int,
    run_here: Callable[[list[ShardPlan]], None],
) -> None:  # fmt: skip
    """Finish the run's jobs that another run's worker held when this run's shards came to them (runs of one
    manifest started together share the work, each job made once): wait while they are made there, and run
    here those given back to pending (that run was interrupted, or its worker died: `requeue_abandoned`),
    each at most `SHARED_JOB_TRIES` times."""
    timeout = timedelta(seconds=settings.claim_timeout_s)
    tries: dict[int, int] = {}
    waiting_for = 0
    while True:
        requeue_abandoned(catalog, run_id, timeout)
        pending = [row for row in catalog.job_groups(run_id, JobStatus.pending)
                   if tries.get(row[0], 0) < SHARED_JOB_TRIES]  # fmt: skip
        if pending:
            for row in pending:
                tries[row[0]] = tries.get(row[0], 0) + 1
            run_here(plan_shards(pending, shard_size))
            continue
        running = len(catalog.job_groups(run_id, JobStatus.running))
        if not running:
            return
        if running != waiting_for:
            get_run_logger().info("waiting for %d jobs that another run is making", running)
            waiting_for = running
        time.sleep(SHARED_POLL_S)


def _run_deployed(
    plan: BatchPlan, settings: Settings, catalog: Catalog, progress_id: str, memory: dict[str, Any] | None
) -> None:
    """Submit every shard as a run of the shard deployment, then wait for all, updating the progress
    artifact. Shards get the storage root (not secret) and the run's name; the catalog URL and every
    credential come from the workers' own environment."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    deployment = settings.shard_deployment
    assert deployment
    if parameter_safe(settings.storage_root) is None:
        raise ValueError(
            f"storage root {redact(settings.storage_root)} holds a credential and cannot be handed to shard "
            "runs as a parameter: give the workers their credentials in their environment instead"
        )
    runs = []
    for shard in plan.shards:
        runs.append(run_deployment(
            deployment, timeout=0, tags=shard.tags, as_subflow=True,
            parameters={"run_id": plan.run_id, "job_ids": shard.job_ids, "model": shard.model,
                        "storage_root": settings.storage_root, "progress_artifact_id": progress_id,
                        "label": shard.label, "run_name": plan.run_name, "memory": memory},
        ))  # fmt: skip
    logger.info("submitted %d shard runs to %s", len(runs), deployment)
    pending = {r.id for r in runs}
    waiting_since = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(DEPLOYED_POLL_S)
            found = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))
            )
            for run in found:
                state = run.state
                if state is not None and state.is_final():
                    pending.discard(run.id)
                    if not state.is_completed():
                        logger.error("shard run %s ended %s: %s", run.name, state.type.value, state.message)
                elif state is not None and state.is_scheduled() and time.monotonic() - waiting_since > 300:
                    logger.warning("shard run %s still waits for a worker on its pool", run.name)
                    waiting_since = time.monotonic()
            finished, jobs = catalog.progress(plan.run_id)
            update_progress_artifact(progress_id, progress=100.0 * finished / max(jobs, 1))
            # this run's jobs finished elsewhere, for a local progress bar (`wanflow generate`)
            notify({"event": "progress", "run_id": plan.run_id, "completed": finished - plan.already_done})
