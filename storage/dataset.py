"""Training-ready datasets from the catalog: WebDataset tar shards, or a Hugging Face `videofolder`.

`export_dataset(catalog, url, fmt=..., selection=...)` picks videos (`select_samples`: some runs or all, a
`--where` filter on the quality signals, one model, one LoRA, near-duplicates dropped) and writes them under
`url` (a local folder or any fsspec URL) as one of

    webdataset   shard-000000.tar, shard-000001.tar, ...   about `shard_size` bytes each; per sample
                     <key>.mp4          the video, byte for byte as stored (none for a latents-only output)
                     <key>.json         every setting: the `storage.export` row of the video (prompt,
                                        model and fingerprint, size, frame_num, steps, shift, guide_scale,
                                        solver, input images and their sha256, loras, cache, signals, ...)
                     <key>.webp         its thumbnail (when it has one)
                     <key>.safetensors  its final latents (when the run kept them)
                 index.parquet          one row per sample: key, shard, the export row's columns
                 shards.parquet         one row per shard: shard, samples, bytes, sha256
    hf           videos/<key>.mp4, thumbnails/<key>.webp, latents/<key>.safetensors
                 metadata.parquet       one row per sample: file_name (the video, relative to the folder),
                                        thumbnail, latents (relative paths or null), key, the export
                                        row's columns
                 (latents-only outputs: no videos/; `first_frame_file_name` is the thumbnail, so the folder
                 loads as an `imagefolder` with a `first_frame` image and a `latents` column naming each
                 file; a selection mixing them with videos is refused)

and, for both, `README.md` (a dataset card: counts, models, settings, signals, provenance, how to load it)
and `export.json` (the manifest below). A sample's key is `<run>/<item>-s<seed>`, the run that made the
video and its item id made safe for keys (`storage.layout.safe_name`, with `.` encoded too: WebDataset
splits a member's name at the first dot of its base name, so the key holds none and each member is one
field: `mp4`, `json`, `webp`, `safetensors`).

Checks: the selection trusts the catalog; every byte packed is checked while it is read. A video (or its
latents) that is missing or whose size or sha256 differs from the catalog's is skipped, never packed, and
reported (summary, manifest, card) with the reason. A missing thumbnail is left out silently.

Idempotent and resumable: the work is cut into parts (a shard; in `hf`, one sample's files), each with a
fingerprint of what goes in it (keys, sha256s, metadata). `export.json` records each part's fingerprint and
the size and sha256 of the objects written for it. A part whose fingerprint is unchanged and whose objects
are all there with their recorded sizes is kept, not rebuilt (sizes from one listing, nothing is read back);
so is a part that skipped samples while the objects it missed are in the same state (still missing, say).
The index, card and metadata are rewritten only when their bytes change, and the manifest keeps its
`created_at` while the export's content is the same: exporting the same selection to the same URL again
writes nothing. Every object is written atomically (local: hidden temporary file renamed into place; S3: one
PUT or a multipart upload completed at the end): a shard appears whole or not at all. The manifest is saved
(`complete: false`) after every new shard (and every 30 s in `hf`), so an export killed midway is completed
by running it again: parts already written are kept. Leftovers of a killed export (hidden `.partial` files,
open S3 uploads under `url`) are cleaned up when it runs again. Objects an earlier export to the same URL
recorded but this one does not produce are removed; nothing else under `url` is touched. Run one export
per URL at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import statistics
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.catalog import Catalog, OutputRecord, RunRecord
from storage.catalog.filters import parse_filter
from storage.export import EXPORT_SCHEMA as ROW_SCHEMA  # the export's columns and their types
from storage.export import output_rows
from storage.faults import abort_open_uploads, filesystem, storage_errors
from storage.layout import safe_name, software_versions
from storage.signals import DuplicateIndex
from storage.urls import absolute_url, join_url, redact
from storage.video import abort_quietly, object_info, open_sink, write_bytes

__all__ = [
    "DATASET_FORMATS", "DEFAULT_SHARD_BYTES", "ExportSummary", "Sample", "Selection", "export_dataset",
    "select_samples",
]  # fmt: skip

DATASET_FORMATS = ("webdataset", "hf")
DEFAULT_SHARD_BYTES = 2**30
MANIFEST, CARD = "export.json", "README.md"
INDEX, SHARDS, METADATA = "index.parquet", "shards.parquet", "metadata.parquet"
MANIFEST_SCHEMA = "wanflow.dataset/1"
_CHECKPOINT_S = 30.0  # hf: the manifest is saved at least this often while files are written
_TAR_OVERHEAD = 4 * 512  # headers of a sample's members, for planning shards
# storage.video's hidden temporary files, `.<name>.<uuid hex>.partial`, of the objects an export writes
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.partial$")
_OWN_TOP = re.compile(r"^(shard-\d{6}\.tar|export\.json|README\.md|(index|shards|metadata)\.parquet)$")
_OWN_FOLDERS = ("videos/", "thumbnails/", "latents/")

Progress = Callable[[int, int], None]
OptionsFor = Callable[[str], dict | None]


# ----------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """Which videos go in: those of `runs` (ids or names; none: every run) that meet `where` (a
    `storage.catalog.filters` expression), made by `model` (a model id), with a LoRA matching `lora` (a
    LoRA file whose URI contains the text, or whose sha256 starts with it); with `drop_duplicates`, only the
    first (lowest job id) of each group of near-duplicates (`storage.signals.is_duplicate` on `phash`;
    videos without a phash are kept)."""

    runs: tuple[str, ...] = ()
    where: str | None = None
    model: str | None = None
    lora: str | None = None
    drop_duplicates: bool = False

    def describe(self, runs: list[RunRecord]) -> dict[str, Any]:
        """The selection as it is recorded and shown: run names (not ids), filters as given."""
        return {"runs": [r.name for r in runs] or "all", "where": self.where, "model": self.model,
                "lora": self.lora, "drop_duplicates": self.drop_duplicates}  # fmt: skip


@dataclass
class Sample:
    """One video to export: its key, its export row (`storage.export.dataset_rows`) and its output."""

    key: str
    row: dict[str, Any]
    output: OutputRecord

    def doc(self) -> dict[str, Any]:
        """The sample's metadata (`<key>.json`): the export row with `loras` and `params` as JSON values,
        plus the key and the latents' sha256 and size."""
        return {**self.row, "key": self.key, "loras": json.loads(self.row["loras"]),
                "params": json.loads(self.row["params"]), "latents_sha256": self.output.latents_sha256,
                "latents_bytes": self.output.latents_bytes}  # fmt: skip

    @cached_property
    def doc_bytes(self) -> bytes:
        """`doc()` as the JSON member of the sample (sorted keys, UTF-8)."""
        return json.dumps(self.doc(), sort_keys=True, ensure_ascii=False, indent=1).encode()

    def fingerprint(self) -> list[Any]:
        """What decides the sample's bytes in the export."""
        o = self.output
        return [self.key, o.sha256, o.bytes, o.latents_sha256, o.thumbnail_uri, _sha256(self.doc_bytes)]

    def estimated_bytes(self) -> int:
        latents = self.output.latents_bytes or 0 if self.output.has_video else 0  # else counted as `bytes`
        return self.output.bytes + latents + len(self.doc_bytes) + _TAR_OVERHEAD


