"""What the catalog hands out and takes in: statuses, records, job specs and keys, and `CatalogError`.

Nothing here touches SQL. Also the text rules every stored value follows: keys are sha256 of canonical JSON
(`job_key`), error texts are cut and redacted (`_clean_error`), and no text holds a character a column
cannot store (`_storable`). Times are timezone-aware UTC (`_now`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from storage.urls import redact, redact_options

MAX_ERROR_CHARS = 4000
LATENTS_CODEC = "latents"  # `outputs.codec` of a latents-only output (no video decoded)
MAX_ID = 2**31 - 1  # ids are INTEGER columns: larger numbers name nothing
_PLAN_CHUNK = 500


class CatalogError(RuntimeError):
    """A catalog problem a person can act on: bad URL, unreachable database, old schema, bad state."""


class JobStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"


class RunStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    crashed = "crashed"  # its process died without ending it (seen by a later run or `catalog runs`)


class PlanOutcome(enum.StrEnum):
    """What planning did with a job for one run (stored in `run_jobs.outcome`)."""

    created = "created"
    already_done = "already_done"
    requeued = "requeued"
    already_planned = "already_planned"


def _now() -> datetime:
    return datetime.now(UTC)


# -------------------------------------------------------------------------------------------- records


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: datetimes as ISO 8601 strings, enums as their values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, enum.Enum):
                value = value.value
            out[f.name] = value
        return out


@dataclasses.dataclass(frozen=True)
class RunRecord(_Record):
    id: int
    name: str
    manifest_uri: str
    manifest_sha256: str
    settings: dict[str, Any]
    status: RunStatus
    flow_run_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    owner: str | None = None


@dataclasses.dataclass(frozen=True)
class JobRecord(_Record):
    """A job; listed for a run, `status` is that run's view (`skipped` if found done) and `outcome` is set."""

    id: int
    key: str
    first_run_id: int
    item_id: str
    seed: int
    model_id: str
    model_fingerprint: str
    params: dict[str, Any]
    status: JobStatus
    attempts: int
    last_error: str | None
    worker_id: str | None
    created_at: datetime
    claimed_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None
    storage_root: str | None = None
    last_run_id: int | None = None
    outcome: PlanOutcome | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputRecord(_Record):
    """A committed output: a video, or for a latents-only job (`codec` `LATENTS_CODEC`) its latents file,
    `uri` then naming the latents (as `latents_uri` does), `sha256`/`bytes` theirs, and `width`, `height`,
    `frames`, `fps` those of the video they decode to. Build one without `id`, `job_id`, `created_at` for
    `mark_succeeded`."""

    uri: str
    sha256: str
    bytes: int
    width: int
    height: int
    frames: int
    fps: float
    codec: str
    thumbnail_uri: str | None = None
    sidecar_uri: str | None = None
    poster_uri: str | None = None
    device: str | None = None
    peak_memory_bytes: int | None = None
    dit_forwards: int | None = None  # DiT forwards of the sampling loop (counted under a step cache)
    dit_forwards_skipped: int | None = None  # of which the step cache skipped
    motion: float | None = None  # quality signals (storage/signals.py), None: not measured
    black_frames: int | None = None
    flat_frames: int | None = None
    frozen_frames: int | None = None
    black: bool | None = None
    flat: bool | None = None
    frozen: bool | None = None
    phash: str | None = None
    clip_score: float | None = None  # text-video similarity (wan.clip_score), where a CLIP file is configured
    latents_uri: str | None = None  # the final latents (safetensors), when the run kept them
    latents_sha256: str | None = None
    latents_bytes: int | None = None
    job_id: int | None = None
    id: int | None = None
    created_at: datetime | None = None

    @property
    def has_video(self) -> bool:
        """False for a latents-only output: no video was decoded, `uri` is the latents file."""
        return self.codec != LATENTS_CODEC


@dataclasses.dataclass(frozen=True)
class SnapshotRecord(_Record):
    """A versioned dataset export (`storage.catalog.snapshots`): what was selected, where it was written,
    how many samples and bytes, and `content_sha256` over its samples (key, job, video sha256) and format."""

    id: int
    name: str
    version: int
    uri: str
    format: str
    selection: dict[str, Any]
    content_sha256: str
    samples: int
    bytes: int
    flow_run_id: str | None
    created_at: datetime


