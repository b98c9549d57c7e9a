"""The `generate_batch` flow: manifest -> catalog run and jobs -> shards on the GPU pool -> summary.

Its body is three steps, each in a module of its own:

    plan      (flows/planning.py)   validate the manifest (every bad row at once; `skip_invalid` records
                                    them), record the run and one job per (row, seed), skip jobs already
                                    done with a verified output, requeue dead workers' claims, cut shards
                                    by (model, size, frame_num)
    dispatch  (flows/dispatch.py)   run the shards: subflows in this process (embedded default), or
                                    `generate-shard` deployment runs on the GPU work pool
                                    (`shard_deployment`), whose concurrency limit decides how many GPUs
                                    work at once
    publish   (flows/reporting.py)  the summary, a table artifact of outputs, a markdown summary with a
                                    contact sheet, then the run's status in the catalog

A progress artifact follows the run throughout; progress events (`flows.events`) feed a local progress bar.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact
from prefect.runtime import flow_run

from flows.dispatch import dispatch
from flows.events import notify
from flows.manifest import Manifest, RunDefaults
from flows.models import ModelSource, memory_options
from flows.planning import BatchPlan, load_inputs, plan_run
from flows.reporting import BatchFailed, publish
from flows.settings import Settings, check_secret_free, get_settings
from storage.catalog import Catalog, RunStatus
from storage.faults import probe_storage_root
from storage.layout import safe_name
from storage.urls import absolute_url

__all__ = ["BatchFailed", "generate_batch", "resolve_model"]


def _batch_run_name() -> str:
    manifest = str(flow_run.get_parameters().get("manifest", "manifest"))
    stem = PurePosixPath(manifest.rstrip("/")).name.split(".")[0] or "manifest"
    return f"batch-{safe_name(stem)}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


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
    parameters are stored and shown by Prefect); `defaults` holds run-wide generation parameters (size,
    frame_num, steps, shift, guide_scale, solver, negative_prompt, loras, cache, recipe) that rows override.
    With `shard_deployment` (or `WANFLOW_SHARD_DEPLOYMENT`), shards run as flow runs of that deployment on
    its work pool; otherwise in this process. `memory` holds GPU-memory options for every shard
    (offload_model, t5_cpu, vae_tiling; default each worker's `WANFLOW_*` settings), recorded with the run.
    Raises `BatchFailed` (the flow run ends Failed) when any job failed or did not finish; its `summary` is
    the same dict.
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
    """plan -> dispatch -> publish. `catalog_param` is the batch's own `catalog_url` parameter (free of
    credentials): local shards get that, or nothing and read the same environment as this process."""
    plan = plan_run(
        catalog, loaded, sources, settings, run_defaults, run_name=flow_run.get_name() or _batch_run_name(),
        shard_size=shard_size, flow_run_id=flow_run.get_id(), extra_settings=extra_settings,
        late_problems=late_problems,
    )  # fmt: skip
    assert plan.run_id is not None
    try:
        progress_id = _announce(plan)
        dispatch(plan, catalog, sources, settings, shard_size=shard_size, progress_id=str(progress_id),
                 memory=memory, catalog_param=catalog_param)  # fmt: skip
    except BaseException as exc:
        catalog.finish_run(
            plan.run_id, RunStatus.failed if isinstance(exc, Exception) else RunStatus.cancelled
        )
        raise
    return publish(catalog, plan, sources, settings, progress_id)


def _announce(plan: BatchPlan) -> Any:
    """Say what the run will do (log, the `planned` event for a progress bar); its progress artifact's id."""
    get_run_logger().info(
        "run %s: %d jobs (%d new, %d done already, %d requeued, %d abandoned requeued); %d to generate "
        "in %d shards", plan.run_name, plan.jobs, plan.created, plan.already_done, plan.requeued,
        plan.abandoned, plan.to_generate, len(plan.shards),
    )  # fmt: skip
    notify({"event": "planned", "run_id": plan.run_id, "run_name": plan.run_name, "total": plan.to_generate})
    return create_progress_artifact(
        progress=0.0 if plan.to_generate else 100.0, description=f"{plan.run_name}: jobs finished"
    )
