"""Runs and workers whose process died: who owns a run or holds a claim, whether that process still lives,
marking dead runs crashed (in the catalog and in Prefect) and giving dead workers' claims back.

A batch run records its owner as `<host>:<pid>:<start>`, where `<start>` is the process's start time in
clock ticks since boot (Linux `/proc/<pid>/stat`, field 22; empty elsewhere). A process id can be reused
after its process dies; the start time tells a new process from the old one.

`reap_crashed_runs` looks at every run still `pending` or `running` in the catalog and marks `crashed` those
whose owner is on this host and gone, or whose Prefect flow run has already ended (when Prefect can be
asked), setting the Prefect flow run to Crashed too where it still shows Running, with the shard subflows
that ran in its process. Runs owned by other hosts are left to those hosts, or to their flow run's state.

A job's claim records its worker as `<host>:<pid>[:<flow run id>]` (`worker_id`, read back by
`parse_worker_id`); `requeue_abandoned` gives back to pending the claims of workers that are gone
(`worker_gone`: their flow run ended, their process left this host, or the claim expired).

A deployed shard run (a `generate-shard` run of the shard deployment: a child of its batch's flow run, with
the catalog run's id among its parameters) may still wait for a worker when its batch ends. The reaper sets
those not yet started to Cancelled, for a run it crashes and for recent runs that have ended
(`_cancel_queued_shards`); a shard run that starts anyway ends at once (`queued_shard_end`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from storage.catalog import Catalog, JobStatus, RunRecord, RunStatus

__all__ = [
    "OWNER_TAG",
    "ended_flow_runs",
    "is_uuid",
    "owner_alive",
    "owner_tag",
    "parse_worker_id",
    "process_owner",
    "queued_shard_end",
    "reap_crashed_runs",
    "requeue_abandoned",
    "worker_gone",
    "worker_id",
]

log = logging.getLogger(__name__)


def _start_ticks(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot; '' where /proc is not there; None-like
    '-' when the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "-" if Path("/proc/self/stat").exists() else ""
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may hold spaces: count fields after its ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def process_owner(pid: int | None = None) -> str:
    """`<host>:<pid>:<start ticks>` of this process (or of `pid`)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process named by an owner token still runs: None when it is on another host (or the
    token cannot be read), so nobody here can tell."""
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if not _pid_alive(pid):
        return False
    now = _start_ticks(pid)
    if now == "-":
        return False
    return not (start and now and start != now)  # another process took the pid


def queued_shard_end(run: RunRecord) -> Any:
    """The state a shard run of catalog run `run` ends with at once, before it loads a model or claims a job,
    when the run is no longer running: Cancelled, saying why (a shard run queued for a batch that crashed,
    was cancelled or ended, and that a worker picked up afterwards). None while the run is running."""
    if run.status == RunStatus.running:
        return None
    from prefect.states import Cancelled

    message = f"not started: its batch run {run.name} (run {run.id}) is {run.status.value} in the catalog"
    return Cancelled(message=message, data={"run_id": run.id, "counts": {}, "results": []})


# ------------------------------------------------------------------------------ workers and their claims


def worker_id() -> str:
    """'<host>:<pid>[:<flow run id>]': who holds a job's claim (this process, in the flow run it runs in);
    lets a later run see that the worker died (`worker_gone`)."""
    from prefect.runtime import flow_run

    run = flow_run.get_id()
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{run}" if run else "")


def parse_worker_id(worker: str | None) -> tuple[str, int | None, str | None]:
    """(host, pid, flow run id) of a `worker_id`; None for the parts it lacks or that do not read."""
    host, _, rest = (worker or "").partition(":")
    pid, _, flow_run_id = rest.partition(":")
    return host, int(pid) if pid.isdigit() else None, flow_run_id or None


def worker_gone(
    worker: str | None, claimed_at: datetime | None, timeout: timedelta, run_states: dict[str, str]
) -> str | None:
    """Why a running job's claim is abandoned, or None if its worker may still be at work.

    The claim is abandoned when its worker's flow run has ended (`run_states` maps flow run ids to the final
    state of those that have), when the process is gone from this very host, or when the claim is older
    than `timeout` (a worker elsewhere that died without its flow run being marked, for instance a machine
    that lost power).
    """
    host, pid, flow_run_id = parse_worker_id(worker)
    if flow_run_id and flow_run_id in run_states:
        return f"worker {worker}: its flow run ended {run_states[flow_run_id]}"
    if host == socket.gethostname() and pid is not None and not _pid_alive(pid):
        return f"worker {worker} is gone (process {pid} no longer exists)"
    if claimed_at is not None and datetime.now(UTC) - claimed_at > timeout:
        return f"claim by {worker} expired after {timeout}"
    return None


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_abandoned(catalog: Catalog, run_id: int, timeout: timedelta) -> int:
    """Give the run's running jobs whose worker died back to pending; returns how many."""
    running = catalog.jobs(run_id, status=JobStatus.running)
    flow_runs = {run for job in running if is_uuid(run := parse_worker_id(job.worker_id)[2])}
    ended = ended_flow_runs(flow_runs)
    requeued = 0
    for job in running:
        reason = worker_gone(job.worker_id, job.claimed_at, timeout, ended)
        if reason:
            requeued += catalog.requeue_abandoned([job.id], reason, worker=job.worker_id)
    return requeued