@dataclasses.dataclass(frozen=True)
class RejectionRecord(_Record):
    """A manifest row a run did not take: where it was (line or row), which field, and why."""

    id: int
    run_id: int
    line: int
    item_id: str | None
    field: str | None
    reason: str
    raw: str | None
    created_at: datetime


class JobSpec(NamedTuple):
    """One job to plan: `params` are the generation parameters (prompt, size, steps, ...); `storage_root`
    is where its output goes (absolute), part of its identity."""

    item_id: str
    seed: int
    model_id: str
    model_fingerprint: str
    params: Mapping[str, Any]
    storage_root: str | None = None


class JobGroupRow(NamedTuple):
    """What decides which shard a job goes to."""

    job_id: int
    model_id: str
    size: str | None
    frame_num: int | None
    loras: list[dict[str, Any]] | None = None  # the job's LoRA set (params' `loras`), None: none
    cache: dict[str, Any] | None = None  # its step cache (params' `cache`), None: none


class PlanSummary(NamedTuple):
    """What `plan_jobs` did: new jobs, jobs already done (the run skips them), jobs put back to pending,
    and `total` distinct jobs linked to the run. The rest (`already_planned`) were pending or running."""

    created: int
    already_done: int
    requeued: int
    total: int

    @property
    def already_planned(self) -> int:
        return self.total - self.created - self.already_done - self.requeued


# ---------------------------------------------------------------------------------------------- keys


def _canonical(value: Any, where: str) -> Any:
    """JSON-ready copy with integral floats as ints (5.0 and 5 hash alike) and tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a finite number")
        return int(value) if value.is_integer() else value
    if isinstance(value, enum.Enum):
        return _canonical(value.value, where)
    if value is None or isinstance(value, str | int | bool):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not JSON (expected str, number, bool, list, dict)")


def job_key(
    model_fingerprint: str, params: Mapping[str, Any], seed: int, storage_root: str | None = None
) -> str:
    """sha256 hex of canonical JSON (sorted keys, no spaces) of the fingerprint, `params`, the seed and,
    when given, the storage root (a video under another root is another job)."""
    doc = {"model_fingerprint": model_fingerprint, "params": _canonical(params, "params"), "seed": int(seed)}
    if storage_root is not None:
        doc["storage_root"] = storage_root
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_key(spec: JobSpec) -> str:
    """The key `plan_jobs` gives the job of `spec`."""
    return job_key(spec.model_fingerprint, _job_params(spec), spec.seed, spec.storage_root)


def _job_params(spec: JobSpec) -> dict[str, Any]:
    """The parameters stored with a job and hashed into its key: `spec.params` plus item and model id."""
    params = _canonical(spec.params, "params")
    for name, value in (("item_id", spec.item_id), ("model_id", spec.model_id)):
        if params.setdefault(name, value) != value:
            raise CatalogError(
                f"job spec for item {spec.item_id!r}: params[{name!r}] disagrees with {value!r}"
            )
    return params


def _json_ready(value: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip of free-form settings (anything not JSON becomes its str()), credentials masked."""
    return json.loads(json.dumps(redact_options(value), default=str))


_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def _storable(text: str) -> str:
    """`text` with the characters no catalog column can hold (NUL; PostgreSQL refuses it, SQLite cuts
    strings at it in places; lone surrogates, which are not UTF-8) written out visibly as `\\x00`,
    `\\udc80`: the same on both databases."""
    return _UNSTORABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if m[0] == "\x00" else f"\\u{ord(m[0]):04x}", text)


def _clean_error(text: str) -> str:
    """Error text for the catalog: head and tail of long texts, cut at whitespace, then redacted.

    Cutting between whitespace-separated tokens never splits a URL, so no half a password escapes `redact`.
    """
    if len(text) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2
        head, tail = text[:half], text[-half:]
        head = head[: max(head.rfind(c) for c in " \t\n") + 1]
        first_space = re.search(r"\s", tail)
        tail = tail[first_space.start() :] if first_space else ""
        text = f"{head}\n... [{len(text) - len(head) - len(tail)} characters cut] ...\n{tail}"
    return _storable(redact(text))
