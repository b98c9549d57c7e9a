"""Planning a run: the manifest as the run takes it, the run and its jobs in the catalog, the shards.

    load_inputs                   the manifest as the run takes it (`flows.manifest.opening.read_manifest`:
                                  every bad row at once; large manifests split with dask), with the
                                  inputs checked (`flows.inputs`)
    job_specs                     one job per (row, seed), each image's and LoRA file's sha256 in its identity
    plan_run                      record the run, its rejections and jobs; jobs already done (a verified
                                  output under the run's root) are skipped; dead workers' claims requeued;
                                  open uploads older than any job aborted; pending jobs cut into shards
    plan_shards                   jobs grouped by (model, size, frame_num, LoRA set, cache), `shard_size` at
                                  most per shard
    dry_run                       what plan_run would do, writing nothing

Plain functions: the flow, the CLI and the tests call them without Prefect.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from flows.images import hash_images, resolve_image_uri
from flows.inputs import check_requests
from flows.manifest import (
    Manifest,
    ManifestError,
    RunDefaults,
)
from flows.manifest.opening import model_names, read_manifest
from flows.models import ModelSource, model_source
from flows.recovery import process_owner, reap_crashed_runs, requeue_abandoned
from flows.settings import Settings
from storage.catalog import (
    Catalog,
    CatalogError,
    JobGroupRow,
    JobSpec,
    JobStatus,
    OutputRecord,
    RunStatus,
    spec_key,
)  # fmt: skip
from storage.export import cache_label
from storage.faults import abort_open_uploads
from storage.outputs import verifier
from storage.urls import is_under, redact

__all__ = [
    "BatchPlan", "ShardPlan", "dry_run", "job_specs", "load_inputs", "model_sources", "plan_run",
    "plan_shards",
]  # fmt: skip


@dataclass(frozen=True)
class ShardPlan:
    """Jobs that share a model, size, frame count, LoRA set and step cache, for one `generate_shard` run
    (it merges its LoRA set once)."""

    model: str
    size: str
    frame_num: int
    job_ids: list[int]
    label: str
    loras: str | None = None  # the LoRA set's short id (`lora_set_id`), None: the base weights
    cache: str | None = None  # 'kind:threshold', None: no step cache

    @property
    def tags(self) -> list[str]:
        from wan.configs import get_preset

        tags = [f"model:{self.model}", f"task:{get_preset(self.model).task}", f"size:{self.size}"]
        tags += [f"loras:{self.loras}"] if self.loras else []
        return tags + ([f"cache:{self.cache}"] if self.cache else [])


@dataclass
class BatchPlan:
    """What a run will do: how many jobs, how many are done already, which shards run."""

    run_id: int | None
    run_name: str
    manifest: str
    rows: int
    invalid: int
    jobs: int
    created: int = 0
    already_done: int = 0
    requeued: int = 0
    already_planned: int = 0
    abandoned: int = 0
    shards: list[ShardPlan] = field(default_factory=list)
    crashed_runs: list[str] = field(default_factory=list)  # earlier runs found dead and marked crashed
    inputs_unread: int = 0  # dry runs: jobs whose images or LoRA files were not read (counted as to generate)

    @property
    def to_generate(self) -> int:
        return sum(len(s.job_ids) for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["to_generate"] = self.to_generate
        return out


def load_inputs(
    url: str, defaults: RunDefaults, settings: Settings, *, skip_invalid: bool, ckpt_dir: str | None,
    split_to: str | None = None,
) -> tuple[Manifest, dict[str, ModelSource], list[Any]]:  # fmt: skip
    """The manifest as the run takes it: its valid rows, less those whose model has no weights here or whose
    local image is missing (`flows.inputs.check_requests`), with a source for every model still used, and
    the problems a split manifest's rows will show as they stream (recorded when the run is planned).
    Without `skip_invalid`, any problem raises ManifestError listing them all."""
    manifest = read_manifest(url, defaults, settings, skip_invalid=True, split_to=split_to)
    checked, sources, late = check_requests(manifest, settings, ckpt_dir, defaults.model)
    whole_file = [p for p in checked.problems if p.line == 0]  # unreadable: --skip-invalid cannot help
    if whole_file or (checked.problems and not skip_invalid):
        raise ManifestError(url, whole_file or checked.problems, checked.rows)
    return checked, sources, late


def model_sources(
    manifest: Manifest, settings: Settings, ckpt_dir: str | None, model: str
) -> dict[str, ModelSource]:
    """A source (weights + fingerprint) for every model the manifest uses; `ckpt_dir` is the run model's."""
    sources = {}
    for name in model_names(manifest):
        directory = ckpt_dir if name == model and ckpt_dir else settings.checkpoints.get(name)
        sources[name] = model_source(name, directory)
    return sources


