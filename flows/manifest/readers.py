"""The file readers: a manifest's bytes -> (line, fields) or (line, RowProblem), bounded memory.

Owns JSON Lines parsing (duplicate keys, byte-order mark), CSV record splitting and parsing (header,
unterminated quotes, invalid UTF-8), Parquet batches (unreadable values), compressed streams, hashing while
reading (`_HashingReader`, `manifest_sha256`), per-line iteration (`iter_rows`) and the mapping of file
errors to a `ManifestError` (`_file_error`).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import fsspec
import fsspec.compression

from flows.manifest.schema import (
    _ACCEPTED,
    _BOM,
    _CANONICAL,
    _PARQUET_BATCH,
    _READ_CHUNK,
    MAX_RAW_CHARS,
    ManifestError,
    RowProblem,
    _clean,
    _name_parts,
    _raw_item_id,
    _short,
    _Unreadable,
    manifest_format,
)

# --------------------------------------------------------------------------- reading rows


class _JsonDuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JsonDuplicateKey(key)
            seen.add(key)
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _parse_json_line(data: bytes, line: int) -> dict[str, Any] | RowProblem:
    """One JSON Lines row: the object, or a RowProblem saying why it is not one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raw = _clean(data[: MAX_RAW_CHARS * 2].decode("utf-8", "backslashreplace"))[:MAX_RAW_CHARS]
        return RowProblem(line, None, f"not valid UTF-8 (byte {exc.start + 1} of the line)", None, raw)
    raw = _clean(text[:MAX_RAW_CHARS])
    try:
        value = _DECODER.decode(text)
    except _JsonDuplicateKey as exc:
        return RowProblem(line, _clean(exc.key), "field given twice in the same object", None, raw)
    except json.JSONDecodeError as exc:
        hint = " (the line starts with a byte-order mark, U+FEFF)" if text.startswith("\ufeff") else ""
        return RowProblem(line, None, f"not valid JSON: {exc.msg} at column {exc.colno}{hint}", None, raw)
    except RecursionError:
        return RowProblem(line, None, "not a usable JSON object: nested too deeply", None, raw)
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        return RowProblem(line, None, f"not valid JSON: {_short(str(exc))}", None, raw)
    if not isinstance(value, dict):
        kind = "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)
        return RowProblem(line, None, f"expected a JSON object {{...}}, got {kind}", None, raw)
    return value