@dataclass
class Selected:
    """What `select_samples` found: the samples in job order, the runs asked for, the duplicates dropped."""

    samples: list[Sample]
    runs: list[RunRecord]
    duplicates: int


def select_samples(catalog: Catalog, selection: Selection) -> Selected:
    """The videos `selection` picks, by job id, each with its key. ValueError for an unknown run or a bad
    filter."""
    runs = [_run(catalog, ref) for ref in dict.fromkeys(selection.runs)]
    conditions = parse_filter(selection.where)
    rows: dict[int, tuple[dict[str, Any], OutputRecord]] = {}
    for run_id in [r.id for r in runs] or [None]:
        for row, output in output_rows(catalog, run_id, conditions):
            rows.setdefault(row["job_id"], (row, output))
    picked = [
        (row, output) for _, (row, output) in sorted(rows.items())
        if (selection.model is None or row["model_id"] == selection.model)
        and (selection.lora is None or _has_lora(row, selection.lora))
    ]  # fmt: skip
    kept = _drop_duplicates(picked) if selection.drop_duplicates else picked
    return Selected(_keyed(kept), runs, len(picked) - len(kept))


def _run(catalog: Catalog, ref: str) -> RunRecord:
    record = catalog.get_run(ref)
    if record is None:
        raise ValueError(f"no run {ref!r} in the catalog")
    return record


def _has_lora(row: dict[str, Any], text: str) -> bool:
    """Whether the job used a LoRA file whose URI contains `text` or whose sha256 starts with it."""
    for lora in json.loads(row["loras"]):
        if text in str(lora.get("uri", "")) or str(lora.get("sha256") or "").startswith(text.lower()):
            return True
    return False


def _drop_duplicates(
    picked: list[tuple[dict[str, Any], OutputRecord]],
) -> list[tuple[dict[str, Any], OutputRecord]]:
    """The first of each group of near-duplicates, in the given (job) order; videos without a phash stay.
    Each video is compared with all those kept before it at once (`storage.signals.DuplicateIndex`)."""
    kept, index = [], DuplicateIndex()
    for row, output in picked:
        phash = output.phash
        if phash:
            if index.near(phash):
                continue
            index.add(phash)
        kept.append((row, output))
    return kept


