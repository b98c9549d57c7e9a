"""The `export-dataset` flow: a versioned snapshot of a saved selection, `<root>/snapshots/<name>/v<N>/`.

    plan      the selection's samples now (`storage.dataset.select_samples`) and their content digest; when
              the latest snapshot of `name` holds the same content, it is the answer and nothing is written
    export    `storage.dataset.export_dataset` into the next version's folder (idempotent and resumable: a
              run killed midway is completed by the next one, into the same version)
    record    the version in the catalog with its samples (`Catalog.record_snapshot`), so that a training
              run can name the exact snapshot it used (`wanflow catalog snapshots`)

`make_snapshot` is the work as a plain function; `export_dataset_flow` wraps it for Prefect (the
`export-dataset` deployment of prefect.yaml runs it on the CPU pool, and declares a trigger, disabled, that
runs it whenever a `generate-batch` run completes). Credentials come from the worker's `WANFLOW_*`
settings, never from parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.settings import Settings, check_secret_free, get_settings
from storage.catalog import Catalog
from storage.catalog.snapshots import content_sha256
from storage.dataset import DEFAULT_SHARD_BYTES, Selection, export_dataset, select_samples
from storage.layout import safe_name
from storage.urls import join_url, redact

__all__ = ["SnapshotResult", "export_dataset_flow", "make_snapshot", "snapshot_url"]


@dataclass
class SnapshotResult:
    """What a snapshot run did: the version (new or the latest, unchanged), where it is, its counts."""

    name: str
    version: int
    uri: str
    new: bool
    samples: int
    bytes: int
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def snapshot_url(root: str, name: str, version: int) -> str:
    """`<root>/snapshots/<name>/v<version>` (the name made safe for a key)."""
    return join_url(root, "snapshots", safe_name(name, what="snapshot name"), f"v{version}")


def make_snapshot(
    catalog: Catalog, settings: Settings, name: str, selection: Selection, *, fmt: str = "webdataset",
    root: str | None = None, shard_size: int = DEFAULT_SHARD_BYTES, flow_run_id: str | None = None,
) -> SnapshotResult:  # fmt: skip
    """Write the next version of snapshot `name` from `selection` under `root` (default: the storage root)
    and record it; or, when the latest version holds the same content, return it and write nothing."""
    selected = select_samples(catalog, selection)
    if not selected.samples:
        raise ValueError(f"snapshot {name!r}: no video in the catalog matches the selection")
    picked = [(s.key, int(s.output.job_id or 0), s.output.sha256) for s in selected.samples]
    digest = content_sha256(fmt, picked)
    latest = catalog.latest_snapshot(name)
    if latest is not None and latest.content_sha256 == digest:
        return SnapshotResult(name, latest.version, latest.uri, False, latest.samples, latest.bytes)
    version = catalog.next_snapshot_version(name)
    url = snapshot_url(root or settings.storage_root, name, version)
    summary = export_dataset(
        catalog, url, fmt=fmt, selection=selection, shard_size=shard_size,
        storage_options=settings.storage_options_for(url), source_options=settings.storage_options_for,
        selected=selected,
    )  # fmt: skip
    skipped = {entry["key"] for entry in summary.skipped}
    samples = [sample for sample in picked if sample[0] not in skipped]
    record, new = catalog.record_snapshot(
        name, url, fmt, selection.describe(selected.runs), samples, summary.bytes, flow_run_id=flow_run_id,
        version=version, content=digest,
    )  # fmt: skip
    return SnapshotResult(name, record.version, record.uri, new, record.samples, record.bytes, len(skipped))


@flow(name="export-dataset", log_prints=True, persist_result=False)
def export_dataset_flow(
    name: str,
    runs: list[str] | None = None,
    where: str | None = None,
    model: str | None = None,
    lora: str | None = None,
    drop_duplicates: bool = True,
    format: str = "webdataset",
    root: str | None = None,
    shard_size: int = DEFAULT_SHARD_BYTES,
    catalog_url: str | None = None,
) -> dict[str, Any]:
    """Snapshot `name` v<N> of the videos the saved selection picks (`runs`: names or ids, none = every run;
    `where`: a filter on the quality signals, `motion > 0.02 and not frozen`; `model`; `lora`; near-duplicates
    dropped unless `drop_duplicates` is false) as `format` ("webdataset" or "hf") under
    `<root>/snapshots/<name>/` (default root: the worker's storage root). A new version only when the
    content changed."""
    check_secret_free(catalog_url, root=root)
    logger = get_run_logger()
    settings = get_settings(catalog_url=catalog_url)
    selection = Selection(tuple(runs or ()), where, model, lora, drop_duplicates)
    with Catalog(settings.catalog_url) as catalog:
        catalog.check_schema()
        result = make_snapshot(catalog, settings, name, selection, fmt=format, root=root,
                               shard_size=shard_size, flow_run_id=flow_run.get_id())  # fmt: skip
    said = "written" if result.new else "unchanged (the latest version already holds this content)"
    logger.info("snapshot %s v%d %s: %d samples, %d bytes at %s", name, result.version, said, result.samples,
                result.bytes, redact(result.uri))  # fmt: skip
    return result.to_dict()
