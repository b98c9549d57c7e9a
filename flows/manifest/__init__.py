"""Manifests: what a user asks for, one row per item, validated with a message for every bad row.

A manifest is JSON Lines (`.jsonl`, `.ndjson`), CSV (`.csv`, header required) or Parquet (`.parquet`,
`.pq`) at any fsspec URL; the text formats may be compressed (`.jsonl.gz`, `.csv.xz`, ...). A row is
validated as a `GenerationRequest`, then resolved against the run defaults and the model preset into a
`ResolvedRequest` (row > `RunDefaults` > preset). Nothing a row holds can make the validator raise:
every problem of every row comes back as a `RowProblem` naming the line (or Parquet row), the field
and what was expected, and the file as a whole fails only with a `ManifestError` (missing, unreadable,
empty, bad CSV header).

Two ways in:

- `load_manifest` / `validate_manifest` stream the rows (bounded memory while reading) and return
  every resolved request in one list: right for manifests that fit in memory.
- `split_manifest` never holds the whole manifest: dask reads it in partitions (byte blocks of the text
  formats, row groups of Parquet), each partition validates its rows and writes them straight to shard
  manifests of one group (model, size, frames) and at most `rows_per_shard` rows; `read_shard` reads
  a shard back. Line numbers are exact: a cheap first pass counts each block's lines.

Conventions shared by all formats: a missing value, `null`, `None` or an empty CSV cell means "unset";
a row repeating an earlier row's `item_id` is a problem (on field "item_id", naming the first line).
Seeds are explicit (`seed`, `seed+1`, ...) or derived from the item id and the run's `base_seed`, so
the same manifest always yields the same jobs.

Text: no field may hold NUL or a lone surrogate (PostgreSQL text cannot store them); prompts may hold any
other Unicode (emoji ZWJ sequences, right-to-left marks) and, of the control characters, tab, newline and
carriage return only; ids and the other text fields may hold no control, format (bidirectional overrides,
zero-width characters), separator or other invisible character, nor any space but U+0020 (see
`_check_chars`). A RowProblem's texts are always storable: such characters in them are written as escapes.
`Manifest.invalid_rows` / `SplitResult.invalid_rows` count the rows with a problem (a row may have several).

Modules (one concern each; every name below is re-exported here, so `from flows.manifest import X` works):

- `schema`: limits and constants, formats, the request models (GenerationRequest, RunDefaults,
  ResolvedRequest), text rules, RowProblem and ManifestError.
- `resolution`: one row resolved against the run defaults and the model preset (`resolve`); seeds,
  size checks.
- `readers`: the file readers: JSON Lines, CSV, Parquet, compressed streams, hashing, per-line iteration.
- `load`: `load_manifest` / `validate_manifest` and `Manifest`: the readers and the resolution assembled.
- `split`: the dask splitter, `split_manifest` (plan, scan, write) and `read_shard`.
- `opening`: the switch a run goes through (`read_manifest`): small manifests loaded whole, large ones
  split with dask and streamed back (`LazyManifest`).
"""

from __future__ import annotations

from flows.manifest.load import Manifest, load_manifest, validate_manifest
from flows.manifest.readers import iter_rows, manifest_sha256
from flows.manifest.resolution import derive_seed, resolve
from flows.manifest.schema import (
    MANIFEST_FORMATS,
    GenerationRequest,
    ManifestError,
    ResolvedRequest,
    RowProblem,
    RunDefaults,
    manifest_format,
)
from flows.manifest.split import SplitResult, read_shard, split_manifest

__all__ = [
    "MANIFEST_FORMATS",
    "GenerationRequest",
    "Manifest",
    "ManifestError",
    "ResolvedRequest",
    "RowProblem",
    "RunDefaults",
    "SplitResult",
    "derive_seed",
    "iter_rows",
    "load_manifest",
    "manifest_format",
    "manifest_sha256",
    "read_shard",
    "resolve",
    "split_manifest",
    "validate_manifest",
]