IMAGE_HASH_CHUNK = 512  # rows whose images are hashed together


def job_specs(
    manifest: Manifest, sources: dict[str, ModelSource], settings: Settings | None = None, *,
    read_images: bool = True,
) -> Iterator[JobSpec]:  # fmt: skip
    """One job per (valid row, seed). Image paths are resolved against the manifest's location and
    each image's sha256 joins the job's parameters (its identity): an edited image makes a new job.
    Images are hashed a chunk of rows at a time, in parallel, each distinct image once. The jobs are for
    `settings.storage_root` (their outputs go there; a run into another root has jobs of its own)."""
    root = settings.storage_root if settings else None
    requests = iter(manifest.requests)
    while chunk := list(itertools.islice(requests, IMAGE_HASH_CHUNK)):
        uris = {
            resolve_image_uri(getattr(r, name), manifest.url)
            for r in chunk for name in ("image", "last_image") if getattr(r, name)
        }  # fmt: skip
        uris |= {resolve_image_uri(uri, manifest.url) for r in chunk for uri, _ in r.loras}
        digests = hash_images(sorted(uris), settings) if read_images else dict.fromkeys(uris)
        for request in chunk:
            fingerprint = sources[request.model].fingerprint
            params = request.params()
            for field_name in ("image", "last_image"):
                if params.get(field_name):
                    uri = resolve_image_uri(params[field_name], manifest.url)
                    params[field_name] = uri
                    params[f"{field_name}_sha256"] = digests[uri]
            for lora in params.get("loras", ()):  # a changed LoRA file makes new jobs
                lora["uri"] = resolve_image_uri(lora["uri"], manifest.url)
                lora["sha256"] = digests[lora["uri"]]
            for seed in request.seeds:
                yield JobSpec(request.item_id, seed, request.model, fingerprint, params, root)


def lora_set_id(loras: Any) -> str | None:
    """A short id of a job's LoRA set (its params' `loras`: uri, sha256, strength per file, in order); None
    for none. Two jobs with the same id merge the same weights."""
    if not loras:
        return None
    text = json.dumps([[e.get("sha256"), e.get("strength"), e.get("uri")] for e in loras], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def plan_shards(jobs: Iterable[JobGroupRow], shard_size: int) -> list[ShardPlan]:
    """Group jobs by (model, size, frame_num, LoRA set, step cache), then cut each group into shards of
    `shard_size` at most: a shard merges one LoRA set, once."""
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size}: must be at least 1")
    groups: dict[tuple[str, str, int, str, str], list[int]] = {}
    for row in jobs:
        key = (row.model_id, str(row.size), int(row.frame_num or 0), lora_set_id(row.loras) or "",
               cache_label(row.cache) or "")  # fmt: skip
        groups.setdefault(key, []).append(row.job_id)
    shards = []
    for (model, size, frames, loras, cache), ids in sorted(groups.items()):
        variant = (f"-lora{loras[:6]}" if loras else "") + (f"-{cache.replace(':', '')}" if cache else "")
        for k in range(0, len(ids), shard_size):
            label = f"{model}-{size.replace('*', 'x')}-f{frames}{variant}-{k // shard_size + 1}"
            shards.append(ShardPlan(model, size, frames, ids[k : k + shard_size], label, loras or None,
                                    cache or None))  # fmt: skip
    return shards


def _run_settings(settings: Settings, defaults: RunDefaults, **extra: Any) -> dict[str, Any]:
    return {
        "defaults": defaults.model_dump(), "storage_root": redact(settings.storage_root),
        "catalog": redact(settings.catalog_url), **extra,
    }  # fmt: skip


def _create_run(catalog: Catalog, name: str, manifest: Manifest, run_settings: dict, flow_run_id: str | None):
    """A new catalog run named `name`, or `name-2`, `name-3`, ... if taken (also by a concurrent start),
    owned by this process."""
    owner = process_owner()
    for n in range(1, 1000):
        candidate = name if n == 1 else f"{name}-{n}"
        if catalog.get_run(candidate) is not None:
            continue
        try:
            return catalog.create_run(
                candidate, manifest.url, manifest.sha256, run_settings, flow_run_id, owner=owner
            )
        except CatalogError:
            if catalog.get_run(candidate) is None:
                raise
    raise CatalogError(f"no free run name like {name!r}")