# ------------------------------------------------------------------------------------------ Prefect


def _final_states(flow_run_ids: Iterable[str | None], doing: str) -> dict[str, tuple[bool, str]] | None:
    """{flow run id: (whether its state is final, state name)} for the flow runs Prefect knows among these;
    None when Prefect can't be asked (`doing` says why we asked, for the log)."""
    ids = [i for i in flow_run_ids if is_uuid(i)]
    if not ids:
        return {}
    try:
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in ids]))
            )
    except Exception as exc:
        log.info("could not ask Prefect about %s: %s", doing, exc)
        return None
    return {str(r.id): (r.state.is_final(), r.state.name) for r in runs if r.state is not None}


def ended_flow_runs(flow_run_ids: Iterable[str | None]) -> dict[str, str]:
    """{flow run id: state name} of the flow runs Prefect knows as ended; {} when Prefect can't be asked."""
    states = _final_states(flow_run_ids, "unfinished runs") or {}
    return {run_id: name for run_id, (final, name) in states.items() if final}


def _mark_prefect_crashed(flow_run_id: str, message: str, crashed: RunRecord | None = None) -> None:
    """Set a flow run that still shows as running to Crashed, and with it the subflow runs that ran in its
    process (nothing when Prefect cannot be reached).

    A batch runs its shards as subflows in its own process unless they are deployed: when that process dies,
    nobody reports their end either, and they would show Running for ever. Deployed shard runs (those with a
    deployment) run on workers of their own, which report their own end: those that have started are left
    alone; with `crashed` (the catalog run crashed), those still waiting to start are cancelled.
    """
    try:
        from prefect import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterDeploymentId,
            FlowRunFilterParentFlowRunId,
        )
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(flow_run_id))
            if run.state is not None and not run.state.is_final():
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            parents, seen = [run.id], {run.id}
            while parents:  # subflows, then theirs
                children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents),
                    deployment_id=FlowRunFilterDeploymentId(is_null_=True),
                ))  # fmt: skip
                parents = [child.id for child in children if child.id not in seen]
                seen.update(parents)
                for child in children:
                    if child.id in parents and child.state is not None and not child.state.is_final():
                        why = f"{message}; it ran in the process of its parent flow run {flow_run_id}"
                        client.set_flow_run_state(child.id, Crashed(message=why), force=True)
            _crash_task_runs(client, list(seen), f"{message}; it ran in that flow run's process")
            if crashed is not None:
                _cancel_queued_shards(
                    client, {flow_run_id: dataclasses.replace(crashed, status=RunStatus.crashed)}
                )
    except Exception as exc:
        log.info("could not mark flow run %s crashed in Prefect: %s", flow_run_id, exc)


