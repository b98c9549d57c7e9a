"""The dask splitter: large manifests validated in partitions and written to shard manifests.

Owns `split_manifest` (plan the partitions, scan them for line counts and duplicate ids, write each
partition's valid rows to its shards, add the results up), `SplitResult`, the per-partition readers and
workers (`_Source`, `_scan_partition`, `_split_partition`) and `read_shard`, which reads a shard back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import fsspec.utils

from flows.manifest.load import _duplicate, _item_key, _resolve_item
from flows.manifest.readers import (
    _batch_dicts,
    _csv_header,
    _csv_records,
    _csv_rows,
    _CsvError,
    _file_error,
    _HeaderError,
    _jsonl_rows,
    _parquet_file,
    _parquet_rows,
)
from flows.manifest.schema import (
    _NAMES,
    _PARQUET_BATCH,
    ManifestError,
    ResolvedRequest,
    RowProblem,
    RunDefaults,
    _name_parts,
    _raw_item_id,
    _short,
    manifest_format,
)
from storage.urls import join_url, redact


@dataclasses.dataclass
class SplitResult:
    """What `split_manifest` wrote and found."""

    shards: list[str]  # URLs of the shard manifests, sorted
    rows: int  # data rows read
    valid: int  # rows written to shards
    jobs: int  # sum of the seeds of the valid rows
    problems: list[RowProblem]  # in manifest order, the first `max_problems` of them
    invalid: int  # rows with a problem, all of them (not only those listed): rows = valid + invalid
    groups: dict[str, int]  # "model/WxH/Ff" -> jobs
    partitions: int = 0  # dask partitions the manifest was read in

    @property
    def invalid_rows(self) -> int:
        """Rows with at least one problem (`invalid`, under the name `Manifest` uses)."""
        return self.invalid


def _group_key(group: tuple[str, tuple[int, int], int]) -> str:
    model, (width, height), frames = group
    return f"{model}/{width}x{height}/{frames}f"


def _digest(item_id: str) -> int:
    """64-bit digest of an item id, for the partitioned duplicate check."""
    return int.from_bytes(
        hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


# --------------------------------------------------------------------------- large manifests (dask)


@dataclasses.dataclass
class _PartResult:
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    jobs: int = 0
    groups: Counter = dataclasses.field(default_factory=Counter)
    problems: list[RowProblem] = dataclasses.field(default_factory=list)
    shards: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one partition's rows come from: a byte range of a text manifest (cut at newlines the way
    `fsspec.utils.read_block` does), a whole compressed text manifest (`length` None: streamed), or
    consecutive row groups of a Parquet file. Each task reads its own part, so a partition's bytes exist
    only inside the task that handles it."""

    url: str
    fmt: str
    storage_options: dict
    compression: str | None = None
    offset: int = 0
    length: int | None = None
    header: list[str] | None = None  # CSV column names
    header_line: int = 0  # the CSV header's line (skipped in the partition that starts the file)
    row_groups: tuple[int, ...] = ()
    first_row: int = 1


def _read_block(source: _Source) -> bytes:
    fs, path = fsspec.core.url_to_fs(source.url, **source.storage_options)
    with fs.open(path, "rb") as f:
        return fsspec.utils.read_block(f, source.offset, source.length, delimiter=b"\n")


def _text_rows(source: _Source, lines: Iterable[bytes], first_line: int) -> Iterator[tuple[int, Any]]:
    at_start = source.offset == 0
    if source.fmt == "jsonl":
        return _jsonl_rows(lines, first_line, at_start)
    skip = source.header_line if at_start else 0
    return _csv_rows(_csv_records(lines, first_line, at_start), source.header, skip)


def _partition_rows(source: _Source, first_line: int) -> Iterator[tuple[int, Any]]:
    """The rows of one partition, numbered from `first_line` (the partition's first line or row)."""
    if source.fmt == "parquet":
        fs, path = fsspec.core.url_to_fs(source.url, **source.storage_options)
        with fs.open(path, "rb") as f:
            yield from _parquet_rows(_parquet_file(f), list(source.row_groups), source.first_row)
    elif source.length is None:
        with fsspec.open(source.url, "rb", compression=source.compression, **source.storage_options) as f:
            yield from _text_rows(source, f, first_line)
    else:
        yield from _text_rows(source, io.BytesIO(_read_block(source)), first_line)


