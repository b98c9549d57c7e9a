"""Running a planned run's shards: in this process (the embedded default) or as runs of the shard deployment
on a GPU work pool, and finishing the jobs another run's workers held when this run came to them.

Local shards are `generate_shard` subflows, one after the other; each gets the catalog URL only as the
batch's own (credential-free) parameter, or none and the same environment as this process. Deployed shards
get the storage root (refused when it holds a credential) and the run's name; the catalog URL and every
credential come from the workers' environment. Progress goes to the run's progress artifact throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from prefect import get_run_logger, tags
from prefect.artifacts import update_progress_artifact

from flows.events import notify
from flows.models import ModelSource
from flows.planning import BatchPlan, ShardPlan, plan_shards
from flows.recovery import requeue_abandoned
from flows.settings import Settings, parameter_safe
from flows.shard import ended_on_failed_jobs, generate_shard
from storage.catalog import Catalog, JobStatus
from storage.urls import redact

__all__ = ["dispatch"]

DEPLOYED_POLL_S = 5.0


def dispatch(
    plan: BatchPlan, catalog: Catalog, sources: dict[str, ModelSource], settings: Settings, *,
    shard_size: int, progress_id: str, memory: dict[str, Any] | None, catalog_param: str | None,
) -> None:  # fmt: skip
    """Run every shard of `plan` to its end: on the shard deployment's pool when `settings` names one, else
    here (then also the run's jobs that a concurrent run held, `_finish_shared_jobs`). A shard that ends
    badly is logged; its jobs' outcomes are in the catalog."""
    if settings.shard_deployment:
        _run_deployed(plan, settings, catalog, progress_id, memory)
        return
    logger = get_run_logger()
    assert plan.run_id is not None

    def run_here(shards: list[ShardPlan]) -> None:
        for shard in shards:
            with tags(*shard.tags):
                state = generate_shard(
                    plan.run_id, shard.job_ids, shard.model, ckpt_dir=sources[shard.model].ckpt_dir,
                    catalog_url=catalog_param, storage_root=parameter_safe(settings.storage_root),
                    progress_artifact_id=progress_id, label=shard.label, run_name=plan.run_name,
                    memory=memory, return_state=True,
                )  # fmt: skip
            if ended_on_failed_jobs(state):  # each failed job was said as it failed; the summary counts them
                logger.info("shard %s: %s", shard.label, state.message)
            elif not state.is_completed():
                logger.error("shard %s ended %s: %s", shard.label, state.type.value, state.message)

    run_here(plan.shards)
    _finish_shared_jobs(catalog, plan.run_id, settings, shard_size, run_here)


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
                    if ended_on_failed_jobs(state):
                        logger.info("shard run %s: %s", run.name, state.message)
                    elif not state.is_completed():
                        logger.error("shard run %s ended %s: %s", run.name, state.type.value, state.message)
                elif state is not None and state.is_scheduled() and time.monotonic() - waiting_since > 300:
                    logger.warning("shard run %s still waits for a worker on its pool", run.name)
                    waiting_since = time.monotonic()
            finished, jobs = catalog.progress(plan.run_id)
            update_progress_artifact(progress_id, progress=100.0 * finished / max(jobs, 1))
            # this run's jobs finished elsewhere, for a local progress bar (`wanflow generate`)
            notify({"event": "progress", "run_id": plan.run_id, "completed": finished - plan.already_done})
