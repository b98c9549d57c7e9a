"""The `generate_shard` flow: one model loaded once, every job of the shard run as a task.

A shard is a list of catalog job ids that share a model, size and frame count. The flow loads the
pipeline once per process (`flows.models.load_pipeline`) and runs each job as a task named
`<item>-s<seed>`:

    claim the job in the catalog -> generate_stream -> VideoWriter (ffmpeg -> storage) -> output row

Transient failures (I/O, storage, database, CUDA) put the job back to pending and raise, and Prefect
retries the task with exponential backoff and jitter; bad requests (`ValueError` and kin: an invalid
size, an unreadable image) fail once and are not retried. A job that fails for good is marked failed in
the catalog with its error, and the shard goes on with the next job.

The work itself is `run_job`, a plain function that tests call without Prefect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.states import Completed, Failed, State
from prefect.tasks import exponential_backoff

from flows.backend import GenerationBackend
from flows.events import add_progress_listener, notify
from flows.images import read_image
from flows.loras import lora_entries, process_lora_files
from flows.models import ModelSource, load_clip_scorer, load_pipeline, model_source
from flows.recovery import queued_shard_end, worker_id
from flows.settings import Settings, check_secret_free, get_settings
from storage.catalog import Catalog, JobRecord, JobStatus
from storage.faults import PermanentStorageError, is_permanent_storage_error, probe_storage_root
from storage.layout import OutputLayout
from storage.outputs import POSTER_FRAMES, store_job_output
from storage.urls import redact

__all__ = [
    "JobContext", "add_progress_listener", "generate_shard", "is_transient", "job_task_name", "run_job",
    "worker_id",
]  # fmt: skip

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 2.0

# Errors that say the request itself is wrong: retrying cannot help.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, LookupError, NotImplementedError)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying (I/O, storage, database, CUDA, ffmpeg); False for bad requests and
    storage errors no retry can fix (read-only root, permission denied, missing bucket, disk full)."""
    return not isinstance(exc, PERMANENT_ERRORS) and not is_permanent_storage_error(exc)


def job_task_name(item_id: str, seed: int) -> str:
    """The task run's name in the Prefect UI."""
    return f"{item_id}-s{seed}"


@dataclass
class JobContext:
    """Everything a job of a shard needs, built once per shard."""

    catalog: Catalog
    run_id: int
    run_name: str
    source: ModelSource
    pipeline: GenerationBackend | None  # None: no job of the shard was planned for this worker's weights
    layout: OutputLayout
    storage_options: dict[str, Any]
    worker: str
    max_attempts: int = 1
    fps: int = 16
    provenance: dict[str, Any] = field(default_factory=dict)
    settings: Settings | None = None  # for the storage options of input images
    run_names: dict[int, str] = field(default_factory=dict)  # first runs of jobs redone here
    scorer: Any | None = None  # `wan.clip_score.ClipScorer` where WANFLOW_CLIP_SCORE names a CLIP file

    def storage_options_for(self, url: str) -> dict[str, Any]:
        return self.settings.storage_options_for(url) if self.settings else {}


def _settings_args(params: dict[str, Any]) -> dict[str, Any]:
    """Catalog job parameters -> `WanPipeline.settings` keyword arguments."""
    return {
        "negative_prompt": params.get("negative_prompt"), "size": params.get("size"),
        "frame_num": params.get("frame_num"), "steps": params.get("steps"),
        "shift": params.get("shift"), "guide_scale": params.get("guide_scale"),
        "solver": params.get("solver"), "cache": params.get("cache"),
    }  # fmt: skip


TIMEOUT_SETTING = "WANFLOW_JOB_TIMEOUT_S"
# Marks a log record whose news also goes out as an event (`flows.events`): a terminal that shows the events
# leaves the record out (`flows.terminal`).
SAID_BY_EVENT = {"wanflow_event": True}