def _numbered(lines: Iterable[bytes], first_line: int, at_start: bool) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) for each physical line; a UTF-8 byte-order mark at the file start is dropped."""
    for number, data in enumerate(lines, first_line):
        if at_start and number == first_line and data.startswith(_BOM):
            data = data[len(_BOM) :]
        yield number, data


def _jsonl_rows(lines: Iterable[bytes], first_line: int, at_start: bool) -> Iterator[tuple[int, Any]]:
    for number, data in _numbered(lines, first_line, at_start):
        data = data.strip()
        if data:
            yield number, _parse_json_line(data, number)


class _Line(NamedTuple):
    """One physical line of a CSV manifest, decoded."""

    number: int
    text: str  # invalid UTF-8 written as \\xNN escapes
    bad_byte: int = 0  # 1-based byte of the first invalid UTF-8 sequence, 0 if the line is valid UTF-8


class _CsvError(NamedTuple):
    """A CSV record that cannot be read: why, and which cell (0-based; None: the record as a whole)."""

    reason: str
    cell: int | None = None
    raw: str | None = None


_CSV_STOP = re.compile(r"[,\r\n]")


def _csv_line_state(text: str, quoted: bool, cell: int) -> tuple[bool, int, int]:
    """Where one physical line leaves a CSV record, read as the csv module reads its default dialect (','
    between cells, '"' opening a quoted cell only as the cell's first character, '""' a quote inside one,
    a quoted cell going on unquoted after its closing quote, '\\r' or '\\n' outside quotes ending the record).

    `quoted`: whether the line starts inside a quoted cell, `cell` the index of the cell it starts in.
    Returns (whether the line ends inside a quoted cell, the index just past the quote that opened that cell
    if it opened on this line else -1, the index of the cell the line ends in).
    """
    if not quoted and '"' not in text:
        return False, -1, cell
    index, opened, at_start = 0, -1, not quoted
    while True:
        if quoted:
            close = text.find('"', index)
            if close < 0:
                return True, opened, cell
            if text.startswith('"', close + 1):  # a doubled quote: a quote inside the cell
                index = close + 2
                continue
            quoted, opened, index, at_start = False, -1, close + 1, False
        elif at_start and text.startswith('"', index):
            quoted, opened, index = True, index + 1, index + 1
            continue
        stop = _CSV_STOP.search(text, index)
        if stop is None or stop.group() != ",":
            return False, -1, cell
        cell, index, at_start = cell + 1, stop.end(), True


def _csv_cell_sizes(text: str) -> list[int]:
    """The length of each cell of one CSV record as written (quotes included), read as `_csv_line_state`
    reads it; only for naming the cell of a record the csv module refused."""
    sizes, index, end = [], 0, len(text)
    while True:
        start = index
        if text.startswith('"', index):
            index += 1
            while True:
                close = text.find('"', index)
                if close < 0:
                    index = end
                    break
                index = close + (2 if text.startswith('"', close + 1) else 1)
                if index == close + 1:
                    break
        stop = _CSV_STOP.search(text, index)
        sizes.append((end if stop is None else stop.start()) - start)
        if stop is None or stop.group() != ",":
            return sizes
        index = stop.end()


def _decoded_lines(lines: Iterable[bytes], first_line: int, at_start: bool) -> Iterator[_Line]:
    for number, data in _numbered(lines, first_line, at_start):
        try:
            yield _Line(number, data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield _Line(number, data.decode("utf-8", "backslashreplace"), exc.start + 1)


class _Feed:
    """The lines a csv.reader reads, given one record at a time (an iterator that may run dry and go on)."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque()

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        if self.lines:
            return self.lines.popleft()
        raise StopIteration


def _csv_records(
    lines: Iterable[bytes], first_line: int, at_start: bool
) -> Iterator[tuple[int, list[str] | _CsvError]]:
    """(start line, cells) per CSV record, or (start line, _CsvError) for a record that cannot be read.

    Records are delimited here (see `_csv_line_state`) and each is parsed on its own by the csv module, so
    a bad record never takes the next ones with it. A quoted cell whose closing quote is missing, at the
    end of the input or once it holds more than the csv module's field size limit (the most one cell may
    hold), is reported on the record's line as unterminated, and reading goes on from the line after the
    one the quote opened on: memory stays bounded by that limit, and the rows that quote swallowed are
    still read and checked.
    """
    limit = csv.field_size_limit()
    source = _decoded_lines(lines, first_line, at_start)
    pushed: list[_Line] = []  # lines to read again, the next one last
    feed = _Feed()
    reader = csv.reader(feed)

    def take() -> _Line | None:
        return pushed.pop() if pushed else next(source, None)

    while (first := take()) is not None:
        record = [first]
        quoted, opened, cell = _csv_line_state(first.text, False, 0)
        open_line, open_cell, open_chars = first.number, cell, len(first.text) - opened
        while quoted and open_chars <= limit:
            line = take()
            if line is None:
                break
            record.append(line)
            quoted, opened, cell = _csv_line_state(line.text, True, cell)
            if opened >= 0:
                open_line, open_cell, open_chars = line.number, cell, len(line.text) - opened
            else:
                open_chars += len(line.text)
        if quoted:
            reason = (  # the same words either way: a partition of split_manifest ends at its block's end
                f"unterminated quoted field starting on line {open_line}: no closing quote before the end of "
                f"the file or within {limit} characters (the most one CSV cell may hold)"
            )
            pushed.extend(reversed([line for line in record if line.number > open_line]))
            yield first.number, _CsvError(reason, open_cell, _csv_raw(first))
            continue
        if first.bad_byte or (len(record) > 1 and any(line.bad_byte for line in record)):
            bad = next(line for line in record if line.bad_byte)
            where = "the line" if len(record) == 1 else f"line {bad.number}"
            reason = f"not valid UTF-8 (byte {bad.bad_byte} of {where})"
            yield first.number, _CsvError(reason, None, _csv_raw(first))
            continue
        feed.lines.extend(line.text for line in record)
        try:
            cells: list[str] | _CsvError = next(reader)
        except csv.Error as exc:
            cells = _csv_error(exc, record, limit)
        except StopIteration:  # cannot happen: a line is never empty
            cells = []
        if feed.lines:  # cannot happen if _csv_line_state reads as the csv module does
            feed.lines.clear()
            cells = _CsvError("not valid CSV: the record ends before its last line", None, _csv_raw(first))
        yield first.number, cells


