"""Versioned dataset snapshots: each export of a saved selection recorded as `<name>` v1, v2, ... with the
samples it holds, so that a training run can name the exact snapshot it used.

`record_snapshot` gives the next version of a name, unless the latest version already holds the same
content (`content_sha256` over the samples' keys, jobs and video sha256, and the format): then that version
is returned and nothing is written. Every function takes an open `Session`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.catalog.records import CatalogError, SnapshotRecord, _json_ready, _now, _storable
from storage.catalog.tables import Snapshot, SnapshotSample, _record
from storage.urls import redact

__all__ = [
    "content_sha256", "latest_snapshot", "next_version", "record_snapshot", "snapshot_samples", "snapshots",
]  # fmt: skip


def content_sha256(fmt: str, samples: Iterable[tuple[str, int, str]]) -> str:
    """sha256 over the format and the sorted (key, job id, video sha256) of the samples."""
    text = json.dumps([fmt, sorted([key, int(job), sha] for key, job, sha in samples)])
    return hashlib.sha256(text.encode()).hexdigest()


def latest_snapshot(session: Session, name: str) -> SnapshotRecord | None:
    row = session.scalars(
        select(Snapshot).where(Snapshot.name == _storable(name)).order_by(Snapshot.version.desc()).limit(1)
    ).one_or_none()
    return None if row is None else _record(SnapshotRecord, row)


def record_snapshot(
    session: Session, name: str, uri: str, fmt: str, selection: Mapping[str, Any],
    samples: Sequence[tuple[str, int, str]], nbytes: int, flow_run_id: str | None = None,
    version: int | None = None, content: str | None = None,
) -> tuple[SnapshotRecord, bool]:  # fmt: skip
    """(the snapshot, whether it is new): `samples` are (key, job id, video sha256). The next version of
    `name` (or `version`, which must be that next one: the export was written under it), unless the latest
    version holds the same content: `content` (default `content_sha256(fmt, samples)`)."""
    if not name.strip():
        raise CatalogError("a snapshot needs a name")
    digest = content or content_sha256(fmt, samples)
    latest = latest_snapshot(session, name)
    if latest is not None and latest.content_sha256 == digest:
        return latest, False
    expected = next_version(session, name)
    if version is not None and version != expected:
        raise CatalogError(f"snapshot {name!r}: version {version} was asked for, the next one is {expected}")
    row = Snapshot(
        name=_storable(name), version=expected, uri=_storable(redact(uri)), format=fmt,
        selection=_json_ready(selection), content_sha256=digest, samples=len(samples), bytes=int(nbytes),
        flow_run_id=flow_run_id, created_at=_now(),
    )  # fmt: skip
    session.add(row)
    session.flush()
    session.add_all(
        SnapshotSample(snapshot_id=row.id, key=_storable(key), job_id=int(job), sha256=sha)
        for key, job, sha in samples
    )
    session.flush()
    return _record(SnapshotRecord, row), True


def next_version(session: Session, name: str) -> int:
    """The version the next snapshot of `name` gets (1 for a new name)."""
    found = session.scalar(select(func.max(Snapshot.version)).where(Snapshot.name == _storable(name)))
    return int(found or 0) + 1


def snapshots(session: Session, name: str | None = None) -> list[SnapshotRecord]:
    """Snapshots by name and version (of `name` only, when given)."""
    query = select(Snapshot).order_by(Snapshot.name, Snapshot.version)
    if name is not None:
        query = query.where(Snapshot.name == _storable(name))
    return [_record(SnapshotRecord, row) for row in session.scalars(query)]


def snapshot_samples(session: Session, snapshot_id: int) -> list[dict[str, Any]]:
    """The samples of a snapshot: key, job id and video sha256, by key."""
    query = (
        select(SnapshotSample).where(SnapshotSample.snapshot_id == snapshot_id).order_by(SnapshotSample.key)
    )
    return [{"key": s.key, "job_id": s.job_id, "sha256": s.sha256} for s in session.scalars(query)]
