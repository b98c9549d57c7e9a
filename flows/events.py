"""Progress events of this process's runs, for whoever watches them here (the terminal progress bar of
`wanflow generate`; tests).

Events are dicts. A finished job: {"run_id", "job_id", "item_id", "seed", "status" ("succeeded" or
"failed"), "error"}. Others carry an "event" key:

- {"event": "planned", "run_id", "run_name", "total"}: the run is planned, `total` jobs to make;
- {"event": "started", "run_id", "job_id", "item_id", "seed", "attempt"}: a worker here claimed a job and
  starts an attempt at it;
- {"event": "retrying", "run_id", "job_id", "item_id", "seed", "attempt", "attempts", "error"}: a job's
  attempt failed and the next one (number `attempt` of `attempts`) follows;
- {"event": "progress", "run_id", "completed"}: jobs of the run finished on workers elsewhere (deployed
  shards), counted from the catalog.

Listeners run in the thread that notifies, between jobs: they must be quick and must not raise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Listener", "add_progress_listener", "notify"]

Listener = Callable[[dict[str, Any]], None]
_listeners: list[Listener] = []


@contextmanager
def add_progress_listener(listener: Listener) -> Iterator[None]:
    """Call `listener` with every event of this process while the context is open."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def notify(event: dict[str, Any]) -> None:
    """Hand `event` to every listener."""
    for listener in list(_listeners):
        listener(event)