def _key_part(value: str, what: str) -> str:
    """A key segment without `/` or `.` (WebDataset splits names at the first dot)."""
    return safe_name(value, what=what).replace(".", "%2E")


def _keyed(picked: list[tuple[dict[str, Any], OutputRecord]]) -> list[Sample]:
    """Samples with their keys, `<run>/<item>-s<seed>`; `-j<job id>` is added to a key taken already."""
    samples, used = [], set()
    for row, output in picked:
        run = _key_part(row["run"], "run name") if row["run"] else f"run-{row['run_id']}"
        key = f"{run}/{_key_part(row['item_id'], 'item id')}-s{row['seed']}"
        if key in used:
            key = f"{key}-j{row['job_id']}"
        used.add(key)
        samples.append(Sample(key, row, output))
    return samples


# ------------------------------------------------------------------------------------------ the export


@dataclass
class Part:
    """A unit of work: one shard (webdataset) or one sample's files (hf)."""

    name: str
    samples: list[Sample]

    def fingerprint(self) -> str:
        return _sha256(_canonical([s.fingerprint() for s in self.samples]))


@dataclass
class ExportSummary:
    """What an export did. `written` and `removed` name the objects written and removed this time (relative
    to the URL); `skipped` lists the samples left out ({key, uri, reason})."""

    url: str
    format: str
    samples: int = 0
    parts: int = 0
    shards: int = 0
    bytes: int = 0
    duplicates_dropped: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    kept: int = 0
    removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class _Target:
    """Where the export goes, and what is there already."""

    url: str
    options: dict | None
    sizes: dict[str, int]  # relative name -> bytes, of every object under the URL

    def url_of(self, name: str) -> str:
        return join_url(self.url, name)

    def has(self, name: str, nbytes: int) -> bool:
        return self.sizes.get(name) == nbytes


def export_dataset(
    catalog: Catalog,
    url: str,
    *,
    fmt: str = "webdataset",
    selection: Selection = Selection(),  # frozen: never mutated
    shard_size: int = DEFAULT_SHARD_BYTES,
    storage_options: dict | None = None,
    source_options: OptionsFor | None = None,
    progress: Progress | None = None,
    selected: Selected | None = None,
) -> ExportSummary:
    """Export the videos `selection` picks to `url` as `fmt` (see the module docstring).

    `selected`: what `select_samples(catalog, selection)` gave already (a caller that looked first), so the
    catalog is not read again. `storage_options` are those of `url`; `source_options(uri)` gives those of
    each video's own URL (default: none). `progress(done, total)` is called as samples are handled.
    ValueError for bad arguments (format, shard size, unknown run, bad filter, nothing selected, a URL
    holding an export of another format); StorageError when storage fails (running the export again
    resumes it).
    """
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(DATASET_FORMATS)}")
    if shard_size < 1:
        raise ValueError(f"shard size {shard_size}: expected a positive number of bytes")
    selected = selected or select_samples(catalog, selection)
    if not selected.samples:
        raise ValueError("no video in the catalog matches the selection: nothing to export")
    latents_only = sum(1 for s in selected.samples if not s.output.has_video)
    if fmt == "hf" and 0 < latents_only < len(selected.samples):
        raise ValueError(
            f"{latents_only} of the {len(selected.samples)} selected outputs are latents only (no video): an "
            "hf folder holds videos or latents, not both; export them apart (--where video / --where 'not "
            "video') or as webdataset"
        )
    target = _Target(absolute_url(url), storage_options, {})
    previous = _previous_manifest(target, fmt)
    target.sizes = _listing(target)
    _clean_leftovers(target)
    shards = fmt == "webdataset"
    parts = _plan_shards(selected.samples, shard_size) if shards else _plan_files(selected.samples)
    doc = _Manifest(fmt, selection.describe(selected.runs), shard_size if shards else None, parts, previous,
                    redact(catalog.url), latents_only=latents_only == len(selected.samples))  # fmt: skip
    summary = ExportSummary(redact(target.url), fmt, duplicates_dropped=selected.duplicates)
    _remove_stale(target, doc, summary)
    _write_parts(target, doc, summary, source_options or (lambda _: None), progress)
    _write_tables(target, doc, selected, summary)
    _save(target, doc, True, summary)
    return summary


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------- the manifest


