"""Fast modes through the platform: manifest `loras` / `cache` / `recipe` fields, run defaults, job identity,
shards grouped by LoRA set and cache, sidecars, catalog and export.

The acceptance run: one manifest with rows under three LoRA sets (none, one file, two stacked at 0.7 and 0.4)
and two cache settings (none, first-block cache) runs as six shards, each LoRA set merged once, the model
loaded once per process; a re-run makes nothing; replacing one LoRA file redoes only the jobs that use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import save_file

from flows.batch import generate_batch
from flows.manifest import RunDefaults, load_manifest
from flows.models import clear_pipelines, pipeline_loads
from flows.planning import plan_shards
from storage.catalog import Catalog, JobGroupRow
from storage.export import export_run
from wan.configs import RANDOM_WEIGHTS_SEED
from wan.lora import random_lora_state_dict
from wan.pipeline import WanPipeline

FAST = {"size": "64*48", "frame_num": 5, "steps": 4, "guide_scale": 5.0}
CACHED = "fbcache:0.5"


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def _write_lora(path: Path, seed: int) -> Path:
    dit = WanPipeline.from_config("tiny-t2v", seed=RANDOM_WEIGHTS_SEED, device="cpu").dit
    save_file(random_lora_state_dict(dit, seed=seed, scale=0.5), str(path))
    return path


def _manifest(folder: Path) -> Path:
    sets = {"base": None, "one": ["one.safetensors"], "two": ["two.safetensors:0.7", "three.safetensors:0.4"]}
    rows = []
    for name, loras in sets.items():
        for cache in (None, CACHED):
            row = {"item_id": f"{name}-{'cached' if cache else 'plain'}", "prompt": f"a clip, {name}", **FAST}
            if loras is not None:
                row["loras"] = loras
            if cache is not None:
                row["cache"] = cache
            rows.append(row)
    path = folder / "fast.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _run(folder: Path, catalog_url: str, manifest: Path, ckpt_dir: Path | None = None) -> dict:
    return generate_batch(str(manifest), model="tiny-t2v", out=str(folder / "out"), catalog_url=catalog_url,
                          shard_size=8, ckpt_dir=None if ckpt_dir is None else str(ckpt_dir))  # fmt: skip


def _pipe() -> WanPipeline:
    """The one pipeline this process loaded for the shards."""
    import flows.models

    (pipe,) = flows.models._pipelines.values()
    return pipe


def test_lora_sets_and_caches_run_as_grouped_shards_and_resume(harness, tmp_path, monkeypatch):
    from twins import write_official

    for seed, name in enumerate(("one", "two", "three"), 1):
        _write_lora(tmp_path / f"{name}.safetensors", seed)
    manifest = _manifest(tmp_path)
    # A tiny checkpoint in the official layout: the base weights are read from files, and counted.
    ckpt = write_official(WanPipeline.from_config("tiny-t2v", seed=RANDOM_WEIGHTS_SEED), tmp_path / "ckpt")
    reads: list[str] = []
    original = WanPipeline.from_pretrained.__func__

    def counting(cls, ckpt_dir, *args, **kwargs):
        reads.append(str(ckpt_dir))
        return original(cls, ckpt_dir, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "from_pretrained", classmethod(counting))
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    clear_pipelines()
    loads = pipeline_loads()
    import flows.loras

    monkeypatch.setattr(flows.loras, "_PROCESS_FILES", flows.loras.LoraFiles())  # this test counts the reads
    try:
        summary = _run(tmp_path, catalog_url, manifest, ckpt)
        assert summary["status"] == "succeeded", summary
        shards = summary["plan"]["shards"]
        assert len(shards) == 6 and all(len(s["job_ids"]) == 1 for s in shards)
        assert {(s["loras"] is None, s["cache"]) for s in shards} == {
            (True, None),
            (True, "fbcache:0.5"),
            (False, None),
            (False, "fbcache:0.5"),
        }
        assert pipeline_loads() - loads == 1 and reads == [str(ckpt.resolve())]  # the checkpoint, read once
        pipe = _pipe()
        # Shards are ordered by LoRA set: each set is merged once (the two cache shards of a set share it),
        # and the last set stays merged.
        assert pipe.lora_merges == 2
        assert flows.loras.process_lora_files().reads == 3

        with Catalog(catalog_url) as catalog:
            jobs = {j.item_id: j for j in catalog.jobs(summary["run_id"])}
            outputs = {o.job_id: o for o in catalog.outputs(summary["run_id"])}
        assert len(outputs) == 6
        two = jobs["two-cached"].params
        assert [(Path(e["uri"]).name, e["strength"]) for e in two["loras"]] == [
            ("two.safetensors", 0.7), ("three.safetensors", 0.4)
        ]  # fmt: skip
        assert all(len(e["sha256"]) == 64 and Path(e["uri"]).is_absolute() for e in two["loras"])
        assert two["cache"] == {"kind": "fbcache", "threshold": 0.5}
        assert "loras" not in jobs["base-plain"].params and "cache" not in jobs["base-plain"].params
        for item, job in jobs.items():
            output = outputs[job.id]
            sidecar = json.loads(Path(output.sidecar_uri).read_text())
            assert sidecar["settings"]["loras"] == job.params.get("loras", [])
            if item.endswith("cached"):
                assert output.dit_forwards == 4 and 0 < output.dit_forwards_skipped < 4
                assert sidecar["settings"]["cache"] == {"kind": "fbcache", "threshold": 0.5}
                assert sidecar["sampling"] == {
                    "dit_forwards": 4,
                    "dit_forwards_skipped": output.dit_forwards_skipped,
                }
            else:
                assert output.dit_forwards is None and "sampling" not in sidecar
                assert sidecar["settings"]["cache"] is None
        # Distinct LoRA sets make distinct videos; the cache makes (nearly) the same one.
        shas = {item: outputs[job.id].sha256 for item, job in jobs.items()}
        assert len({shas["base-plain"], shas["one-plain"], shas["two-plain"]}) == 3

        export = tmp_path / "dataset.parquet"
        export_run(Catalog(catalog_url), summary["run_id"], str(export), "parquet")
        table = {row["item_id"]: row for row in pq.read_table(export).to_pylist()}
        assert json.loads(table["two-cached"]["loras"]) == two["loras"]
        assert table["two-cached"]["cache"] == "fbcache:0.5" and table["base-plain"]["cache"] is None
        assert table["one-cached"]["dit_forwards"] == 4
        skipped = outputs[jobs["one-cached"].id].dit_forwards_skipped
        assert table["one-cached"]["dit_forwards_skipped"] == skipped
        assert table["base-plain"]["loras"] == "[]" and table["base-plain"]["dit_forwards"] is None

        again = _run(tmp_path, catalog_url, manifest, ckpt)
        assert again["plan"]["already_done"] == 6 and again["plan"]["to_generate"] == 0

        _write_lora(tmp_path / "three.safetensors", 33)  # replaced: only the jobs stacking it are redone
        redo = _run(tmp_path, catalog_url, manifest, ckpt)
        assert redo["status"] == "succeeded"
        assert redo["plan"]["already_done"] == 4 and redo["plan"]["to_generate"] == 2
        with Catalog(catalog_url) as catalog:
            made = {j.item_id for j in catalog.jobs(redo["run_id"]) if j.last_run_id == redo["run_id"]}
        assert made == {"two-plain", "two-cached"}
        assert pipeline_loads() - loads == 1 and len(reads) == 1  # still once, over three runs
    finally:
        clear_pipelines()


def test_a_lora_file_changed_after_planning_fails_its_job_without_retry(tmp_path):
    from flows.loras import BadLora, LoraFiles

    path = _write_lora(tmp_path / "x.safetensors", 1)
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    files = LoraFiles()
    assert len(files.load([(str(path), sha, 0.5)]).entries) == 1
    assert files.load([(str(path), sha, 1.0)]).entries[0][1] == 1.0 and files.reads == 1
    with pytest.raises(BadLora, match="changed since the job was planned"):
        LoraFiles().load([(str(path), "0" * 64, 1.0)])
    with pytest.raises(BadLora, match="cannot be read: FileNotFoundError"):
        LoraFiles().load([(str(tmp_path / "gone.safetensors"), sha, 1.0)])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(BadLora, match="not a readable safetensors file"):
        LoraFiles().load([(str(junk), hashlib.sha256(junk.read_bytes()).hexdigest(), 1.0)])


def _rows(tmp_path: Path, *rows: dict, defaults: RunDefaults | None = None):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"item_id": f"r{n}", "prompt": "p", **row}) + "\n"
                            for n, row in enumerate(rows)))  # fmt: skip
    return load_manifest(str(path), defaults or RunDefaults(model="tiny-t2v"))


def test_manifest_fields_resolve_with_run_defaults_and_recipes(tmp_path):
    defaults = RunDefaults(model="tiny-t2v", loras=["/l/run.safetensors:0.5"], cache="magcache", steps=30)
    loaded = _rows(
        tmp_path,
        {},
        {"loras": [], "cache": "off"},
        {"loras": "a.safetensors:0.7;b.safetensors", "cache": {"kind": "fbcache", "threshold": 0.1}},
        {"loras": [{"uri": "s3://bucket/c.safetensors", "strength": -0.5}], "recipe": "few-step"},
        {"recipe": "few-step", "steps": 6, "guide_scale": 2.0},
        defaults=defaults,
    )
    assert not loaded.problems
    run, none, given, s3, mixed = loaded.requests
    assert run.loras == (("/l/run.safetensors", 0.5),) and run.cache == "magcache:0.12" and run.steps == 30
    assert none.loras == () and none.cache is None and "loras" not in none.params()
    assert given.loras == (("a.safetensors", 0.7), ("b.safetensors", 1.0)) and given.cache == "fbcache:0.1"
    assert given.params()["cache"] == {"kind": "fbcache", "threshold": 0.1}
    assert s3.loras == (("s3://bucket/c.safetensors", -0.5),)
    # The row's recipe beats the run's own values; the row's values beat its recipe.
    assert (s3.steps, s3.guide_scale, s3.shift, s3.solver) == (4, 1.0, 5.0, "euler")
    assert (mixed.steps, mixed.guide_scale, mixed.solver) == (6, 2.0, "euler")
    from flows.manifest.schema import ResolvedRequest

    assert ResolvedRequest.from_record(given.to_record()) == given


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"cache": "teacache"}, "cache", "cache kind 'teacache': expected one of fbcache, magcache"),
        ({"cache": "fbcache:x"}, "cache", "expected KIND[:THRESHOLD]"),
        ({"loras": [{"uri": "a.safetensors", "weight": 1}]}, "loras", "LoRA 1: "),
        ({"loras": ["a.safetensors:99"]}, "loras", "LoRA strength 99: expected a number from -10 to 10"),
        ({"loras": 7}, "loras", "expected a list of LoRAs"),
        ({"loras": "[oops"}, "loras", "not a JSON list"),
        ({"recipe": "turbo"}, "recipe", "unknown recipe 'turbo'; expected one of: few-step"),
    ],
)
def test_bad_fast_mode_fields_name_the_field(tmp_path, row, field, message):
    loaded = _rows(tmp_path, row)
    assert len(loaded.problems) == 1
    problem = loaded.problems[0]
    assert problem.field == field and message in problem.reason, problem


def test_missing_or_foreign_lora_files_are_refused_before_the_run(tmp_path):
    from flows.inputs import check_requests
    from flows.settings import get_settings

    _write_lora(tmp_path / "ok.safetensors", 1)
    (tmp_path / "model.ckpt").write_bytes(b"x")
    loaded = _rows(tmp_path, {"loras": ["ok.safetensors"]}, {"loras": ["missing.safetensors"]},
                   {"loras": ["/etc/elsewhere.safetensors"]}, {"loras": ["model.ckpt"]})  # fmt: skip
    settings = get_settings(storage_root=str(tmp_path / "out"))
    checked, _, problems = check_requests(loaded, settings, None, "tiny-t2v")
    assert len(checked.requests) == 1
    reasons = sorted(p.reason for p in problems)
    assert any("missing.safetensors does not exist" in r for r in reasons)
    assert any("is outside the input roots" in r for r in reasons)
    assert any("expected a .safetensors file" in r for r in reasons)
    assert all(p.field == "loras" for p in problems)


def test_shards_group_by_lora_set_and_cache():
    one = [{"uri": "/a.safetensors", "sha256": "1" * 64, "strength": 1.0}]
    other = [{"uri": "/a.safetensors", "sha256": "2" * 64, "strength": 1.0}]
    cache = {"kind": "fbcache", "threshold": 0.05}
    jobs = [JobGroupRow(1, "tiny-t2v", "64*48", 5), JobGroupRow(2, "tiny-t2v", "64*48", 5, one),
            JobGroupRow(3, "tiny-t2v", "64*48", 5, other), JobGroupRow(4, "tiny-t2v", "64*48", 5, one, cache),
            JobGroupRow(5, "tiny-t2v", "64*48", 5, one)]  # fmt: skip
    shards = plan_shards(jobs, shard_size=8)
    assert sorted(s.job_ids for s in shards) == [[1], [2, 5], [3], [4]]
    labelled = {tuple(s.job_ids): s for s in shards}
    assert labelled[(4,)].label.endswith("-fbcache0.05-1") and "cache:fbcache:0.05" in labelled[(4,)].tags
    assert labelled[(2, 5)].loras and labelled[(2, 5)].loras != labelled[(3,)].loras
    assert labelled[(1,)].label == "tiny-t2v-64x48-f5-1"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_worker_group_takes_loras_and_caches(harness, tmp_path, monkeypatch):
    """gpus_per_job 2 on the CPU (gloo; CFG halves): the LoRA set travels to the group once and is merged on
    both ranks; rank 0's cache counts come back for the catalog; a group restarted after a kill merges the
    set again before its next video, and hands kept latents back."""
    from flows.group import GroupPipeline
    from flows.models import _pipelines

    monkeypatch.setenv("WANFLOW_GPUS_PER_JOB", "2")
    _write_lora(tmp_path / "one.safetensors", 1)
    rows = [{"item_id": f"g{i}", "prompt": f"clip {i}", **FAST, "loras": ["one.safetensors"], "cache": CACHED}
            for i in range(2)]  # fmt: skip
    manifest = tmp_path / "group.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    clear_pipelines()
    try:
        summary = _run(tmp_path, catalog_url, manifest)
        assert summary["by_status"]["succeeded"] == 2, summary
        (pipe,) = [p for p in _pipelines.values() if isinstance(p, GroupPipeline)]
        assert pipe.group.starts == 1 and pipe._merged() and len(pipe._loras.entries) == 1
        with Catalog(catalog_url) as catalog:
            outputs = catalog.outputs(summary["run_id"])
        # Rank 0 runs the conditional branch: one forward per step, in its own cache context.
        assert all(o.dit_forwards == FAST["steps"] and o.dit_forwards_skipped is not None for o in outputs)
        pipe.group.abort()  # a dead group: the next video's group starts from the base weights
        assert not pipe._merged()
        frames = list(pipe.generate_stream("again", seed=1, **{k: FAST[k] for k in ("frame_num", "steps")},
                                           size="64*48", keep_latents=True))  # fmt: skip
        assert frames and pipe.group.starts == 2 and pipe._merged()
        # Latents kept by the group come back from rank 0 with their file's metadata.
        assert tuple(pipe.last_latents.shape) == (16, 2, 6, 8)
        assert pipe.latents_metadata()["layout"] == "[z, T, h, w] float32"
        # Latents only: rank 0 decodes the first latent frame alone, the video's first frame.
        kept = pipe.last_latents
        first = list(pipe.generate_stream("again", seed=1, **{k: FAST[k] for k in ("frame_num", "steps")},
                                          size="64*48", keep_latents=True, decode_video=False))  # fmt: skip
        assert len(first) == 1 and torch.equal(first[0], frames[0][:1])
        assert torch.equal(pipe.last_latents, kept)
    finally:
        clear_pipelines()


def test_job_groups_carry_the_lora_set_and_cache_on_every_backend(catalog_url):
    """Sharding reads the LoRA set and cache out of the jobs' JSON parameters in SQL (SQLite and PostgreSQL
    extract JSON differently)."""
    from storage.catalog import JobSpec, JobStatus

    loras = [{"uri": "/l/a.safetensors", "sha256": "a" * 64, "strength": 0.7}]
    cache = {"kind": "magcache", "threshold": 0.12}
    catalog = Catalog(catalog_url)
    catalog.upgrade()
    run = catalog.create_run("groups", "/m.jsonl", "ab" * 32, {})
    base = {"prompt": "p", "size": "64*48", "frame_num": 5}
    specs = [JobSpec("plain", 1, "tiny-t2v", "fp", base),
             JobSpec("styled", 1, "tiny-t2v", "fp", {**base, "loras": loras, "cache": cache})]  # fmt: skip
    catalog.plan_jobs(run.id, specs)
    rows = {row.job_id: row for row in catalog.job_groups(run.id, JobStatus.pending)}
    by_item = {j.item_id: rows[j.id] for j in catalog.jobs(run.id)}
    assert by_item["plain"].loras is None and by_item["plain"].cache is None
    assert by_item["styled"].loras == loras and by_item["styled"].cache == cache
    shards = plan_shards(rows.values(), shard_size=8)
    assert len(shards) == 2 and {s.cache for s in shards} == {None, "magcache:0.12"}
    catalog.close()