def run_job(ctx: JobContext, job_id: int, *, attempt: int = 1) -> dict[str, Any]:
    """Claim, generate and store one job; returns a summary dict (`status`: succeeded / not-claimed).

    On failure the job is marked pending again (transient, attempts left) or failed, and the error is
    raised for the caller (Prefect) to retry or record.
    """
    job = ctx.catalog.claim_job(job_id, worker=ctx.worker, start=True, run_id=ctx.run_id)
    if job is None:
        current = ctx.catalog.get_job(job_id)
        if current is None:
            raise LookupError(f"job {job_id} is not in the catalog")
        if current.status == JobStatus.running and current.worker_id == ctx.worker:
            job = current  # our own claim, left running when recording a failed attempt failed: go on
        elif current.status == JobStatus.failed:
            raise ValueError(f"job {job_id} has failed for good: {current.last_error}")
        else:  # done meanwhile, or another live worker holds it
            return {"job_id": job_id, "status": "not-claimed", "detail": current.status.value}
    notify({"event": "started", "run_id": ctx.run_id, "job_id": job.id, "item_id": job.item_id,
            "seed": job.seed, "attempt": attempt})  # fmt: skip
    start = time.perf_counter()
    try:
        output = _generate_and_store(ctx, job)
    except BaseException as exc:
        # An interrupt gives the job back; a bad request or the last attempt fails it for good. Prefect ends
        # an attempt that outlives the job deadline by raising its CancelledError inside it: a failed attempt.
        timeout_s = ctx.settings.job_timeout_s if ctx.settings is not None else None
        timed_out = isinstance(exc, asyncio.CancelledError) and timeout_s is not None
        interrupted = not isinstance(exc, Exception) and not timed_out
        retry = interrupted or (is_transient(exc) and attempt < ctx.max_attempts)
        message = f"{type(exc).__name__}: {exc}"
        if timed_out:
            retry = attempt < ctx.max_attempts
            message = f"TimeoutError: the job ran past its deadline of {timeout_s:g} s ({TIMEOUT_SETTING})"
        try:
            ctx.catalog.mark_failed(job.id, message, retry=retry, worker=ctx.worker)
        except Exception as record_error:  # the job's own error is the one to raise
            log.warning("could not record the failure of job %s: %s", job.id, redact(str(record_error)))
        if not retry:
            notify({"run_id": ctx.run_id, "job_id": job.id, "item_id": job.item_id, "seed": job.seed,
                     "status": JobStatus.failed.value, "error": message})  # fmt: skip
        elif not interrupted:  # said where the person running it sees it, not only in Prefect's log
            log.warning("retrying %s (attempt %d/%d): %s", job_task_name(job.item_id, job.seed), attempt + 1,
                        ctx.max_attempts, redact(message), extra=SAID_BY_EVENT)  # fmt: skip
            notify({"event": "retrying", "run_id": ctx.run_id, "job_id": job.id, "item_id": job.item_id,
                     "seed": job.seed, "attempt": attempt + 1, "attempts": ctx.max_attempts,
                     "error": redact(message)})  # fmt: skip
        raise
    seconds = time.perf_counter() - start
    notify({"run_id": ctx.run_id, "job_id": job.id, "item_id": job.item_id, "seed": job.seed,
             "status": JobStatus.succeeded.value, "error": None})  # fmt: skip
    return {"job_id": job.id, "item_id": job.item_id, "seed": job.seed, "status": "succeeded",
            "uri": output.uri, "seconds": round(seconds, 3)}  # fmt: skip