def _cancel_queued_shards(client: Any, batches: dict[str, RunRecord]) -> list[str]:
    """Set to Cancelled the deployed shard runs not yet started (Scheduled, Late or Pending) of these batch
    flow runs (`batches` maps a batch's flow run id to its ended catalog run), each with a message naming its
    batch; returns their ids. A child is the batch's shard when its `run_id` parameter is the run's id."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    by_run_id = {run.id: (flow_run_id, run) for flow_run_id, run in batches.items() if is_uuid(flow_run_id)}
    if not by_run_id:
        return []
    not_started = FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])
    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(i) for i, _ in by_run_id.values()]),
        deployment_id=FlowRunFilterDeploymentId(is_null_=False),
        state=FlowRunFilterState(type=not_started),
    ))  # fmt: skip
    cancelled = []
    for child in children:
        if child.parameters.get("run_id") not in by_run_id:
            continue
        flow_run_id, run = by_run_id[child.parameters["run_id"]]
        why = (f"wanflow: its batch run {run.name} (run {run.id}, flow run {flow_run_id}) is "
               f"{run.status.value}: a shard queued for it does not start")  # fmt: skip
        client.set_flow_run_state(child.id, Cancelled(message=why), force=True)
        log.warning("shard run %s (%s) cancelled: its batch run %s is %s", child.name, child.id, run.name,
                    run.status.value)  # fmt: skip
        cancelled.append(str(child.id))
    return cancelled


def _crash_task_runs(client: Any, flow_run_ids: list[UUID], message: str) -> None:
    """Set the task runs of these flow runs that still show as scheduled, pending or running to Crashed
    (a job's task, the task that called a shard subflow): nobody else will ever end them."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = TaskRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])
    for k in range(0, len(flow_run_ids), 100):
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids[k : k + 100])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=unfinished)),
        )
        for task_run in task_runs:
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)


OWNER_TAG = "wanflow-owner:"
ORPHANS_LOOKED_AT = 200  # unfinished top-level flow runs looked at for an owner tag


def owner_tag() -> str:
    """The Prefect tag that names this process as the owner of the flow runs it starts
    (`wanflow-owner:<host>:<pid>:<start>`): a flow run whose process died before the run reached the catalog
    is found by it."""
    return OWNER_TAG + process_owner()