class _Manifest:
    """`export.json`: the selection, each part's fingerprint, objects and skipped samples, the tables."""

    def __init__(
        self, fmt: str, selection: dict[str, Any], shard_size: int | None, parts: list[Part],
        previous: dict[str, Any] | None, catalog_url: str, *, latents_only: bool = False,
    ) -> None:  # fmt: skip
        self.fmt, self.selection, self.shard_size, self.plan = fmt, selection, shard_size, parts
        self.latents_only = latents_only  # every sample is latents only (no video)
        self.catalog_url = catalog_url
        self.previous = previous or {}
        fingerprints = {p.name: p.fingerprint() for p in parts}
        old = self.previous.get("parts", {})
        # Entries of the previous export still meant for this one; each is checked again before it is kept.
        self.parts: dict[str, dict[str, Any]] = {
            name: entry for name, entry in old.items() if fingerprints.get(name) == entry.get("fingerprint")
        }
        self.tables: dict[str, dict[str, Any]] = dict(self.previous.get("tables", {}))
        self.fingerprint = _sha256(_canonical([fmt, selection, shard_size, sorted(fingerprints.items())]))
        same = self.previous.get("fingerprint") == self.fingerprint and "created_at" in self.previous
        self.created_at: str = self.previous["created_at"] if same else _now()

    def stale_objects(self) -> list[str]:
        """Objects the previous export recorded that this one will not write (other parts, other shards)."""
        planned = {p.name for p in self.plan}
        names = {obj for name, entry in self.previous.get("parts", {}).items() if name not in planned
                 for obj in entry.get("objects", {})}  # fmt: skip
        return sorted(names)

    def to_dict(self, complete: bool) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA, "format": self.fmt, "complete": complete,
            "fingerprint": self.fingerprint, "created_at": self.created_at, "catalog": self.catalog_url,
            "selection": self.selection, "shard_size": self.shard_size,
            "parts": {p.name: self.parts[p.name] for p in self.plan if p.name in self.parts},
            "tables": self.tables,
        }  # fmt: skip

    def data(self, complete: bool) -> bytes:
        return json.dumps(self.to_dict(complete), indent=1, sort_keys=True, ensure_ascii=False).encode()


def _previous_manifest(target: _Target, fmt: str) -> dict[str, Any] | None:
    """The manifest an earlier export left at the URL (None if none); ValueError if it is another format's."""
    data = _read(target.url_of(MANIFEST), target.options)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None  # unreadable: written again from scratch
    if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA:
        return None
    if doc.get("format") != fmt:
        found = doc.get("format")
        raise ValueError(f"{redact(target.url)} holds a {found} export already ({MANIFEST}): use another URL")
    return doc


def _save(target: _Target, doc: _Manifest, complete: bool, summary: ExportSummary) -> None:
    """Write the manifest if its bytes changed (a checkpoint while incomplete)."""
    data = doc.data(complete)
    old = _read(target.url_of(MANIFEST), target.options)
    if old != data:
        write_bytes(target.url_of(MANIFEST), data, storage_options=target.options)
        if complete:
            summary.written.append(MANIFEST)


# ----------------------------------------------------------------------------------------- storage io


def _read(url: str, options: dict | None) -> bytes | None:
    """The bytes of the object at `url`; None when there is none (other failures: StorageError)."""
    with storage_errors(url, "read"):
        fs, path = filesystem(url, options)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


def _listing(target: _Target) -> dict[str, int]:
    """Every object under the URL with its size, by name relative to it (one listing)."""
    with storage_errors(target.url, "list"):
        fs, base = filesystem(target.url, target.options)
        fs.invalidate_cache(base)
        try:
            found = fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
    base = base.rstrip("/")
    return {path[len(base) + 1 :]: int(info.get("size") or 0) for path, info in found.items()
            if path.startswith(base + "/") and info.get("type", "file") == "file"}  # fmt: skip


def _is_leftover(name: str) -> bool:
    """Whether `name` (relative to the URL) is the temporary file of an unfinished write of an export."""
    folder, _, base = name.rpartition("/")
    match = _PARTIAL.match(base)
    if match is None:
        return False
    return bool(_OWN_TOP.match(match["name"])) if not folder else f"{folder}/".startswith(_OWN_FOLDERS)


def _clean_leftovers(target: _Target) -> None:
    """Remove what a killed export left: hidden temporary files of its unfinished writes, and open S3
    uploads of its shards (only the export's own names: other objects under the URL are left alone)."""
    abort_open_uploads(target.url_of("shard-"), target.options, folder=False)
    leftovers = [name for name in target.sizes if _is_leftover(name)]
    if not leftovers:
        return
    with storage_errors(target.url, "clean up"):
        fs, base = filesystem(target.url, target.options)
        for name in leftovers:
            fs.rm(f"{base.rstrip('/')}/{name}")
            del target.sizes[name]


def _remove_stale(target: _Target, doc: _Manifest, summary: ExportSummary) -> None:
    """Remove the objects of the previous export this one does not produce; first the manifest says the
    export is incomplete, so nothing points at what is removed."""
    stale = [name for name in doc.stale_objects() if name in target.sizes]
    if not stale:
        return
    _save(target, doc, False, summary)
    with storage_errors(target.url, "remove old objects under"):
        fs, base = filesystem(target.url, target.options)
        for name in stale:
            fs.rm(f"{base.rstrip('/')}/{name}")
            target.sizes.pop(name, None)
    summary.removed.extend(stale)