def _generate_and_store(ctx: JobContext, job: JobRecord) -> Any:
    import torch

    if (job.model_id, job.model_fingerprint) != (ctx.source.model, ctx.source.fingerprint):
        raise ValueError(
            f"job {job.id} was planned for {job.model_id} weights {job.model_fingerprint}, but this worker "
            f"has {ctx.source.model} weights {ctx.source.fingerprint} (check WANFLOW_CHECKPOINTS on the "
            "workers: every machine needs the same checkpoint)"
        )
    params = dict(job.params)
    pipe = ctx.pipeline
    assert pipe is not None  # loaded: the job was planned for this worker's weights (checked above)
    settings = pipe.settings(**_settings_args(params))  # ValueError: a bad request, never retried
    entries = lora_entries(params)
    # BadLora: never retried. Each file is read once per process.
    loras = process_lora_files().load(entries, ctx.storage_options_for) if entries else None
    if pipe.use_loras(loras):  # a shard's jobs share their LoRA set: merged once, at its first job
        log.info("LoRA set merged: %s", ", ".join(f"{redact(u)} x{s:g}" for u, _, s in entries) or "none")
    images = {name: read_image(params, name, ctx) for name in ("image", "last_image") if params.get(name)}
    width, height = pipe.video_size(settings, images.get("image"))  # image-to-video: the image's aspect
    device = torch.device(pipe.device)
    pipe.reset_peak_memory()
    keep = bool(params.get("save_latents"))
    video = params.get("save_latents") != "only"  # latents only: no decode but the first frame (thumbnail)
    frames = pipe.generate_stream(
        params["prompt"], seed=job.seed, progress=False, **images, **_settings_args(params),
        **({"keep_latents": True} if keep else {}), **({} if video else {"decode_video": False}),
    )  # fmt: skip
    provenance = {
        **ctx.provenance,
        "run": {"id": ctx.run_id, "name": ctx.run_name, "objects_under": _objects_run_name(ctx, job)},
        "model": ctx.source.describe(),
        **({"random_weights": True} if ctx.source.ckpt_dir is None else {}),
        "request": params,
        "settings": {"size": f"{width}*{height}", "frame_num": settings.frame_num, "steps": settings.steps,
                     "shift": settings.shift, "guide_scale": settings.guide_scale, "solver": settings.solver,
                     "negative_prompt": settings.negative_prompt,
                     "cache": None if settings.cache is None else settings.cache.describe(),
                     "loras": params.get("loras") or []},
        "seed": job.seed,
        "noise": "torch CPU generator, float32",
        "device": str(device), "dtype": str(pipe.dtype).removeprefix("torch."),
        **({"attention": kernel} if (kernel := _attention_kernel(ctx, device, pipe.dtype)) else {}),
        "worker": ctx.worker,
        **({"parallel": parallel} if (parallel := pipe.describe()) else {}),
        "memory": pipe.memory.describe(),
        **({"clip_score": _scorer_facts(ctx)} if ctx.scorer is not None and video else {}),
    }  # fmt: skip
    prompt = params["prompt"]
    score = (lambda kept: ctx.scorer.score(kept, prompt)) if ctx.scorer is not None and video else None
    return store_job_output(
        ctx.catalog, job, frames, layout=ctx.layout, run_name=_objects_run_name(ctx, job), width=width,
        height=height,
        fps=ctx.fps, storage_options=ctx.storage_options, provenance=provenance, device=str(device),
        peak_memory_bytes=lambda: pipe.peak_memory_bytes,  # read once the last frames are in
        sampling=lambda: _sampling_counts(pipe),
        latents=(lambda: (pipe.last_latents, pipe.latents_metadata())) if keep else None, video=video,
        score=score,
    )  # fmt: skip


def _scorer_facts(ctx: JobContext) -> dict[str, Any]:
    """What the sidecar says of the text-video similarity's model: its file and where it ran."""
    scorer = ctx.scorer
    assert scorer is not None
    return {"model": "open-clip xlm-roberta-large-vit-huge-14", "file": redact(str(scorer.source)),
            "device": str(scorer.device), "dtype": str(scorer.dtype).removeprefix("torch."),
            "frames": f"up to {POSTER_FRAMES}, evenly spaced, full size"}  # fmt: skip


def _sampling_counts(pipe: GenerationBackend) -> dict[str, int] | None:
    """The last video's DiT forwards and skipped forwards under a step cache (None without one)."""
    counts = pipe.last_cache_counts
    if counts is None:
        return None
    return {"dit_forwards": counts.forwards, "dit_forwards_skipped": counts.skipped}


def _attention_kernel(ctx: JobContext, device: Any, dtype: Any) -> str | None:
    """The DiT's attention kernel on `device` in `dtype` ("fa3", "sdpa-cudnn/flash", "flash_attn" or "sdpa":
    `wan.attention.kernel_name`); under context parallelism it runs the cross-attentions, the self-attentions
    going through the parallel layout the sidecar also records.

    None for a worker group on GPUs when this process has not started CUDA (the pipeline runs in the
    group's processes): querying the device here would hold a CUDA context on rank 0's GPU.
    """
    import torch

    from wan.attention import kernel_name
    from wan.configs import get_preset

    if torch.device(device).type == "cuda" and not torch.cuda.is_initialized():
        return None
    return kernel_name(device, dtype, get_preset(ctx.source.model).dit.head_dim)


def _objects_run_name(ctx: JobContext, job: JobRecord) -> str:
    """Objects go under the run that first planned the job, so a job redone by a later run (after its
    worker died between upload and catalog row, say) overwrites its earlier objects, never duplicates."""
    if job.first_run_id == ctx.run_id:
        return ctx.run_name
    if job.first_run_id not in ctx.run_names:
        first = ctx.catalog.get_run(job.first_run_id)
        ctx.run_names[job.first_run_id] = first.name if first else ctx.run_name
    return ctx.run_names[job.first_run_id]