def _scan_partition(source: _Source) -> tuple[int, Any, Any]:
    """First pass: the partition's line count (rows for Parquet) and (digest, line within the partition)
    of every row's item id."""
    import numpy as np

    digests: list[int] = []
    lines: list[int] = []
    if source.fmt == "parquet":
        import pyarrow.parquet as pq

        fs, path = fsspec.core.url_to_fs(source.url, **source.storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            id_columns = [n for n in _NAMES["item_id"] if n in pf.schema_arrow.names]
            count = sum(pf.metadata.row_group(i).num_rows for i in source.row_groups)
            batches = pf.iter_batches(
                batch_size=_PARQUET_BATCH, row_groups=list(source.row_groups), columns=id_columns
            )
            number = 1
            for batch in batches if id_columns else ():
                for fields in _batch_dicts(batch):
                    item_id = _raw_item_id(fields)
                    if item_id is not None:
                        digests.append(_digest(item_id))
                        lines.append(number)
                    number += 1
    else:
        if source.length is None:  # streamed: the only partition, its line count is not needed
            count, rows = 0, _partition_rows(source, 1)
        else:
            block = _read_block(source)
            count = block.count(b"\n") + (1 if block and not block.endswith(b"\n") else 0)
            rows = _text_rows(source, io.BytesIO(block), 1)
        for number, item in rows:
            item_id = _item_key(item)
            if item_id is not None:
                digests.append(_digest(item_id))
                lines.append(number)
    return count, np.array(digests, dtype=np.uint64), np.array(lines, dtype=np.int64)


def _split_partition(
    source: _Source,
    index: int,
    first_line: int,
    defaults: RunDefaults,
    duplicates: dict[int, int],
    out_url: str,
    rows_per_shard: int,
    max_problems: int,
) -> _PartResult:
    """Second pass: validate a partition's rows and write the valid ones to its shards, group by group."""
    fs, root = fsspec.core.url_to_fs(out_url, **source.storage_options)
    unit = "row" if source.fmt == "parquet" else "line"
    result = _PartResult()
    buffers: dict[tuple[str, tuple[int, int], int], list[bytes]] = {}
    written: Counter = Counter()

    def flush(group: tuple[str, tuple[int, int], int]) -> None:
        slug = _group_key(group).replace("/", "_")
        name = f"part-{index:05d}-{slug}-{written[group]:04d}.jsonl"
        fs.pipe_file(f"{root}/{name}", b"".join(buffers.pop(group)))
        written[group] += 1
        result.shards.append(join_url(out_url, name))

    for line, item in _partition_rows(source, first_line):
        result.rows += 1
        resolved, found = _resolve_item(item, line, defaults)
        item_id = _item_key(item) if duplicates else None
        if item_id is not None:
            first = duplicates.get(_digest(item_id))
            if first is not None and first != line:
                found.append(_duplicate(line, item_id, first, unit))
        if found or resolved is None:
            result.invalid += 1
            result.problems.extend(found[: max(0, max_problems - len(result.problems))])
            continue
        result.valid += 1
        result.jobs += len(resolved.seeds)
        group = resolved.group()
        result.groups[_group_key(group)] += len(resolved.seeds)
        record = json.dumps(resolved.to_record(), ensure_ascii=False, separators=(",", ":"))
        buffer = buffers.setdefault(group, [])
        buffer.append(record.encode("utf-8") + b"\n")
        if len(buffer) >= rows_per_shard:
            flush(group)
    for group in list(buffers):
        flush(group)
    return result


def _plan_text(url: str, fmt: str, compression: str | None, blocksize: int, options: dict) -> list[_Source]:
    """Byte ranges of `blocksize` (one streamed partition for a compressed file); CSV header read here."""
    header, header_line = None, 0
    if fmt == "csv":
        with fsspec.open(url, "rb", compression=compression, **options) as f:
            for line, cells in _csv_records(f, 1, True):
                if isinstance(cells, _CsvError):
                    raise _HeaderError(RowProblem(line, None, f"cannot read the header: {cells.reason}"))
                if any(c.strip() for c in cells):
                    header, header_line = _csv_header(cells, line), line
                    break
        if header is None:
            raise _HeaderError(RowProblem(0, None, "the manifest is empty: no header and no rows"))
    base = _Source(url, fmt, options, compression, header=header, header_line=header_line)
    if compression:  # a compressed stream cannot be cut at byte offsets
        return [base]
    fs, path = fsspec.core.url_to_fs(url, **options)
    size = fs.size(path)
    return [
        dataclasses.replace(base, offset=o, length=min(blocksize, size - o))
        for o in range(0, size, blocksize)
    ]


def _plan_parquet(url: str, blocksize: int, options: dict) -> list[_Source]:
    """Partitions of consecutive row groups of about `blocksize` bytes (uncompressed) each."""
    fs, path = fsspec.core.url_to_fs(url, **options)
    with fs.open(path, "rb") as f:
        meta = _parquet_file(f).metadata
    sources, groups, size, first, row = [], [], 0, 1, 1
    for index in range(meta.num_row_groups):
        group = meta.row_group(index)
        groups.append(index)
        size += group.total_byte_size
        row += group.num_rows
        if size >= blocksize or index == meta.num_row_groups - 1:
            sources.append(_Source(url, "parquet", options, row_groups=tuple(groups), first_row=first))
            groups, size, first = [], 0, row
    return sources


def _find_duplicates(scans: list[tuple[int, Any, Any]], offsets: list[int]) -> dict[int, int]:
    """Digest -> first line, for every item-id digest seen on more than one row."""
    import numpy as np

    if sum(len(s[1]) for s in scans) < 2:
        return {}
    digests = np.concatenate([s[1] for s in scans])
    lines = np.concatenate([s[2] + (offset - 1) for s, offset in zip(scans, offsets, strict=True)])
    order = np.lexsort((lines, digests))
    digests, lines = digests[order], lines[order]
    repeated = digests[1:] == digests[:-1]
    if not repeated.any():
        return {}
    starts = np.flatnonzero(np.concatenate(([True], ~repeated)))  # first row of each run of one digest
    counts = np.diff(np.concatenate((starts, [len(digests)])))
    firsts = starts[counts > 1]
    return {int(d): int(n) for d, n in zip(digests[firsts], lines[firsts], strict=True)}


# --------------------------------------------------------------------------- the steps of split_manifest


def _plan(url: str, fmt: str, size: int, options: dict) -> list[_Source]:
    """Plan step of `split_manifest`: the manifest's partitions of about `size` bytes (ManifestError for the
    file as a whole: missing, a directory, unreadable, bad CSV header)."""
    _, compression = _name_parts(url)
    try:
        in_fs, in_path = fsspec.core.url_to_fs(url, **options)
        if in_fs.isdir(in_path):
            raise IsADirectoryError(in_path)
        in_fs.info(in_path)  # FileNotFoundError -> "file not found"
        if fmt == "parquet":
            return _plan_parquet(url, size, options)
        return _plan_text(url, fmt, compression, size, options)
    except _HeaderError as exc:
        raise ManifestError(url, [exc.problem]) from None
    except Exception as exc:
        raise _file_error(url, exc) from exc


def _prepare_output(out_url: str, options: dict, overwrite: bool) -> None:
    """`out_url` made ready for shards: FileExistsError if it holds some (unless `overwrite`: removed)."""
    fs, root = fsspec.core.url_to_fs(out_url, **options)
    existing = fs.glob(f"{root}/part-*.jsonl") if fs.exists(root) else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{redact(out_url)} already holds {len(existing)} shard(s); give an empty location"
        )
    for path in existing:
        fs.rm(path)
    fs.makedirs(root, exist_ok=True)


