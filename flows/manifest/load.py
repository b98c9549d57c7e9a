"""Whole manifests: `load_manifest` / `validate_manifest` read every row and resolve it into a `Manifest`.

Owns `Manifest` and what assembles the readers and the resolution: a read row resolved
(`_resolve_item`), the id it is checked for duplicates under (`_item_key`) and the duplicate problem
(`_duplicate`), which the splitter shares.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from flows.manifest.readers import _iter_rows, _sha256_file
from flows.manifest.resolution import resolve
from flows.manifest.schema import (
    ManifestError,
    ResolvedRequest,
    RowProblem,
    RunDefaults,
    _count_invalid_rows,
    _raw_item_id,
    _unit,
    manifest_format,
)


@dataclasses.dataclass
class Manifest:
    """A manifest read in full: every valid row resolved, every problem listed."""

    url: str
    format: str
    sha256: str  # of the file's bytes as stored (compressed bytes for a compressed file)
    rows: int  # data rows read (blank lines and the CSV header not counted)
    requests: list[ResolvedRequest]
    problems: list[RowProblem]
    # Rows with at least one problem (one row may have several problems, so this is not len(problems)):
    # rows = len(requests) + invalid_rows. Counted from `problems` when not given (or negative); a split
    # manifest, whose `problems` may list only the first ones, passes SplitResult.invalid_rows.
    invalid_rows: int = dataclasses.field(default=-1, kw_only=True)

    def __post_init__(self) -> None:
        if self.invalid_rows < 0:
            self.invalid_rows = _count_invalid_rows(self.problems)

    @property
    def jobs(self) -> int:
        """One job per (request, seed)."""
        return sum(len(r.seeds) for r in self.requests)


# --------------------------------------------------------------------------- whole manifests


def _resolve_item(
    item: Any, line: int, defaults: RunDefaults
) -> tuple[ResolvedRequest | None, list[RowProblem]]:
    """A row from `iter_rows` resolved: (request, []) or (None, its problems)."""
    if isinstance(item, RowProblem):
        return None, [item]
    result = resolve(item, line, defaults)
    return (result, []) if isinstance(result, ResolvedRequest) else (None, list(result))


def _item_key(item: Any) -> str | None:
    """The id a row is checked for duplicates under (as written, stripped)."""
    return item.item_id if isinstance(item, RowProblem) else _raw_item_id(item)


def _duplicate(line: int, item_id: str, first: int, unit: str) -> RowProblem:
    return RowProblem(
        line, "item_id", f"duplicate item_id {item_id!r}: already used on {unit} {first}", item_id
    )


def load_manifest(
    url: str, defaults: RunDefaults | None = None, storage_options: dict | None = None
) -> Manifest:
    """Read a manifest (streaming) and resolve every row; bad rows are listed in `problems`, not raised.

    Raises ManifestError only for the file as a whole (see `iter_rows`).
    """
    defaults = defaults or RunDefaults()
    fmt = manifest_format(url)
    unit = _unit(url)
    hasher = hashlib.sha256()
    requests: list[ResolvedRequest] = []
    problems: list[RowProblem] = []
    first_seen: dict[str, int] = {}
    rows = 0
    for line, item in _iter_rows(url, storage_options, hasher if fmt != "parquet" else None):
        rows += 1
        resolved, found = _resolve_item(item, line, defaults)
        item_id = _item_key(item)  # any row's id counts, valid or not, as in split_manifest
        if item_id is not None:
            first = first_seen.setdefault(item_id, line)
            if first != line:
                found.append(_duplicate(line, item_id, first, unit))
        if found:
            problems.extend(found)
        elif resolved is not None:
            requests.append(resolved)
    sha256 = _sha256_file(url, storage_options) if fmt == "parquet" else hasher.hexdigest()
    return Manifest(url=url, format=fmt, sha256=sha256, rows=rows, requests=requests, problems=problems)


def validate_manifest(
    url: str, defaults: RunDefaults | None = None, storage_options: dict | None = None
) -> Manifest:
    """`load_manifest`, raising ManifestError with every problem if any row is bad."""
    manifest = load_manifest(url, defaults, storage_options)
    if manifest.problems:
        raise ManifestError(url, manifest.problems, manifest.rows)
    return manifest