def _retry_transient(task: Any, run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only transient failures."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


@task(
    cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_transient, retry_jitter_factor=0.5
)
def generate_job(ctx: JobContext, job_id: int) -> dict[str, Any]:
    """One video, as a Prefect task (named `<item>-s<seed>` by the shard)."""
    return run_job(ctx, job_id, attempt=task_run.run_count or 1)


def _shard_run_name() -> str:
    params = flow_run.get_parameters()
    label = params.get("label") or f"{len(params.get('job_ids', []))}-jobs"
    return f"shard-{params.get('run_id')}-{label}"


@flow(name="generate-shard", flow_run_name=_shard_run_name, log_prints=True, persist_result=False)
def generate_shard(
    run_id: int,
    job_ids: list[int],
    model: str,
    ckpt_dir: str | None = None,
    catalog_url: str | None = None,
    storage_root: str | None = None,
    progress_artifact_id: str | None = None,
    label: str | None = None,
    run_name: str | None = None,
    gpus_per_job: int | None = None,
    memory: dict[str, Any] | None = None,
) -> State:
    """Run the given jobs of run `run_id` on one loaded pipeline. Ends Completed, or Failed when a job
    failed (as the batch does), the state's data holding counts and per-job results (`_shard_end`).

    `gpus_per_job` (default `WANFLOW_GPUS_PER_JOB`, 1) above 1 runs each video on that many processes: one
    `torchrun` group for the shard loads the model once and serves every job (`flows.group`). `memory`
    (offload_model, t5_cpu, vae_tiling; default this worker's `WANFLOW_*` settings) trades speed for GPU
    memory.

    `catalog_url` and `storage_root` default to this worker's `WANFLOW_*` settings (credentials stay in
    the worker's environment, out of flow parameters); `ckpt_dir` defaults to `WANFLOW_CHECKPOINTS[model]`.
    `run_name`, when given, must match the catalog's name for `run_id` (a worker pointed at another
    catalog is refused). The model is not loaded when no job of the shard was planned for its weights.
    """
    check_secret_free(catalog_url, storage_root=storage_root, ckpt_dir=ckpt_dir)
    logger = get_run_logger()
    settings = get_settings(catalog_url=catalog_url, storage_root=storage_root, gpus_per_job=gpus_per_job)
    catalog = Catalog(settings.catalog_url)
    try:
        catalog.check_schema()
        run = catalog.get_run(run_id)
        if run is None or (run_name is not None and run.name != run_name):
            found = f"is {run.name!r}" if run else "does not exist"
            raise ValueError(
                f"run {run_id} ({run_name or 'unnamed'}) {found} in the catalog "
                f"{redact(settings.catalog_url)} this worker uses: check WANFLOW_CATALOG_URL on the workers"
            )
        if (ended := queued_shard_end(run)) is not None:  # queued before its batch ended: Cancelled at once
            logger.warning("shard %s %s", label or run_id, ended.message)
            return ended
        jobs = {job.id: job for job in catalog.get_jobs(job_ids)}
        try:  # a root no job could write to fails the shard at once, before any model loads
            probe_storage_root(settings.storage_root, settings.resolved_storage_options())
        except PermanentStorageError as exc:
            results = _fail_shard(catalog, run_id, jobs, str(exc))
            logger.error("shard %s: %s", label or run_id, exc)
            return _shard_end(run_id, results)
        try:
            source = model_source(model, ckpt_dir or settings.checkpoints.get(model))
            pipeline = None
            if any(
                (j.model_id, j.model_fingerprint) == (source.model, source.fingerprint) for j in jobs.values()
            ):
                start = time.perf_counter()
                pipeline = load_pipeline(
                    source,
                    device=settings.device,
                    dtype=settings.dtype,
                    gpus_per_job=settings.gpus_per_job,
                    layout=settings.parallel_layout(),
                    memory={**settings.memory_options(), **(memory or {})},  # the run's overrides win
                )
                logger.info(
                    "model %s ready on %s in %.1f s", model, pipeline.device, time.perf_counter() - start
                )
        except Exception as exc:  # every job of the shard fails with the one reason, for the summary to lead
            results = _fail_shard(catalog, run_id, jobs, f"model {model} could not load: {_one_line(exc)}")
            logger.error("shard %s: %s", label or run_id, results[0]["error"] if results else exc)
            return _shard_end(run_id, results)
        scorer = None
        # Scored: the videos (latents-only outputs have none), where a CLIP file is configured.
        if pipeline is not None and settings.clip_score and any(
            j.params.get("save_latents") != "only" for j in jobs.values()
        ):
            try:
                one_gpu = settings.gpus_per_job == 1
                device = settings.clip_score_device or (settings.device if one_gpu else None)
                scorer = load_clip_scorer(settings.clip_score, device, settings.gpus_per_job)
            except Exception as exc:  # a configured score that cannot be made: no job runs without it
                reason = f"the CLIP file for scores (WANFLOW_CLIP_SCORE) could not load: {_one_line(exc)}"
                results = _fail_shard(catalog, run_id, jobs, reason)
                logger.error("shard %s: %s", label or run_id, reason)
                return _shard_end(run_id, results)
        ctx = _context(settings, catalog, run_id, run.name, source, pipeline, scorer)
        results = _run_jobs(ctx, job_ids, jobs, settings, progress_artifact_id)
    finally:
        catalog.close()
    end = _shard_end(run_id, results)
    logger.info("shard finished: %s", end.message)
    return end


def _shard_end(run_id: int, results: list[dict[str, Any]]) -> State:
    """The shard run's final state, as the batch's: Failed when a job failed (the message counts them and
    gives the first reason), else Completed; its data holds the counts and per-job results."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    data = {"run_id": run_id, "counts": counts, "results": results}
    said = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no jobs"
    failed = [r for r in results if r["status"] == "failed"]
    if not failed:
        return Completed(message=said, data=data)
    first = str(failed[0].get("error") or "").splitlines()
    reason = f"; first: {first[0]}" if first else ""
    return Failed(message=f"{JOBS_FAILED}{len(failed)} of {len(results)} ({said}){reason}", data=data)


JOBS_FAILED = "jobs failed: "  # how a shard's Failed message starts when jobs failed (`ended_on_failed_jobs`)


def ended_on_failed_jobs(state: State) -> bool:
    """Whether a shard run's final state is Failed because some of its jobs failed (said in the catalog and
    the batch's summary), not because the shard itself broke off."""
    return state.is_failed() and (state.message or "").startswith(JOBS_FAILED)


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, credentials masked."""
    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":"))


def _fail_shard(
    catalog: Catalog, run_id: int, jobs: dict[int, JobRecord], reason: str
) -> list[dict[str, Any]]:
    """Mark every still-pending job of a shard that cannot start failed with `reason`, telling listeners."""
    catalog.fail_pending(list(jobs), reason, run_id=run_id)
    results = []
    for job in catalog.get_jobs(list(jobs)):
        if job.status != JobStatus.failed or job.last_error != reason:
            continue  # done meanwhile, or held by another worker
        notify({"run_id": run_id, "job_id": job.id, "item_id": job.item_id, "seed": job.seed,
                 "status": JobStatus.failed.value, "error": reason})  # fmt: skip
        results.append({"job_id": job.id, "item_id": job.item_id, "seed": job.seed, "status": "failed",
                        "error": reason})  # fmt: skip
    return results


def _run_jobs(
    ctx: JobContext, job_ids: list[int], jobs: dict[int, JobRecord], settings: Settings,
    progress_artifact_id: str | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each job as a task, in order; a failed job is recorded and the next one runs."""
    job_task = generate_job.with_options(
        timeout_seconds=settings.job_timeout_s,
        retries=settings.job_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=settings.retry_delay_s)
        if settings.retry_delay_s > 0 else 0,
    )  # fmt: skip
    results: list[dict[str, Any]] = []
    last_update = 0.0
    for n, job_id in enumerate(job_ids, 1):
        job = jobs.get(job_id)
        if job is None:
            results.append({"job_id": job_id, "status": "missing"})
            continue
        state = job_task.with_options(task_run_name=job_task_name(job.item_id, job.seed))(
            ctx, job_id, return_state=True
        )
        if state.is_completed():
            results.append(state.result())
        else:
            results.append({"job_id": job_id, "item_id": job.item_id, "seed": job.seed, "status": "failed",
                            "error": state.message})  # fmt: skip
        # The run's progress, as the catalog counts it (other shards included), every few seconds.
        if progress_artifact_id and (time.monotonic() - last_update > PROGRESS_EVERY_S or n == len(job_ids)):
            done, total = ctx.catalog.progress(ctx.run_id)
            update_progress_artifact(progress_artifact_id, progress=100.0 * done / max(total, 1))
            last_update = time.monotonic()
    return results


def _context(
    settings: Settings, catalog: Catalog, run_id: int, run_name: str, source: ModelSource, pipeline: Any,
    scorer: Any = None,
) -> JobContext:  # fmt: skip
    return JobContext(
        catalog=catalog, run_id=run_id, run_name=run_name, source=source, pipeline=pipeline,
        layout=OutputLayout(settings.storage_root), storage_options=settings.resolved_storage_options(),
        worker=worker_id(), max_attempts=settings.job_retries + 1,
        provenance={"flow_run_id": flow_run.get_id()}, settings=settings, scorer=scorer,
    )  # fmt: skip