def _csv_raw(line: _Line) -> str:
    return line.text[: MAX_RAW_CHARS + 2].rstrip("\r\n")


def _csv_error(exc: csv.Error, record: list[_Line], limit: int) -> _CsvError:
    """The csv module's error for one record, said for a person (naming the cell where it can)."""
    raw = _csv_raw(record[0])
    if "field larger than field limit" in str(exc):
        sizes = _csv_cell_sizes("".join(line.text for line in record))
        cell = max(range(len(sizes)), key=sizes.__getitem__)
        reason = f"a cell of {sizes[cell]} characters; one CSV cell may hold at most {limit} characters"
        return _CsvError(reason, cell, raw)
    if "new-line character seen in unquoted field" in str(exc):
        reason = "not valid CSV: a carriage return (\\r) inside an unquoted cell (quote the cell)"
        return _CsvError(reason, None, raw)
    return _CsvError(f"not valid CSV: {exc}", None, raw)


def _csv_header(cells: list[str], line: int) -> list[str]:
    """Column names of a CSV header row; ManifestError-worthy problems raised as a RowProblem list."""
    names = [c.strip() for c in cells]
    for index, name in enumerate(names):
        if name and name in names[:index]:
            raise _HeaderError(RowProblem(line, _clean(name), "column named twice in the header"))
    if not any(n in _CANONICAL for n in names):
        reason = (
            f"the first row must be a header naming the columns (expected some of: {_ACCEPTED}), "
            f"got {_short(cells)}"
        )
        raise _HeaderError(RowProblem(line, None, reason))
    return names


class _HeaderError(Exception):
    def __init__(self, problem: RowProblem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


def _csv_rows(
    records: Iterable[tuple[int, list[str] | _CsvError]], header: list[str] | None, skip_through: int = 0
) -> Iterator[tuple[int, Any]]:
    """Rows of a CSV as dicts (empty cells left out), the header taken from the first record if not given.

    Records starting at or before `skip_through` are skipped (the header when a block starts the file).
    """
    for line, cells in records:
        if line <= skip_through:
            continue
        if isinstance(cells, _CsvError):
            if header is None:
                raise _HeaderError(RowProblem(line, None, f"cannot read the header: {cells.reason}"))
            field, reason = None, cells.reason
            if cells.cell is not None:
                if cells.cell < len(header) and header[cells.cell]:
                    field = header[cells.cell]
                else:
                    reason += f" (cell {cells.cell + 1}, past the {len(header)} named columns of the header)"
            yield line, RowProblem(line, field, reason, None, cells.raw)
            continue
        if not any(c.strip() for c in cells):
            continue  # a blank line, or a row of empty cells (",,,")
        if header is None:
            header = _csv_header(cells, line)
            continue
        if len(cells) != len(header):
            out = io.StringIO()
            csv.writer(out, lineterminator="").writerow(cells)
            reason = f"expected {len(header)} cells (one per header column), found {len(cells)}"
            item_id = _raw_item_id(dict(zip(header, cells, strict=False)))
            yield line, RowProblem(line, None, reason, item_id, _clean(out.getvalue()[:MAX_RAW_CHARS]))
            continue
        yield line, {name: cell for name, cell in zip(header, cells, strict=True) if cell.strip()}
    if header is None:
        raise _HeaderError(RowProblem(0, None, "the manifest is empty: no header and no rows"))


def _batch_dicts(batch: Any) -> list[dict[str, Any]]:
    """A pyarrow RecordBatch as dicts; values pyarrow cannot convert become `_Unreadable` markers."""
    try:
        return batch.to_pylist()
    except Exception:
        columns = []
        for column in batch.columns:
            try:
                columns.append(column.to_pylist())
            except Exception:
                values: list[Any] = []
                for index in range(len(column)):
                    try:
                        values.append(column[index].as_py())
                    except Exception as exc:
                        values.append(_Unreadable(f"{type(exc).__name__}: {_short(str(exc))}"))
                columns.append(values)
        names = batch.schema.names
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def _parquet_file(f: Any) -> Any:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    for index, name in enumerate(names):
        if name in names[:index]:
            raise _HeaderError(RowProblem(0, name, "column appears twice in the Parquet schema"))
    if not names:
        raise _HeaderError(RowProblem(0, None, "the Parquet file has no columns"))
    return pf


def _parquet_rows(pf: Any, row_groups: list[int] | None, first_row: int) -> Iterator[tuple[int, Any]]:
    number = first_row
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=row_groups, use_threads=False):
        for fields in _batch_dicts(batch):
            yield number, fields
            number += 1