@dataclass
class _Checked:
    """A sample's bytes, read and checked against the catalog; `reason` says why it is skipped instead."""

    video: bytes | None = None
    latents: bytes | None = None
    thumbnail: bytes | None = None
    reason: str | None = None


def _check(sample: Sample, options_for: OptionsFor, *, need_thumbnail: bool = False) -> _Checked:
    """Read the sample's video (and latents, thumbnail) and check them against the catalog's size/sha256;
    a latents-only output has no video. `need_thumbnail`: a sample without its thumbnail is skipped."""
    out = sample.output
    video = None
    if out.has_video:
        video = _read(out.uri, options_for(out.uri))
        if (reason := _mismatch("video", video, out.bytes, out.sha256)) is not None:
            return _Checked(reason=reason)
    latents = None
    if out.latents_uri:
        latents = _read(out.latents_uri, options_for(out.latents_uri))
        if (reason := _mismatch("latents", latents, out.latents_bytes, out.latents_sha256)) is not None:
            return _Checked(reason=reason)
    thumbnail = _read(out.thumbnail_uri, options_for(out.thumbnail_uri)) if out.thumbnail_uri else None
    if need_thumbnail and thumbnail is None:
        return _Checked(reason="thumbnail missing (a latents folder lists its samples by their thumbnails)")
    return _Checked(video, latents, thumbnail)


def _mismatch(what: str, data: bytes | None, nbytes: int | None, sha256: str | None) -> str | None:
    if data is None:
        return f"{what} missing"
    if nbytes is not None and len(data) != nbytes:
        return f"{what} has {len(data)} bytes, the catalog says {nbytes}"
    if sha256 and _sha256(data) != sha256.lower():
        return f"{what} sha256 differs from the catalog's"
    return None


def _state(sample: Sample, options_for: OptionsFor) -> list[int | None]:
    """Sizes of a sample's video and latents as they are now (None: missing), and of a latents-only sample's
    thumbnail (it lists the sample in an hf folder): a part that skipped the sample is rebuilt when they
    change."""
    out = sample.output
    urls = [out.uri] + ([out.latents_uri] if out.latents_uri else [])
    if not out.has_video and out.thumbnail_uri:
        urls.append(out.thumbnail_uri)
    return [object_info(u, options_for(u)) for u in dict.fromkeys(urls)]  # latents only: uri is the latents


# ---------------------------------------------------------------------------------------------- parts


def _plan_shards(samples: list[Sample], shard_size: int) -> list[Part]:
    """Samples in order, cut into shards of about `shard_size` bytes (at least one sample each)."""
    parts: list[Part] = []
    filled = 0
    for sample in samples:
        size = sample.estimated_bytes()
        if not parts or (parts[-1].samples and filled + size > shard_size):
            parts.append(Part(f"shard-{len(parts):06d}.tar", []))
            filled = 0
        parts[-1].samples.append(sample)
        filled += size
    return parts


def _files(key: str) -> tuple[str, str, str]:
    """A sample's video, thumbnail and latents files in an hf folder."""
    return f"videos/{key}.mp4", f"thumbnails/{key}.webp", f"latents/{key}.safetensors"


def _plan_files(samples: list[Sample]) -> list[Part]:
    return [Part(sample.key, [sample]) for sample in samples]


def _reusable(target: _Target, entry: dict[str, Any], part: Part, options_for: OptionsFor) -> bool:
    """Whether a part recorded by an earlier export can stay: its objects are there with their recorded
    sizes, and the samples it skipped are in the state they were then."""
    if not all(target.has(name, obj["bytes"]) for name, obj in entry.get("objects", {}).items()):
        return False
    by_key = {s.key: s for s in part.samples}
    return all(
        skip["key"] in by_key and _state(by_key[skip["key"]], options_for) == skip.get("state")
        for skip in entry.get("skipped", [])
    )


def _write_parts(
    target: _Target, doc: _Manifest, summary: ExportSummary, options_for: OptionsFor,
    progress: Progress | None,
) -> None:  # fmt: skip
    """Keep or (re)write every part, saving the manifest as it goes; `summary` gets the counts."""
    total = sum(len(p.samples) for p in doc.plan)
    done, saved = 0, time.monotonic()
    writer = _write_shard if doc.fmt == "webdataset" else _write_files

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for part in doc.plan:
        entry = doc.parts.get(part.name)
        if entry is not None and _reusable(target, entry, part, options_for):
            summary.kept += 1
            tick(len(part.samples))
        else:
            entry = writer(target, part, options_for, tick)
            doc.parts[part.name] = entry
            summary.written.extend(entry["objects"])
            if doc.fmt == "webdataset" or time.monotonic() - saved >= _CHECKPOINT_S:
                _save(target, doc, False, summary)
                saved = time.monotonic()
        summary.skipped.extend({k: s[k] for k in ("key", "uri", "reason")} for s in entry["skipped"])