def plan_run(
    catalog: Catalog,
    manifest: Manifest,
    sources: dict[str, ModelSource],
    settings: Settings,
    defaults: RunDefaults,
    *,
    run_name: str,
    shard_size: int,
    flow_run_id: str | None = None,
    extra_settings: dict[str, Any] | None = None,
    late_problems: list[Any] | None = None,
) -> BatchPlan:
    """Record the run, its rejected rows and its jobs in the catalog; requeue abandoned jobs; cut shards.
    If planning fails, the run is marked failed."""
    run_settings = _run_settings(settings, defaults, shard_size=shard_size, **(extra_settings or {}))
    crashed = reap_crashed_runs(catalog)
    run = _create_run(catalog, run_name, manifest, run_settings, flow_run_id)
    try:
        catalog.start_run(run.id, flow_run_id=flow_run_id)
        catalog.record_rejections(run.id, (p._asdict() for p in manifest.problems))
        for source in sources.values():
            weights = source.ckpt_dir or "random"
            catalog.register_model(source.model, source.fingerprint, weights, source.describe())
        summary = catalog.plan_jobs(run.id, job_specs(manifest, sources, settings), verify=_verify(settings))
        if late_problems:  # rows of a split manifest refused as they streamed by
            catalog.record_rejections(run.id, (p._asdict() for p in late_problems))
        abandoned = requeue_abandoned(catalog, run.id, timedelta(seconds=settings.claim_timeout_s))
        # Uploads older than any job may run were left by killed workers: abort them (each job also aborts
        # those under its own keys when it starts again).
        abort_open_uploads(settings.storage_root, settings.resolved_storage_options(),
                           older_than_s=settings.job_timeout_s)  # fmt: skip
        shards = plan_shards(catalog.job_groups(run.id, JobStatus.pending), shard_size)
    except BaseException as exc:
        catalog.finish_run(run.id, RunStatus.failed if isinstance(exc, Exception) else RunStatus.cancelled)
        raise
    return BatchPlan(
        run_id=run.id, run_name=run.name, manifest=redact(manifest.url), rows=manifest.rows,
        invalid=manifest.invalid_rows + len({p.line for p in late_problems or ()}),
        jobs=summary.total, created=summary.created,
        already_done=summary.already_done, requeued=summary.requeued,
        already_planned=summary.already_planned, abandoned=abandoned, shards=shards,
        crashed_runs=[r.name for r in crashed],
    )  # fmt: skip


def _verify(settings: Settings) -> Callable[[OutputRecord], bool]:
    """Whether an output counts as done for a run into `settings.storage_root`: it lies under that root and
    its object is there with the recorded size and sha256."""
    check = verifier(settings.resolved_storage_options())
    root = settings.storage_root
    return lambda output: is_under(output.uri, root) and check(output)


def dry_run(
    catalog: Catalog | None,
    manifest: Manifest,
    sources: dict[str, ModelSource],
    settings: Settings,
    *,
    shard_size: int,
    read_images: bool = False,
) -> BatchPlan:
    """What `plan_run` would do, writing nothing: jobs done already (output verified) are counted as
    skipped, the rest are cut into shards (job ids are left empty for jobs not yet in the catalog).

    Images are not read unless `read_images`: a job's identity holds its image's sha256, so without it the
    jobs with images (or LoRA files) count as to generate (`inputs_unread` says how many), an upper bound."""
    verify = _verify(settings)
    known = {}
    specs = list(job_specs(manifest, sources, settings, read_images=read_images))
    read = ("image", "last_image", "loras")  # inputs whose sha256 joins the identity
    unread = 0 if read_images else sum(1 for spec in specs if any(spec.params.get(k) for k in read))
    keys = [spec_key(s) for s in specs]
    if catalog is not None:
        known = catalog.find_jobs(keys)
    done = 0
    pending: list[JobGroupRow] = []
    for key, spec in zip(keys, specs, strict=True):
        found = known.get(key)
        if found is not None and found[0].status == JobStatus.succeeded and found[1] and verify(found[1]):
            done += 1
            continue
        size, frames = spec.params.get("size"), spec.params.get("frame_num")
        pending.append(JobGroupRow(found[0].id if found else 0, spec.model_id, size, frames,
                                   spec.params.get("loras"), spec.params.get("cache")))  # fmt: skip
    shards = plan_shards(pending, shard_size)
    return BatchPlan(
        run_id=None, run_name="(dry run)", manifest=redact(manifest.url), rows=manifest.rows,
        invalid=manifest.invalid_rows, jobs=len(specs), already_done=done, shards=shards,
        inputs_unread=unread,
    )  # fmt: skip