class _HashingReader(io.RawIOBase):
    """Reads a file object through, feeding every byte read to a hash (for the file's sha256 in one pass)."""

    def __init__(self, f: Any, hasher: Any | None) -> None:
        self._f = f
        self._hasher = hasher

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        if self._hasher is not None:
            self._hasher.update(data)
        return len(data)


def _file_error(url: str, exc: BaseException) -> ManifestError:
    if isinstance(exc, FileNotFoundError):
        reason = "file not found"
    elif isinstance(exc, IsADirectoryError):
        reason = "is a directory, expected a manifest file"
    elif isinstance(exc, PermissionError):
        reason = f"cannot read the file: permission denied ({exc})"
    else:
        reason = f"cannot read the file: {type(exc).__name__}: {_short(str(exc))}"
    return ManifestError(url, [RowProblem(0, None, reason)])


def iter_rows(
    url: str, storage_options: dict | None = None
) -> Iterator[tuple[int, dict[str, Any] | RowProblem]]:
    """Stream a manifest's data rows as (line, fields) or (line, RowProblem) for rows that do not parse.

    Bounded memory (one line / one Parquet batch at a time). Raises ManifestError for the file as a whole
    (unknown extension, missing or unreadable file, bad CSV header, no rows), lazily, while iterating.
    """
    return _iter_rows(url, storage_options, None)


def _iter_rows(url: str, storage_options: dict | None, hasher: Any | None) -> Iterator[tuple[int, Any]]:
    fmt = manifest_format(url)
    _, compression = _name_parts(url)
    rows = 0
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        with fs.open(path, "rb") as raw:
            if fmt == "parquet":
                items: Iterator[tuple[int, Any]] = _parquet_rows(_parquet_file(raw), None, 1)
            else:
                tap = _HashingReader(raw, hasher)
                stream: Any = io.BufferedReader(tap, _READ_CHUNK)
                if compression:
                    stream = fsspec.compression.compr[compression](stream, mode="rb")
                if fmt == "jsonl":
                    items = _jsonl_rows(stream, 1, True)
                else:
                    items = _csv_rows(_csv_records(stream, 1, True), None)
            for item in items:
                rows += 1
                yield item
            if fmt != "parquet":
                while tap.read(_READ_CHUNK):  # hash anything the decompressor left unread
                    pass
    except _HeaderError as exc:
        raise ManifestError(url, [exc.problem]) from None
    except Exception as exc:
        raise _file_error(url, exc) from exc
    if rows == 0:
        raise ManifestError(url, [RowProblem(0, None, "the manifest is empty: no data rows")])


def manifest_sha256(url: str, storage_options: dict | None = None) -> str:
    """sha256 of the manifest file's bytes as stored (one streaming pass; ManifestError if unreadable)."""
    return _sha256_file(url, storage_options)


def _sha256_file(url: str, storage_options: dict | None) -> str:
    hasher = hashlib.sha256()
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            while chunk := f.read(_READ_CHUNK):
                hasher.update(chunk)
    except Exception as exc:
        raise _file_error(url, exc) from exc
    return hasher.hexdigest()