def _skip(sample: Sample, reason: str, options_for: OptionsFor) -> dict[str, Any]:
    return {"key": sample.key, "uri": redact(sample.output.uri), "reason": reason,
            "state": _state(sample, options_for)}  # fmt: skip


class _Hashing:
    """A write-only stream onto a storage sink that counts and hashes what passes."""

    def __init__(self, sink: Any) -> None:
        self.sink, self.digest, self.size = sink, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def _member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    """A tar header that depends on nothing but the name, size and time (no user, no local mode)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, int(mtime), 0o644, "", ""
    return info


def _members(
    part: Part, options_for: OptionsFor, skipped: list[dict[str, Any]], packed: list[str], tick: Callable
) -> Iterator[tuple[str, bytes, float]]:
    """(name, bytes, mtime) of the members of a shard, one sample at a time, checked as they are read."""
    for sample in part.samples:
        checked = _check(sample, options_for)
        if checked.reason is not None:
            skipped.append(_skip(sample, checked.reason, options_for))
        else:
            created = sample.output.created_at
            mtime = created.timestamp() if created else 0.0
            if checked.video is not None:  # a latents-only sample has none
                yield f"{sample.key}.mp4", checked.video, mtime
            yield f"{sample.key}.json", sample.doc_bytes, mtime
            if checked.thumbnail is not None:
                yield f"{sample.key}.webp", checked.thumbnail, mtime
            if checked.latents is not None:
                yield f"{sample.key}.safetensors", checked.latents, mtime
            packed.append(sample.key)
        tick()


def _write_shard(target: _Target, part: Part, options_for: OptionsFor, tick: Callable) -> dict[str, Any]:
    """Write one shard as its samples are read, streamed to storage (memory: one sample and one upload
    part) and committed whole at the end, or not at all; returns its manifest entry."""
    url = target.url_of(part.name)
    skipped: list[dict[str, Any]] = []
    packed: list[str] = []
    sink = open_sink(url, target.options)
    out = _Hashing(sink)
    try:
        with storage_errors(url, "write"):
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name, data, mtime in _members(part, options_for, skipped, packed, tick):
                    tar.addfile(_member(name, len(data), mtime), io.BytesIO(data))
            if packed:
                sink.commit()
            else:  # every sample was skipped: no empty shard
                sink.abort()
    except BaseException:
        abort_quietly(sink, url)
        raise
    written = {part.name: {"bytes": out.size, "sha256": out.digest.hexdigest()}} if packed else {}
    return {"fingerprint": part.fingerprint(), "samples": packed, "skipped": skipped, "objects": written}


def _write_files(target: _Target, part: Part, options_for: OptionsFor, tick: Callable) -> dict[str, Any]:
    """Copy one sample's files into the hf folder (each written atomically); returns its manifest entry."""
    (sample,) = part.samples
    entry: dict[str, Any] = {"fingerprint": part.fingerprint(), "samples": [], "skipped": [], "objects": {}}
    # A folder of latents-only samples lists them by their thumbnails (`file_name`): each needs one.
    checked = _check(sample, options_for, need_thumbnail=not sample.output.has_video)
    if checked.reason is not None:
        entry["skipped"].append(_skip(sample, checked.reason, options_for))
    else:
        video, thumbnail, latents = _files(sample.key)
        files = ((thumbnail, checked.thumbnail), (latents, checked.latents), (video, checked.video))
        for name, data in files:  # the video last
            if data is not None:
                sha256, nbytes = write_bytes(target.url_of(name), data, storage_options=target.options)
                entry["objects"][name] = {"bytes": nbytes, "sha256": sha256}
        entry["samples"].append(sample.key)
    tick()
    return entry


# --------------------------------------------------------------------------------------------- tables


def _packed(doc: _Manifest) -> list[tuple[Part, Sample]]:
    """The samples that are in the export, with their part, in order."""
    out = []
    for part in doc.plan:
        keys = set(doc.parts[part.name]["samples"])
        out.extend((part, s) for s in part.samples if s.key in keys)
    return out


def _table(rows: list[dict[str, Any]], head: list[tuple[str, pa.DataType]]) -> bytes:
    """Parquet bytes of `rows` with the `head` columns first, then the export row's columns."""
    schema = pa.schema([*head, *ROW_SCHEMA, ("latents_sha256", pa.string()), ("latents_bytes", pa.int64())])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def _row(sample: Sample) -> dict[str, Any]:
    return {**sample.row, "latents_sha256": sample.output.latents_sha256,
            "latents_bytes": sample.output.latents_bytes}  # fmt: skip


