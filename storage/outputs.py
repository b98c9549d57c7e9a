"""One job's output, end to end: frames -> video, thumbnail, poster and sidecar -> catalog row.

The catalog row is written last, in one transaction, and only after every object is committed, so a
row never points at a missing object. If anything fails on the way, the objects this call already
committed are removed again (best effort) and the error propagates: the caller decides whether the
job is retried (`Catalog.mark_failed(..., retry=...)`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from storage.catalog import LATENTS_CODEC, Catalog, JobRecord, OutputRecord
from storage.faults import abort_open_uploads, filesystem
from storage.layout import ObjectKeys, OutputLayout, sidecar_bytes
from storage.signals import VideoSignals
from storage.urls import redact, redact_options
from storage.video import VideoWriter, contact_sheet, verify_object, write_bytes, write_image

__all__ = ["LATENTS_KEY", "POSTER_FRAMES", "SIGNAL_COLUMNS", "latents_file", "store_job_output", "verifier"]

log = logging.getLogger(__name__)

THUMBNAIL_WIDTH = 512
POSTER_FRAMES = 8
POSTER_TILE_WIDTH = 256  # frames narrower than this are not blown up
# The quality signals the output row keeps: every `VideoSignals` field but the frame count (a column already).
SIGNAL_COLUMNS = tuple(f.name for f in dataclasses.fields(VideoSignals) if f.name != "frames")


def store_job_output(
    catalog: Catalog,
    job: JobRecord,
    frames: Iterable[Any],
    *,
    layout: OutputLayout,
    run_name: str,
    width: int,
    height: int,
    fps: int = 16,
    storage_options: dict | None = None,
    provenance: Mapping[str, Any] | None = None,
    device: str | None = None,
    peak_memory_bytes: int | Callable[[], int | None] | None = None,
    seconds: float | None = None,
    sampling: Callable[[], Mapping[str, Any] | None] | None = None,
    latents: Callable[[], tuple[Any, Mapping[str, str]] | None] | None = None,
    video: bool = True,
    score: Callable[[list[Any]], float] | None = None,
) -> OutputRecord:
    """Stream `frames` (uint8 chunks [n, H, W, 3]) into the job's objects and record the output.

    `provenance` (request, model and fingerprint, sampler settings, noise device, timings, ...) goes into
    the JSON sidecar next to the video, credentials masked. `device`, `peak_memory_bytes` and `seconds`
    (defaults to the time since the claim) go into the catalog; `peak_memory_bytes` may be a function, read
    once every frame has been consumed (frames usually come from a lazy generator that does the work).
    `sampling`, read then too, gives what the sampling loop counted ({"dit_forwards": n,
    "dit_forwards_skipped": k} under a step cache, else None): the sidecar's `sampling` entry and the
    output row's columns of those names. The quality signals measured on the frames as they were encoded
    (`storage.signals`) go into the sidecar (`signals`) and the row. `latents`, read then too, gives the
    video's final latents (a tensor) and text metadata for their file (shape, normalisation), or None: they
    are stored as safetensors beside the video, before the sidecar, and recorded in both. With `video`
    False (a latents-only job: no VAE decode but the first frame's) `frames` holds the first frame alone,
    which becomes the thumbnail; the output's `uri`, `sha256` and `bytes` are the latents file's and its
    `codec` is `LATENTS_CODEC` (no poster, no signals). `score`, given the video's poster frames (up to
    `POSTER_FRAMES` evenly spaced, full size, uint8 [H, W, 3]), returns its text-video similarity: the
    `clip_score` of the row and the sidecar's signals. Only the worker holding the job's claim
    (`job.worker_id`) can record it. Returns the catalog's output record.
    """
    keys = layout.keys(run_name, job.item_id, job.seed)
    written: list[str] = []
    start = time.perf_counter()
    # An earlier attempt killed mid-upload left its multipart uploads open (billed, never visible): this
    # worker holds the job's claim, so any upload under the job's own keys is such a leftover.
    abort_open_uploads(keys.video.removesuffix(".mp4") + ".", storage_options, folder=False)
    try:
        clip: dict[str, Any] = {}
        if video:
            facts, signals, kept_frames = _store_video(
                keys, frames, width, height, fps, storage_options, written, full_frames=score is not None
            )
            peak = peak_memory_bytes() if callable(peak_memory_bytes) else peak_memory_bytes  # before scoring
            if score is not None:
                clip = {"clip_score": float(score(kept_frames)), "clip_score_frames": len(kept_frames)}
        else:
            facts, signals = _store_first_frame(keys, frames, storage_options, written), None
            peak = peak_memory_bytes() if callable(peak_memory_bytes) else peak_memory_bytes
        counted = dict(sampling() or {}) if sampling is not None else {}
        kept = latents() if latents is not None else None
        stored_latents: dict[str, Any] = {}
        if kept is not None:
            tensor, metadata = kept
            data = latents_file(tensor, metadata)
            sha, size = write_bytes(keys.latents, data, storage_options=storage_options)
            written.append(keys.latents)
            stored_latents = {"latents_uri": keys.latents, "latents_sha256": sha, "latents_bytes": size}
            if not video:  # the output is the latents file, standing for the video it decodes to
                frame_count = _video_frames(tensor, metadata)
                facts.update(uri=keys.latents, sha256=sha, bytes=size, width=width, height=height,
                             frames=frame_count, fps=fps, codec=LATENTS_CODEC)  # fmt: skip
        elif not video:
            raise ValueError("a latents-only output needs the latents: `latents` gave none")
        sidecar = {
            **redact_options(provenance),
            "job": {
                key: getattr(job, key)
                for key in ("id", "key", "item_id", "seed", "model_id", "model_fingerprint", "params")
            },
            "output": dict(facts),
            **({"sampling": counted} if counted else {}),
            **({"signals": {**signals.as_dict(), **clip}} if signals is not None else {}),
            **({"latents": {**stored_latents, **dict(kept[1])}} if kept is not None else {}),
            "store_seconds": round(time.perf_counter() - start, 3),
        }  # fmt: skip
        write_bytes(keys.sidecar, sidecar_bytes(sidecar), storage_options=storage_options)
        written.append(keys.sidecar)
    except BaseException:
        _remove(written, storage_options)
        raise
    # Past this point the objects stay even if recording fails: the job may have been claimed again by
    # another worker whose row points at these very keys. Unrecorded objects are simply overwritten
    # when the job is redone.
    measured = {name: getattr(signals, name) for name in SIGNAL_COLUMNS} if signals is not None else {}
    record = OutputRecord(
        **facts, sidecar_uri=keys.sidecar, device=device, peak_memory_bytes=peak,
        dit_forwards=counted.get("dit_forwards"), dit_forwards_skipped=counted.get("dit_forwards_skipped"),
        **measured, **stored_latents, clip_score=clip.get("clip_score"),
    )  # fmt: skip
    return catalog.mark_succeeded(job.id, record, seconds=seconds, worker=job.worker_id)


def _store_video(
    keys: ObjectKeys, frames: Iterable[Any], width: int, height: int, fps: int,
    storage_options: dict | None, written: list[str], *, full_frames: bool = False,
) -> tuple[dict[str, Any], Any, list[np.ndarray]]:  # fmt: skip
    """Encode the frames into the video, then its thumbnail and poster; (the output's facts, the signals, the
    poster's frames: full size with `full_frames`, else shrunk)."""
    with VideoWriter(
        keys.video, width=width, height=height, fps=fps, storage_options=storage_options,
        keep_frames=POSTER_FRAMES, **({"kept_width": None} if full_frames else {}),
    ) as video:  # fmt: skip
        for chunk in frames:
            video.write(chunk)
    written.append(keys.video)
    write_image(keys.thumbnail, video.first_frame, format="webp", storage_options=storage_options,
                max_width=THUMBNAIL_WIDTH)  # fmt: skip
    written.append(keys.thumbnail)
    write_image(
        keys.poster,
        contact_sheet(video.kept_frames, tile_width=min(POSTER_TILE_WIDTH, width)),
        format="webp",
        storage_options=storage_options,
    )
    written.append(keys.poster)
    assert video.signals is not None
    facts = dict(
        uri=keys.video, sha256=video.sha256, bytes=video.nbytes, width=width, height=height,
        frames=video.frames, fps=fps, codec=video.codec, thumbnail_uri=keys.thumbnail, poster_uri=keys.poster,
    )  # fmt: skip
    return facts, video.signals.result(), video.kept_frames


def _store_first_frame(
    keys: ObjectKeys, frames: Iterable[Any], storage_options: dict | None, written: list[str]
) -> dict[str, Any]:
    """A latents-only output: the frames hold the first frame alone (uint8 [1, H, W, 3]), its thumbnail;
    nothing else is decoded, so there is no video, poster or signal. Returns the facts known so far."""
    first = None
    for chunk in frames:  # drained: the producer may still be finishing (a worker group's Done)
        if first is None and len(chunk):
            first = np.asarray(chunk[0])
    if first is None:
        raise ValueError("a latents-only output needs its first frame for the thumbnail: none came")
    write_image(keys.thumbnail, first, format="webp", storage_options=storage_options,
                max_width=THUMBNAIL_WIDTH)  # fmt: skip
    written.append(keys.thumbnail)
    return {"thumbnail_uri": keys.thumbnail, "poster_uri": None}


def _video_frames(latents: Any, metadata: Mapping[str, str]) -> int:
    """Frames the latents [z, T, h, w] decode to: 1 + stride_t * (T - 1) (`vae_stride` in the metadata)."""
    stride = json.loads(metadata.get("vae_stride", "[4, 8, 8]"))[0]
    return 1 + int(stride) * (int(latents.shape[1]) - 1)


def _remove(urls: list[str], storage_options: dict | None) -> None:
    """Best effort: remove objects a failed job committed (a failure here is logged, not raised)."""
    for url in urls:
        try:
            fs, path = filesystem(url, storage_options)
            fs.rm_file(path)
        except Exception as exc:  # the job's own error is the one to raise
            log.warning("could not remove %s after a failed job: %s", redact(url), redact(str(exc)))


def verifier(storage_options: dict | None = None):
    """A `verify` callable for `Catalog.plan_jobs`: the video exists with the recorded size and sha256, and so
    do its latents when it has them."""

    def verify(output: OutputRecord) -> bool:
        if not verify_object(output.uri, output.sha256, output.bytes, storage_options):
            return False
        if output.latents_uri in (None, output.uri):  # none, or a latents-only output's own object
            return True
        assert output.latents_sha256 is not None and output.latents_bytes is not None
        return verify_object(output.latents_uri, output.latents_sha256, output.latents_bytes, storage_options)

    return verify


LATENTS_KEY = "latents"


def latents_file(latents: Any, metadata: Mapping[str, str]) -> bytes:
    """A safetensors file of one tensor named `latents` (contiguous, on the CPU) with text `metadata`."""
    from safetensors.torch import save

    return save({LATENTS_KEY: latents.detach().to("cpu").contiguous()}, metadata=dict(metadata))