def _scan(url: str, fmt: str, sources: list[_Source], scheduler: str) -> tuple[list[int], dict[int, int]]:
    """Scan step of `split_manifest` (first pass): each partition's first line (or row) and the item-id
    digests seen on more than one row (digest -> first line). The per-row scans are dropped on return."""
    import dask

    try:
        scans = dask.compute(*[dask.delayed(_scan_partition)(s) for s in sources], scheduler=scheduler)
    except Exception as exc:
        raise _file_error(url, exc) from exc
    if fmt == "parquet":
        offsets = [s.first_row for s in sources]
    else:
        counts = [s[0] for s in scans]
        offsets = [1 + sum(counts[:i]) for i in range(len(counts))]
    return offsets, _find_duplicates(list(scans), offsets)


def _write(
    sources: list[_Source],
    offsets: list[int],
    defaults: RunDefaults,
    duplicates: dict[int, int],
    out_url: str,
    rows_per_shard: int,
    max_problems: int,
    scheduler: str,
) -> tuple[_PartResult, ...]:
    """Write step of `split_manifest` (second pass): every partition validated and written to its shards."""
    import dask

    tasks = [
        dask.delayed(_split_partition)(
            s, i, offsets[i], defaults, duplicates, out_url, rows_per_shard, max_problems
        )
        for i, s in enumerate(sources)
    ]
    return dask.compute(*tasks, scheduler=scheduler)


