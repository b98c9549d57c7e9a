"""Dataset manifests: a run's videos as one table (Parquet or JSON Lines) at any fsspec URL.

One row per video: where it is (uri, sha256, bytes, thumbnail, poster, sidecar, latents when kept), what it
shows (prompt, negative prompt, item id, seed), what made it (the run, the model id and fingerprint, every
generation setting under the manifest's own field names: size, frame_num, steps, shift, guide_scale,
solver), its inputs (image and last_image with their sha256), its fast modes (`loras`: a JSON list of {uri,
sha256, strength}, empty for none; `cache`: 'kind:threshold' or null; `dit_forwards` and
`dit_forwards_skipped`: the sampling loop's DiT forwards and those the step cache skipped, null without a
cache), its quality signals (motion, black, flat, frozen, black_frames, flat_frames, frozen_frames, phash:
`storage.signals`; null for videos stored before they were measured) and its shape (width, height, frames,
fps, codec). The request's parameters also travel whole, as a JSON string in `params`. The file is written
atomically, like every other object.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.catalog import Catalog, OutputRecord
from storage.outputs import SIGNAL_COLUMNS
from storage.video import write_bytes

__all__ = ["EXPORT_FORMATS", "EXPORT_SCHEMA", "cache_label", "dataset_rows", "export_run", "output_rows"]

EXPORT_FORMATS = ("parquet", "jsonl")

# Request parameters promoted to their own columns, under the manifest's field names.
_SETTINGS = (
    ("prompt", pa.string()), ("negative_prompt", pa.string()), ("size", pa.string()),
    ("frame_num", pa.int64()), ("steps", pa.int64()), ("shift", pa.float64()), ("guide_scale", pa.float64()),
    ("solver", pa.string()), ("image", pa.string()), ("image_sha256", pa.string()),
    ("last_image", pa.string()), ("last_image_sha256", pa.string()),
)  # fmt: skip
# Older jobs stored some settings under the official names.
_OLD_NAMES = {"steps": "sampling_steps", "solver": "sample_solver"}

EXPORT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
        ("item_id", pa.string()), ("seed", pa.int64()), *_SETTINGS,
        ("model_id", pa.string()), ("model_fingerprint", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("frames", pa.int64()), ("fps", pa.float64()),
        ("codec", pa.string()), ("thumbnail_uri", pa.string()), ("poster_uri", pa.string()),
        ("sidecar_uri", pa.string()), ("latents_uri", pa.string()), ("job_id", pa.int64()),
        ("run_id", pa.int64()), ("run", pa.string()),
        ("loras", pa.string()), ("cache", pa.string()), ("dit_forwards", pa.int64()),
        ("dit_forwards_skipped", pa.int64()), ("motion", pa.float64()), ("black_frames", pa.int64()),
        ("flat_frames", pa.int64()), ("frozen_frames", pa.int64()), ("black", pa.bool_()),
        ("flat", pa.bool_()), ("frozen", pa.bool_()), ("phash", pa.string()), ("clip_score", pa.float64()),
        ("params", pa.string()),
    ]
)  # fmt: skip


def dataset_rows(catalog: Catalog, run_id: int | None) -> list[dict[str, Any]]:
    """The rows of the dataset manifest for a run (all runs when None), in job order. `run` names the run
    whose worker made the video."""
    return [row for row, _ in output_rows(catalog, run_id)]


def output_rows(
    catalog: Catalog, run_id: int | None, where: Iterable[Any] = ()
) -> list[tuple[dict[str, Any], OutputRecord]]:
    """(the dataset manifest's row, the output) of each output of a run (all runs when None) that meets
    `where` (`storage.catalog.filters` conditions), in job order."""
    jobs = {job.id: job for job in catalog.jobs(run_id=run_id)}
    run_names: dict[int, str | None] = {}

    def run_name(made_by: int | None) -> str | None:
        if made_by is not None and made_by not in run_names:
            run = catalog.get_run(made_by)
            run_names[made_by] = run.name if run else None
        return run_names.get(made_by) if made_by is not None else None

    rows = []
    for output in catalog.outputs(run_id=run_id, where=where):
        job = jobs[output.job_id]
        params = dict(job.params)
        row = {name: params.get(name, params.get(_OLD_NAMES.get(name, name))) for name, _ in _SETTINGS}
        made_by = job.last_run_id if job.last_run_id is not None else job.first_run_id
        row.update(
            uri=output.uri, sha256=output.sha256, bytes=output.bytes, item_id=job.item_id, seed=job.seed,
            model_id=job.model_id, model_fingerprint=job.model_fingerprint, width=output.width,
            height=output.height, frames=output.frames, fps=output.fps, codec=output.codec,
            thumbnail_uri=output.thumbnail_uri, poster_uri=output.poster_uri, sidecar_uri=output.sidecar_uri,
            latents_uri=output.latents_uri,
            job_id=job.id, run_id=made_by, run=run_name(made_by),
            loras=json.dumps(params.get("loras") or [], ensure_ascii=False),
            cache=cache_label(params.get("cache")),
            dit_forwards=output.dit_forwards, dit_forwards_skipped=output.dit_forwards_skipped,
            **{name: getattr(output, name) for name in SIGNAL_COLUMNS}, clip_score=output.clip_score,
            params=json.dumps(params, sort_keys=True, ensure_ascii=False),
        )  # fmt: skip
        rows.append((row, output))
    rows.sort(key=lambda pair: pair[0]["job_id"])
    return rows


def cache_label(cache: Any) -> str | None:
    """A job's step cache ({"kind", "threshold"}) as 'kind:threshold'; None without one."""
    return f"{cache['kind']}:{cache['threshold']:g}" if isinstance(cache, dict) else None


def export_run(
    catalog: Catalog, run_id: int | None, url: str, fmt: str, storage_options: dict | None = None
) -> int:
    """Write the run's dataset manifest to `url` as `fmt` ("parquet" or "jsonl"); returns the row count."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    rows = dataset_rows(catalog, run_id)
    if fmt == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    else:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA), buffer)
        data = buffer.getvalue()
    write_bytes(url, data, storage_options=storage_options)
    return len(rows)
