"""Runs whose process died: who owns a run, whether that process still lives, and marking the dead crashed.

A batch run records its owner as `<host>:<pid>:<start>`, where `<start>` is the process's start time in
clock ticks since boot (Linux `/proc/<pid>/stat`, field 22; empty elsewhere). A process id can be reused
after its process dies; the start time tells a new process from the old one.

`reap_crashed_runs` looks at every run still `pending` or `running` in the catalog and marks `crashed` those
whose owner is on this host and gone, or whose Prefect flow run has already ended (when Prefect can be
asked), setting the Prefect flow run to Crashed too where it still shows Running, with the shard subflows
that ran in its process. Runs owned by other hosts are left to those hosts, or to their flow run's state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from uuid import UUID

from storage.catalog import Catalog, RunRecord, RunStatus

__all__ = ["ended_flow_runs", "is_uuid", "owner_alive", "process_owner", "reap_crashed_runs"]

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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_ticks(pid)
    if now == "-":
        return False
    return not (start and now and start != now)  # another process took the pid


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


def _mark_prefect_crashed(flow_run_id: str, message: str) -> None:
    """Set a flow run that still shows as running to Crashed, and with it the subflow runs that ran in its
    process (nothing when Prefect cannot be reached).

    A batch runs its shards as subflows in its own process unless they are deployed: when that process dies,
    nobody reports their end either, and they would show Running for ever. Deployed shard runs (those with a
    deployment) run on workers of their own, which report their own end: they are left alone.
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
    except Exception as exc:
        log.info("could not mark flow run %s crashed in Prefect: %s", flow_run_id, exc)


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
    of a recent run that ended in the catalog just before its process died, Prefect not told.
    """
    if ask_prefect:
        _crash_flow_runs_of_finished_runs(catalog, skip)
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
                _mark_prefect_crashed(run.flow_run_id, why)
            crashed.append(run)
    return crashed


RECENT_RUNS = 20  # finished runs looked at for a flow run that their dead process never ended in Prefect


def _crash_flow_runs_of_finished_runs(catalog: Catalog, skip: int | None) -> None:
    """A process killed after it finished its run in the catalog but before Prefect heard that its flow run
    ended leaves that flow run Running for ever. Among the newest `RECENT_RUNS` runs, those finished whose
    owner is on this host and gone get such a flow run set to Crashed (the catalog keeps their status)."""
    candidates = {
        run.flow_run_id: run for run in catalog.runs(limit=RECENT_RUNS)
        if run.id != skip and run.status not in (RunStatus.pending, RunStatus.running) and run.owner
        and run.flow_run_id and is_uuid(run.flow_run_id) and owner_alive(run.owner) is False
    }  # fmt: skip
    if not candidates:
        return
    with _running_prefect() as available:
        if not available:
            return
        for flow_run_id in _unfinished_flow_runs(list(candidates)):
            run = candidates[flow_run_id]
            log.warning("run %s (%s) ended without its Prefect flow run: marking it crashed", run.name,
                        run.status.value)  # fmt: skip
            why = f"wanflow: the run's process died after the run ended {run.status.value} in the catalog"
            _mark_prefect_crashed(flow_run_id, why)


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