def _summarise(url: str, parts: tuple[_PartResult, ...], max_problems: int, partitions: int) -> SplitResult:
    """The partitions' results added up (ManifestError if the manifest had no data rows)."""
    rows = sum(p.rows for p in parts)
    if rows == 0:
        raise ManifestError(url, [RowProblem(0, None, "the manifest is empty: no data rows")])
    groups: Counter = Counter()
    for p in parts:
        groups.update(p.groups)
    return SplitResult(
        shards=sorted(shard for p in parts for shard in p.shards),
        rows=rows,
        valid=sum(p.valid for p in parts),
        jobs=sum(p.jobs for p in parts),
        problems=[problem for p in parts for problem in p.problems][:max_problems],
        invalid=sum(p.invalid for p in parts),
        groups=dict(sorted(groups.items())),
        partitions=partitions,
    )


def split_manifest(
    url: str,
    out_url: str,
    defaults: RunDefaults | None = None,
    *,
    rows_per_shard: int = 1000,
    blocksize: str | int = "16MiB",
    storage_options: dict | None = None,
    max_problems: int = 1000,
    scheduler: str = "threads",
    overwrite: bool = False,
) -> SplitResult:
    """Validate a large manifest in dask partitions and write its valid rows to shard manifests.

    Partitions: `blocksize` byte ranges of a text manifest, cut at newlines (as dask's read_text and
    read_csv cut them); consecutive Parquet row groups of up to `blocksize` uncompressed bytes (a row
    group is never split); a compressed text manifest is one partition, streamed. Each partition is a
    dask task that reads its own part and writes its valid rows straight to
    `out_url/part-<partition:05d>-<model>_<W>x<H>_<F>f-<k:04d>.jsonl`, one group per file and at most
    `rows_per_shard` rows, so no process holds the whole manifest: memory is about blocksize plus
    rows_per_shard rows per group per running task.

    Two passes: the first counts each block's lines (exact line numbers for the second) and takes a
    64-bit blake2b digest of every row's item id; the driver finds the digests seen more than once
    (16 bytes per row, the only per-row state it holds) and the second pass validates, reports every
    row that repeats an earlier row's id, and writes. (Two different ids sharing a 64-bit digest would be
    reported as duplicates: odds about n²/2⁶⁵, 3e-6 for ten million rows.)

    Blocked CSV needs one record per line, as dask's own read_csv does: a quoted newline that falls on a
    block boundary breaks the records on both sides (a compressed CSV, one partition, has no such
    limit). Raises FileExistsError if `out_url` already holds shards (unless `overwrite`, which removes
    them first) and ManifestError for the file as a whole; bad rows are returned, not raised.
    `scheduler` is any dask scheduler name ("threads", "processes", "synchronous").
    """
    from dask.utils import parse_bytes

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    defaults = defaults or RunDefaults()
    options = dict(storage_options or {})
    fmt = manifest_format(url)
    size = max(1, parse_bytes(blocksize) if isinstance(blocksize, str) else int(blocksize))

    sources = _plan(url, fmt, size, options)
    _prepare_output(out_url, options, overwrite)
    offsets, duplicates = _scan(url, fmt, sources, scheduler)
    parts = _write(sources, offsets, defaults, duplicates, out_url, rows_per_shard, max_problems, scheduler)
    return _summarise(url, parts, max_problems, len(sources))


def read_shard(url: str, storage_options: dict | None = None) -> Iterator[ResolvedRequest]:
    """The rows of a shard manifest written by `split_manifest` (ManifestError naming the line if damaged)."""
    try:
        with fsspec.open(url, "rb", compression="infer", **(storage_options or {})) as f:
            for number, data in enumerate(f, 1):
                if not data.strip():
                    continue
                try:
                    yield ResolvedRequest.from_record(json.loads(data))
                except Exception as exc:
                    reason = (
                        f"not a shard row written by split_manifest: {type(exc).__name__}: {_short(str(exc))}"
                    )
                    raise ManifestError(url, [RowProblem(number, None, reason)]) from None
    except ManifestError:
        raise
    except Exception as exc:
        raise _file_error(url, exc) from exc