def _shards(doc: _Manifest) -> list[str]:
    """The shards written (a shard whose samples were all skipped is not)."""
    return [p.name for p in doc.plan if p.name in doc.parts[p.name]["objects"]]


def _tables(doc: _Manifest) -> dict[str, bytes]:
    """The index files of the export: index and shard list (webdataset) or metadata (hf)."""
    packed = _packed(doc)
    if doc.fmt == "hf" and doc.latents_only:
        # Listed by the thumbnails (the first frames): an imagefolder whose image feature is `first_frame`
        # (not `image`: the export row has an `image` column, the image-to-video input).
        rows = [{"first_frame_file_name": thumbnail, "latents": latents, "key": sample.key, **_row(sample)}
                for _, sample in packed for _, thumbnail, latents in [_files(sample.key)]]  # fmt: skip
        head = [("first_frame_file_name", pa.string()), ("latents", pa.string()), ("key", pa.string())]
        return {METADATA: _table(rows, head)}
    if doc.fmt == "hf":
        rows = []
        for part, sample in packed:
            objects = doc.parts[part.name]["objects"]
            video, thumbnail, latents = _files(sample.key)
            rows.append({"file_name": video, "thumbnail": thumbnail if thumbnail in objects else None,
                         "latents": latents if latents in objects else None, "key": sample.key,
                         **_row(sample)})  # fmt: skip
        head = [("file_name", pa.string()), ("thumbnail", pa.string()), ("latents", pa.string()),
                ("key", pa.string())]  # fmt: skip
        return {METADATA: _table(rows, head)}
    index = _table([{"key": s.key, "shard": p.name, **_row(s)} for p, s in packed],
                   [("key", pa.string()), ("shard", pa.string())])  # fmt: skip
    shards = [{"shard": name, "samples": len(doc.parts[name]["samples"]), **obj}
              for name in _shards(doc) for obj in [doc.parts[name]["objects"][name]]]  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(shards, schema=pa.schema(
        [("shard", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])),
        buffer)  # fmt: skip
    return {INDEX: index, SHARDS: buffer.getvalue()}


def _write_tables(target: _Target, doc: _Manifest, selected: Selected, summary: ExportSummary) -> None:
    """Write the index files and the card, each only if its bytes changed; fill in the summary's counts."""
    packed = _packed(doc)
    summary.samples = len(packed)
    summary.parts = len(doc.plan)
    summary.shards = len(_shards(doc)) if doc.fmt == "webdataset" else 0
    summary.bytes = sum(o["bytes"] for e in doc.parts.values() for o in e["objects"].values())
    files = _tables(doc)
    files[CARD] = dataset_card(doc, [s for _, s in packed], summary, selected).encode()
    for name, data in files.items():
        record = {"bytes": len(data), "sha256": _sha256(data)}
        if doc.tables.get(name) == record and target.has(name, len(data)):
            continue
        write_bytes(target.url_of(name), data, storage_options=target.options)
        doc.tables[name] = record
        summary.written.append(name)
    for name in list(doc.tables):
        if name not in files:
            del doc.tables[name]


# ----------------------------------------------------------------------------------------------- card


def _counts(values: Iterable[Any], unset: str = "default") -> str:
    """'a (3), b (1)': each distinct value with how many videos have it (None: `unset`)."""
    counted = Counter(unset if v is None else str(v) for v in values)
    return ", ".join(f"{value} ({n})" for value, n in sorted(counted.items()))


def _lora_set(row: dict[str, Any]) -> str:
    """A job's LoRA files as 'name:strength + ...' ('none' without)."""
    loras = json.loads(row["loras"])
    return " + ".join(f"{lo['uri'].rpartition('/')[2]}:{lo.get('strength', 1):g}" for lo in loras) or "none"


def _signals(rows: list[dict[str, Any]]) -> list[str]:
    motion = [r["motion"] for r in rows if r["motion"] is not None]
    lines = [f"- measured: {len(motion)} of {len(rows)} videos"]
    if motion:
        lines.append(f"- motion: min {min(motion):.4f}, median {statistics.median(motion):.4f}, "
                     f"max {max(motion):.4f}")  # fmt: skip
    for flag in ("black", "flat", "frozen"):
        lines.append(f"- {flag}: {sum(1 for r in rows if r[flag])} videos")
    clip = [r["clip_score"] for r in rows if r["clip_score"] is not None]
    if clip:
        lines.append(f"- clip_score (text-video similarity, {len(clip)} videos): min {min(clip):.4f}, median "
                     f"{statistics.median(clip):.4f}, max {max(clip):.4f}")  # fmt: skip
    return lines