def _crash_orphaned_flow_runs() -> list[str]:
    """Set to Crashed the top-level flow runs still unfinished in Prefect whose owner tag names a process of
    this host that is gone (killed before its run had a catalog row, which is how the reaper otherwise finds
    them), with their in-process subflows and task runs; returns their ids. Prefect must be configured."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    unfinished = FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=unfinished),
                    parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),
                ),
                limit=ORPHANS_LOOKED_AT,
            )
    except Exception as exc:
        log.info("could not ask Prefect about unfinished flow runs: %s", exc)
        return []
    orphans = []
    for run in runs:
        owners = [tag.removeprefix(OWNER_TAG) for tag in run.tags if tag.startswith(OWNER_TAG)]
        if owners and owner_alive(owners[0]) is False:
            log.warning("flow run %s (%s): its process %s is gone", run.name, run.id, owners[0])
            _mark_prefect_crashed(str(run.id), f"wanflow: the flow run's process ({owners[0]}) died")
            orphans.append(str(run.id))
    return orphans


def is_uuid(text: str | None) -> bool:
    try:
        UUID(str(text))
    except ValueError:
        return False
    return True


def reap_crashed_runs(
    catalog: Catalog, *, ask_prefect: bool = True, skip: int | None = None
) -> list[RunRecord]:
    """Mark `crashed` every unfinished run whose process is known to be gone; returns those runs.

    `skip` is a run id to leave alone (the caller's own). With `ask_prefect`, a run whose owner cannot be
    checked from here is crashed when its Prefect flow run has ended, and a dead owner's flow run that still
    shows Running in Prefect is set to Crashed, with the subflows that ran in its process; so is the flow run
    of a recent run that ended in the catalog just before its process died, Prefect not told. The deployed
    shard runs still waiting to start of a run crashed here, or of a recent run that has ended, are cancelled.
    """
    if ask_prefect:
        _crash_flow_runs_of_dead_processes(catalog, skip)
    unfinished = [r for r in catalog.unfinished_runs() if r.id != skip]
    if not unfinished:
        return []
    verdicts: dict[int, str] = {}
    unknown: list[RunRecord] = []
    for run in unfinished:
        alive = owner_alive(run.owner) if run.owner else None
        if alive is False:
            verdicts[run.id] = f"its process ({run.owner}) is gone"
        elif alive is None:
            unknown.append(run)
    if ask_prefect and unknown:
        ended = ended_flow_runs([r.flow_run_id for r in unknown if r.flow_run_id])
        for run in unknown:
            if run.flow_run_id in ended:
                verdicts[run.id] = f"its Prefect flow run ended {ended[run.flow_run_id]}"
    crashed = []
    for run in unfinished:
        if run.id in verdicts and catalog.mark_crashed(run.id):
            log.warning("run %s crashed: %s", run.name, verdicts[run.id])
            if ask_prefect and run.flow_run_id and is_uuid(run.flow_run_id):
                why = f"wanflow: the run's process died ({verdicts[run.id]})"
                _mark_prefect_crashed(run.flow_run_id, why, run)
            crashed.append(run)
    return crashed


RECENT_RUNS = 20  # finished runs looked at for a flow run that their dead process never ended in Prefect


def _crash_flow_runs_of_dead_processes(catalog: Catalog, skip: int | None) -> None:
    """Flow runs that a dead process left Running in Prefect, found two ways; and the shard runs queued for
    recent runs that have ended.

    A process killed before its run reached the catalog leaves a flow run that only its owner tag leads to
    (`_crash_orphaned_flow_runs`). A process killed after it finished its run in the catalog but before
    Prefect heard that its flow run ended leaves that flow run Running too: among the newest `RECENT_RUNS`
    runs, those finished whose owner is on this host and gone get such a flow run set to Crashed (the catalog
    keeps their status). Every one of those runs that has ended (crashed earlier, cancelled, failed or
    succeeded) gets its deployed shard runs that still wait to start cancelled."""
    ended = {
        run.flow_run_id: run for run in catalog.runs(limit=RECENT_RUNS)
        if run.id != skip and run.status not in (RunStatus.pending, RunStatus.running)
        and run.flow_run_id and is_uuid(run.flow_run_id)
    }  # fmt: skip
    candidates = {i: run for i, run in ended.items() if run.owner and owner_alive(run.owner) is False}
    with _running_prefect() as available:
        if not available:
            return
        _crash_orphaned_flow_runs()
        for flow_run_id in _unfinished_flow_runs(list(candidates)) if candidates else []:
            run = candidates[flow_run_id]
            log.warning("run %s (%s) ended without its Prefect flow run: marking it crashed", run.name,
                        run.status.value)  # fmt: skip
            why = f"wanflow: the run's process died after the run ended {run.status.value} in the catalog"
            _mark_prefect_crashed(flow_run_id, why)
        if ended:
            try:
                from prefect import get_client

                with get_client(sync_client=True) as client:
                    _cancel_queued_shards(client, ended)
            except Exception as exc:
                log.info("could not cancel the shard runs queued for ended runs: %s", exc)


@contextlib.contextmanager
def _running_prefect() -> Iterator[bool]:
    """Prefect's API as configured, else the local server of `PREFECT_HOME` if one runs (`wanflow catalog
    runs` outside a run); yields whether there is one. Never starts a server: Prefect would start a temporary
    one, which takes seconds, on every look at the catalog (nearly every recent run has a dead owner)."""
    from flows.local_server import local_server, prefect_home

    server = local_server()
    profiles = os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml"
    configured = os.environ.get("PREFECT_API_URL") or Path(profiles).exists() or "prefect" in sys.modules
    if not configured and server is None:
        yield False  # nothing configured (and Prefect not imported, which takes a second or two)
        return
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield True
    elif server is not None and server.healthy:
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            yield True
    else:
        yield False


def _unfinished_flow_runs(flow_run_ids: list[str]) -> list[str]:
    """The ids of those flow runs that Prefect shows as not yet final; [] when Prefect can't be asked."""
    states = _final_states(flow_run_ids, "the flow runs of ended runs") or {}
    return [run_id for run_id, (final, _) in states.items() if not final]
