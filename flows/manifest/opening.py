"""Opening a manifest the way a run takes it: small ones loaded whole, large ones split with dask.

`read_manifest` is the switch: a manifest over `WANFLOW_LARGE_MANIFEST_BYTES` is never held whole; dask
splits it into shard manifests under the storage root and a `LazyManifest` streams its requests back from
them, once. `model_names` tells which models either kind uses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import fsspec

from flows.manifest.load import Manifest, load_manifest
from flows.manifest.readers import manifest_sha256
from flows.manifest.schema import ManifestError, RunDefaults, manifest_format
from flows.manifest.split import read_shard, split_manifest
from storage.layout import safe_name
from storage.urls import join_url

if TYPE_CHECKING:
    from flows.settings import Settings

__all__ = ["LazyManifest", "is_large_manifest", "model_names", "read_manifest"]


@dataclass
class LazyManifest(Manifest):
    """A split manifest: `requests` is a one-pass iterator over its shard manifests."""

    model_names: list[str] = field(default_factory=list)


def model_names(manifest: Manifest) -> list[str]:
    """The models a manifest's valid rows use."""
    if isinstance(manifest, LazyManifest):
        return manifest.model_names
    return sorted({r.model for r in manifest.requests})


def read_manifest(
    url: str, defaults: RunDefaults, settings: Settings, *, skip_invalid: bool, split_to: str | None = None
) -> Manifest:
    """Load and validate; without `skip_invalid`, any bad row stops the run (ManifestError lists all).

    A manifest larger than `settings.large_manifest_bytes` is split with dask into shard manifests under
    `split_to` (default: `<storage root>/_manifests/<file>-<sha256 prefix>/`) and its requests are read
    back from them lazily, so no process holds all its rows.
    """
    options = settings.storage_options_for(url)
    if not is_large_manifest(url, settings):
        manifest = load_manifest(url, defaults, storage_options=options)
        if manifest.problems and not skip_invalid:
            raise ManifestError(url, manifest.problems, manifest.rows)
        return manifest
    sha256 = manifest_sha256(url, options)
    stem = PurePosixPath(url.rstrip("/")).name.split(".")[0] or "manifest"
    # One directory per (manifest, run defaults): runs of the same file with other defaults do not share it.
    digest = hashlib.sha256(f"{sha256}\0{defaults.model_dump_json()}".encode()).hexdigest()[:12]
    out = split_to or join_url(settings.storage_root, "_manifests", f"{safe_name(stem)}-{digest}")
    out_options = settings.storage_options_for(out)
    result = split_manifest(url, out, defaults, storage_options=options, overwrite=True)
    if result.invalid and not skip_invalid:
        raise ManifestError(url, result.problems, result.rows)
    requests = (r for shard in result.shards for r in read_shard(shard, storage_options=out_options))
    models = sorted({key.split("/")[0] for key in result.groups})
    return LazyManifest(
        url, manifest_format(url), sha256, result.rows, requests, result.problems, models,  # type: ignore[arg-type]
        invalid_rows=result.invalid_rows,
    )


def is_large_manifest(url: str, settings: Settings) -> bool:
    """Whether a manifest is over `settings.large_manifest_bytes` (then it is split with dask, never
    loaded whole). An unreadable one counts as small: `load_manifest` reports it with its name."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **settings.storage_options_for(url))
        size = int(fs.size(path) or 0)
    except Exception:
        return False
    return size > settings.large_manifest_bytes