def _loading(doc: _Manifest, url: str) -> list[str]:
    if doc.fmt == "hf" and doc.latents_only:
        return [
            "```python", "from datasets import load_dataset", "from safetensors.torch import load_file", "",
            f'ds = load_dataset("imagefolder", data_dir="{url}", split="train")',
            "# `first_frame`: an image; `latents`: the final latents [z, T, h, w] (WanVAE.decode)",
            f'latents = load_file(f"{url}/{{ds[0][\'latents\']}}")["latents"]', "```",
            "", "The table alone: `datasets.Dataset.from_parquet(\"<folder>/metadata.parquet\")` or pandas.",
        ]  # fmt: skip
    if doc.fmt == "hf":
        return [
            "```python", "from datasets import Video, load_dataset", "",
            f'ds = load_dataset("videofolder", data_dir="{url}", split="train")',
            '# `video` decodes with torchcodec; without it, take the paths and bytes:',
            'ds = ds.cast_column("video", Video(decode=False))', "```",
            "", "The table alone: `datasets.Dataset.from_parquet(\"<folder>/metadata.parquet\")` or pandas.",
        ]  # fmt: skip
    shards = _shards(doc)
    if shards == [f"shard-{i:06d}.tar" for i in range(len(shards))]:
        listing = [f'shards = "{url}/shard-{{000000..{max(len(shards) - 1, 0):06d}}}.tar"']
    else:  # gaps where every sample of a shard was skipped
        listing = ["import pyarrow.parquet as pq", "",
                   f'names = pq.read_table("{url}/shards.parquet")["shard"].to_pylist()',
                   f'shards = [f"{url}/{{name}}" for name in names]']  # fmt: skip
    return [
        "```python", "import json", "import webdataset as wds", *listing, "",
        "for sample in wds.WebDataset(shards, shardshuffle=False):",
        '    key, video, meta = sample["__key__"], sample.get("mp4"), json.loads(sample["json"])',
        '    # video is None for a latents-only sample (no video was decoded)',
        '    # sample.get("webp"): thumbnail; sample.get("safetensors"): latents', "```",
        "", "On S3, name the shards as `pipe:aws s3 cp s3://.../shard-000000.tar -`. `index.parquet` lists",
        "every sample with its shard and settings; `shards.parquet` every shard with its size and sha256.",
    ]  # fmt: skip


def dataset_card(doc: _Manifest, samples: list[Sample], summary: ExportSummary, selected: Selected) -> str:
    """The README.md of an export: what is in it, how it was selected and made, and how to load it."""
    rows = [s.row for s in samples]
    url = redact(summary.url)
    models = Counter((r["model_id"], r["model_fingerprint"]) for r in rows)
    reasons = Counter(s["reason"] for s in summary.skipped)
    lines = [
        f"# wanflow dataset ({doc.fmt})", "",
        f"{len(samples)} videos generated with Wan 2.1, exported by wanflow "
        f"{software_versions().get('wanflow', '(unknown version)')} on {doc.created_at}.", "",
        "## Contents", "",
        f"- samples: {len(samples)}" + (f" in {summary.shards} shards" if doc.fmt == "webdataset" else ""),
        f"- bytes: {summary.bytes}",
        f"- latents stored: {sum(1 for s in samples if s.output.latents_uri)}, of which latents only (no "
        f"video decoded): {sum(1 for s in samples if not s.output.has_video)}",
        f"- skipped: {len(summary.skipped)}" + (f" ({_counts_text(reasons)})" if reasons else ""),
        f"- near-duplicates dropped: {summary.duplicates_dropped}", "",
        "## Models", "", "| model | fingerprint | videos |", "|---|---|---|",
        *(f"| {m} | {fp} | {n} |" for (m, fp), n in sorted(models.items())), "",
        "## Settings", "", "| setting | values (videos) |", "|---|---|",
        *(f"| {name} | {_counts(r[name] for r in rows)} |"
          for name in ("size", "frame_num", "steps", "solver", "guide_scale", "shift")),
        f"| cache | {_counts((r['cache'] for r in rows), 'none')} |",
        f"| loras | {_counts(_lora_set(r) for r in rows)} |", "",
        "## Quality signals", "", *_signals(rows), "",
        "## Provenance", "",
        f"- catalog: `{doc.catalog_url}`",
        f"- runs: {', '.join(r.name for r in selected.runs) or 'all'}",
        f"- selection: `{json.dumps(doc.selection, ensure_ascii=False)}`",
        f"- exported: {doc.created_at}; manifest `{MANIFEST}` (fingerprint {doc.fingerprint[:16]})", "",
        "## Loading", "", *_loading(doc, url), "",
    ]  # fmt: skip
    if summary.skipped:
        lines += ["## Skipped", "", *(f"- `{s['key']}`: {s['reason']}" for s in summary.skipped[:50]), ""]
    return "\n".join(lines)


def _counts_text(counted: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counted.items()))
