"""`wanflow dataset export`: WebDataset shards and a Hugging Face folder made from the catalog, read back with
the real readers; selection (runs, --where, --model, --lora, near-duplicates), checks against the catalog,
idempotence, an interrupted export finished by running it again, and the command itself."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import flows.shard
import storage.dataset as dataset
from flows.cli import app
from flows.models import model_source
from flows.shard import JobContext, run_job
from storage.catalog import Catalog, JobSpec, OutputRecord
from storage.dataset import Selection, export_dataset, select_samples
from storage.layout import OutputLayout

FAST = {"size": "64*48", "frame_num": 5, "steps": 2}
LORA = {"uri": "/loras/style-v2.safetensors", "sha256": "5e" * 32, "strength": 0.8}


def _generate(catalog: Catalog, run_name: str, specs: list[JobSpec], source, pipe, root: Path) -> None:
    """Plan a run of `specs` and make each pending job's video with the tiny model, as a shard would."""
    run = catalog.create_run(run_name, "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(run.id, specs)
    ctx = JobContext(
        catalog=catalog, run_id=run.id, run_name=run.name, source=source, pipeline=pipe,
        layout=OutputLayout(str(root / "out")), storage_options={}, worker="w",
    )  # fmt: skip
    for job in catalog.jobs(run.id):
        if job.status == "pending":
            assert run_job(ctx, job.id)["status"] == "succeeded"


def _record(catalog: Catalog, run_name: str, rows: list[tuple[JobSpec, OutputRecord]]) -> None:
    """A run whose outputs go straight into the catalog (chosen signals, files that may not be there)."""
    run = catalog.create_run(run_name, "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(run.id, [spec for spec, _ in rows])
    jobs = {(j.item_id, j.seed): j for j in catalog.jobs(run.id)}
    for spec, output in rows:
        job = jobs[(spec.item_id, spec.seed)]
        assert catalog.claim_job(job.id, worker="w", start=True, run_id=run.id) is not None
        catalog.mark_succeeded(job.id, output, worker="w")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A catalog of six videos in three runs:

    alpha      fox-s1 (with latents), owl-s2                  made by the tiny model
    beta.v2    fox-twin-s1 (fox's prompt and seed: the same video, a near-duplicate), owl-s2 (found done)
    gamma      lynx-s5: a copy of owl's video by another model, with a LoRA, frozen, its own phash;
               ghost-s6: its video is missing; bad-s7: its video is not the bytes the catalog says
    """
    root = tmp_path_factory.mktemp("made")
    url = f"sqlite:///{root / 'catalog.db'}"
    catalog = Catalog(url)
    catalog.upgrade()
    source = model_source("tiny-t2v")
    pipe = flows.shard.load_pipeline(source)

    def spec(item: str, seed: int, prompt: str, **extra) -> JobSpec:
        return JobSpec(item, seed, "tiny-t2v", source.fingerprint, {"prompt": prompt, **FAST, **extra})

    owl = spec("owl", 2, "an owl")
    _generate(catalog, "alpha", [spec("fox", 1, "a fox", save_latents=True), owl], source, pipe, root)
    _generate(catalog, "beta.v2", [spec("fox-twin", 1, "a fox"), owl], source, pipe, root)
    owl_out = next(o for o in catalog.outputs() if "/owl-s2.mp4" in o.uri)
    copies = root / "copies"
    copies.mkdir()
    shutil.copy(owl_out.uri, copies / "lynx.mp4")
    (copies / "bad.mp4").write_bytes(b"\0" * owl_out.bytes)  # the right size, the wrong bytes
    base = {"sha256": owl_out.sha256, "bytes": owl_out.bytes, "width": 64, "height": 48, "frames": 5,
            "fps": 16.0, "codec": "h264"}  # fmt: skip
    _record(catalog, "gamma", [
        (JobSpec("lynx", 5, "other-model", "fp-other", {"prompt": "a lynx", **FAST, "loras": [LORA]}),
         OutputRecord(uri=str(copies / "lynx.mp4"), **base, motion=0.9, frozen=True, black=False, flat=False,
                      frozen_frames=4, black_frames=0, flat_frames=0, phash="00" * 8)),
        (JobSpec("ghost", 6, "other-model", "fp-other", {"prompt": "a ghost", **FAST}),
         OutputRecord(uri=str(copies / "ghost.mp4"), **base)),
        (JobSpec("bad", 7, "other-model", "fp-other", {"prompt": "a bad copy", **FAST}),
         OutputRecord(uri=str(copies / "bad.mp4"), **base)),
    ])  # fmt: skip
    outputs = {Path(o.uri).name: o for o in catalog.outputs()}
    catalog.close()
    return url, outputs


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (hidden ones too) with its inode and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _read_webdataset(folder: Path) -> list[dict]:
    import webdataset as wds

    shards = sorted(str(p) for p in folder.glob("shard-*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False))


def _picked(item: str, job_id: int, phash: str | None = None) -> tuple[dict, OutputRecord]:
    """An export row and output, as `select_samples` pairs them, for a video that need not exist."""
    row = {"run": "r.1", "run_id": 1, "item_id": item, "seed": 0, "job_id": job_id, "loras": "[]",
           "params": "{}"}  # fmt: skip
    output = OutputRecord(uri=f"/x/{item}.mp4", sha256="0" * 64, bytes=1000, width=64, height=48, frames=5,
                          fps=16.0, codec="h264", phash=phash)  # fmt: skip
    return row, output


def test_keys_shards_duplicates_and_leftovers():
    picked = [_picked("a.b", 1, "ff" * 8), _picked("a.b", 2, "ff" * 8), _picked("c", 3),
              _picked("d", 4, "0f" * 8)]  # fmt: skip
    samples = dataset._keyed(picked)
    # No dot in a key (WebDataset cuts names at the first one); a key taken already gets the job id.
    assert [s.key for s in samples] == ["r%2E1/a%2Eb-s0", "r%2E1/a%2Eb-s0-j2", "r%2E1/c-s0", "r%2E1/d-s0"]
    assert [row["job_id"] for row, _ in dataset._drop_duplicates(picked)] == [1, 3, 4]  # no phash: kept
    pairs = dataset._plan_shards(samples, shard_size=sum(s.estimated_bytes() for s in samples[:2]))
    assert [len(p.samples) for p in pairs] == [2, 2] and pairs[1].name == "shard-000001.tar"
    assert [len(p.samples) for p in dataset._plan_shards(samples, shard_size=1)] == [1, 1, 1, 1]
    # A shard's fingerprint changes with the bytes of its samples, and only its own.
    redone = dataset._keyed([(picked[0][0], dataclasses.replace(picked[0][1], sha256="1" * 64)), *picked[1:]])
    before, after = dataset._plan_shards(samples, 1), dataset._plan_shards(redone, 1)
    same = [old.fingerprint() == new.fingerprint() for old, new in zip(before, after, strict=True)]
    assert same == [False, True, True, True]
    hexed = "0123456789abcdef" * 2
    assert dataset._is_leftover(f".shard-000001.tar.{hexed}.partial")
    assert dataset._is_leftover(f"videos/r/.c-s0.mp4.{hexed}.partial")
    assert not dataset._is_leftover(f".notes.txt.{hexed}.partial")  # not an object of the export: left alone
    assert not dataset._is_leftover("shard-000001.tar")


@pytest.mark.slow
def test_selection_by_runs_filters_model_lora_and_duplicates(made):
    url, _ = made
    with Catalog(url) as catalog:

        def keys(**selection) -> list[str]:
            return [s.key for s in select_samples(catalog, Selection(**selection)).samples]

        everything = keys()
        assert len(everything) == 6 and "beta%2Ev2/fox-twin-s1" in everything  # no dot in a key
        assert all("." not in key for key in everything)
        # A job two runs share (owl, found done by beta.v2) comes once, under the run that made it.
        assert keys(runs=("alpha", "beta.v2")) == ["alpha/fox-s1", "alpha/owl-s2", "beta%2Ev2/fox-twin-s1"]
        assert keys(runs=("beta.v2",)) == ["alpha/owl-s2", "beta%2Ev2/fox-twin-s1"]
        assert keys(where="frozen") == ["gamma/lynx-s5"]
        assert len(keys(where="not frozen")) == 3  # the three measured, unfrozen videos; unmeasured ones fail
        assert keys(model="other-model") == ["gamma/lynx-s5", "gamma/ghost-s6", "gamma/bad-s7"]
        assert keys(lora="style-v2") == keys(lora="5e5e5e") == ["gamma/lynx-s5"]
        assert keys(lora="nothing-like-it") == []
        deduped = select_samples(catalog, Selection(drop_duplicates=True))
        assert deduped.duplicates == 1 and "beta%2Ev2/fox-twin-s1" not in [s.key for s in deduped.samples]
        with pytest.raises(ValueError, match="no run 'nope'"):
            keys(runs=("nope",))


@pytest.mark.slow
def test_webdataset_shards_read_back_and_a_second_export_writes_nothing(made, tmp_path):
    url, outputs = made
    folder = tmp_path / "wds"
    done: list[tuple[int, int]] = []
    with Catalog(url) as catalog:
        summary = export_dataset(catalog, str(folder), shard_size=50_000, progress=lambda *a: done.append(a))
    assert summary.samples == 4 and summary.shards >= 2 and done[-1] == (6, 6)
    assert {s["key"]: s["reason"] for s in summary.skipped} == {
        "gamma/ghost-s6": "video missing", "gamma/bad-s7": "video sha256 differs from the catalog's"}
    samples = _read_webdataset(folder)
    by_key = {s["__key__"]: s for s in samples}
    assert sorted(by_key) == ["alpha/fox-s1", "alpha/owl-s2", "beta%2Ev2/fox-twin-s1", "gamma/lynx-s5"]
    for key, sample in by_key.items():
        meta = json.loads(sample["json"])
        assert meta["key"] == key and hashlib.sha256(sample["mp4"]).hexdigest() == meta["sha256"]
        assert meta["sha256"] == outputs[Path(meta["uri"]).name].sha256
        assert {"prompt", "size", "frame_num", "steps", "model_id", "model_fingerprint", "motion", "phash",
                "loras", "cache", "params"} <= set(meta)  # fmt: skip
        if key == "gamma/lynx-s5":  # recorded without a thumbnail
            assert "webp" not in sample
        else:
            assert sample["webp"][:4] == b"RIFF"  # a WebP image
    fox = by_key["alpha/fox-s1"]
    assert hashlib.sha256(fox["safetensors"]).hexdigest() == json.loads(fox["json"])["latents_sha256"]
    assert json.loads(by_key["gamma/lynx-s5"]["json"])["loras"] == [LORA]
    index = pq.read_table(folder / "index.parquet").to_pylist()
    assert [r["key"] for r in index] == list(by_key)  # in shard order
    assert {r["shard"] for r in index} == {p.name for p in folder.glob("shard-*.tar")}
    shards = pq.read_table(folder / "shards.parquet").to_pylist()
    assert sum(s["samples"] for s in shards) == 4
    assert all(hashlib.sha256((folder / s["shard"]).read_bytes()).hexdigest() == s["sha256"] for s in shards)
    card = (folder / "README.md").read_text()
    assert "- samples: 4 in" in card and "- skipped: 2" in card and "video missing: 1" in card
    assert "tiny-t2v" in card and "wds.WebDataset" in card and "motion: min" in card
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["complete"] is True and manifest["format"] == "webdataset"

    before = _files(folder)
    with Catalog(url) as catalog:
        again = export_dataset(catalog, str(folder), shard_size=50_000)
    assert again.written == [] and again.kept == summary.parts and _files(folder) == before
    assert again.samples == 4 and len(again.skipped) == 2
    # A change in the selection rewrites what changed and removes the shards no longer in it.
    with Catalog(url) as catalog:
        fewer = export_dataset(catalog, str(folder), shard_size=50_000, selection=Selection(runs=("alpha",)))
    assert fewer.samples == 2 and fewer.removed
    assert sorted(s["__key__"] for s in _read_webdataset(folder)) == ["alpha/fox-s1", "alpha/owl-s2"]


@pytest.mark.slow
def test_an_interrupted_export_leaves_no_partial_shard_and_a_rerun_completes_it(made, tmp_path, monkeypatch):
    url, _ = made
    folder = tmp_path / "wds"
    original = dataset._members
    shards_started = []

    def killed_in_the_second_shard(part, *args):
        shards_started.append(part.name)
        for i, member in enumerate(original(part, *args)):
            if len(shards_started) == 2 and i == 1:
                raise RuntimeError("killed")
            yield member

    monkeypatch.setattr(dataset, "_members", killed_in_the_second_shard)
    selection = Selection(runs=("alpha", "beta.v2"))
    with Catalog(url) as catalog, pytest.raises(OSError, match="killed"):
        export_dataset(catalog, str(folder), shard_size=1, selection=selection)
    assert sorted(_files(folder)) == ["export.json", "shard-000000.tar"]  # no partial file, no card yet
    assert json.loads((folder / "export.json").read_text())["complete"] is False
    first = _files(folder)["shard-000000.tar"]
    (folder / f".shard-000001.tar.{'0' * 32}.partial").write_bytes(b"what a killed process leaves")

    monkeypatch.setattr(dataset, "_members", original)
    with Catalog(url) as catalog:
        summary = export_dataset(catalog, str(folder), shard_size=1, selection=selection)
    assert summary.kept == 1 and summary.samples == summary.shards == 3
    files = _files(folder)
    assert files["shard-000000.tar"] == first and not any(name.startswith(".") for name in files)
    assert len(_read_webdataset(folder)) == 3
    assert json.loads((folder / "export.json").read_text())["complete"] is True


@pytest.mark.slow
def test_the_hf_folder_loads_with_datasets(made, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import Video, load_dataset

    url, outputs = made
    folder = tmp_path / "hf"
    with Catalog(url) as catalog:
        summary = export_dataset(catalog, str(folder), fmt="hf", selection=Selection(drop_duplicates=True))
    assert summary.samples == 3 and summary.duplicates_dropped == 1 and len(summary.skipped) == 2
    ds = load_dataset("videofolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    ds = ds.cast_column("video", Video(decode=False))  # decoding needs torchcodec, not installed here
    assert ds.num_rows == 3
    assert {"video", "key", "prompt", "thumbnail", "sha256", "motion"} <= set(ds.column_names)
    for row in ds:
        data = Path(row["video"]["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] == outputs[Path(row["uri"]).name].sha256
    metadata = pq.read_table(folder / "metadata.parquet").to_pylist()
    assert [r["file_name"] for r in metadata] == ["videos/alpha/fox-s1.mp4", "videos/alpha/owl-s2.mp4",
                                                  "videos/gamma/lynx-s5.mp4"]  # fmt: skip
    assert (folder / metadata[0]["thumbnail"]).is_file() and (folder / metadata[0]["latents"]).is_file()
    assert 'load_dataset("videofolder"' in (folder / "README.md").read_text()

    before = _files(folder)
    with Catalog(url) as catalog:
        again = export_dataset(catalog, str(folder), fmt="hf", selection=Selection(drop_duplicates=True))
    assert again.written == [] and _files(folder) == before
    with Catalog(url) as catalog, pytest.raises(ValueError, match="holds a hf export already"):
        export_dataset(catalog, str(folder), fmt="webdataset")


runner = CliRunner()


@pytest.mark.slow
def test_the_command_exports_and_answers_bad_input_in_one_line(made, tmp_path):
    url, _ = made
    folder = tmp_path / "cli"

    def export(*args: str):
        return runner.invoke(app, ["dataset", "export", "--catalog-url", url, *args])

    result = export("--to", str(folder), "--run", "alpha", "--run", "gamma", "--model", "other-model",
                    "--shard_size", "1", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["samples"] == 1 and doc["shards"] == 1 and len(doc["skipped"]) == 2
    result = export("--to", str(folder), "--run", "alpha", "--run", "gamma", "--model", "other-model",
                    "--shard-size", "1")  # fmt: skip
    assert result.exit_code == 0 and "exported 1 samples in 1 shards" in result.stdout
    assert "0 objects written" in result.stdout and "skipped gamma/ghost-s6: video missing" in result.output
    for args, message in (
        (["--format", "zip"], "--format 'zip': expected one of webdataset, hf"),
        (["--run", "nope"], "no run 'nope' in the catalog"),
        (["--where", "speed > 1"], "--where: filter 'speed > 1': unknown field 'speed'"),
        (["--model", "no-such-model"], "nothing to export"),
    ):
        result = export("--to", str(tmp_path / "other"), *args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_a_webdataset_export_to_s3_is_whole_and_written_once(made, s3_target, monkeypatch):
    """Shards as multipart uploads (parts of 2 kB here), completed whole; the upload of a shard a killed
    export left open is aborted by the next one, and nothing else is."""
    import moto.s3.models
    from s3_server import BUCKET, target_objects

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 2048)
    monkeypatch.setenv("WANFLOW_S3_PART_SIZE", "2048")
    url, _ = made
    to = s3_target.url("datasets/all")
    with Catalog(url) as catalog:
        first = export_dataset(catalog, to, shard_size=50_000, storage_options=s3_target.options)
    objects = target_objects(s3_target)
    shards = sorted(name for name in objects if name.startswith("datasets/all/shard-"))
    assert first.samples == 4 and len(shards) == first.shards and objects == s3_target.listing()
    assert s3_target.fs.info(f"{BUCKET}/videos/{shards[0]}")["ETag"].strip('"').rsplit("-", 1)[1].isdigit()
    with tarfile.open(fileobj=io.BytesIO(s3_target.read(shards[0]))) as tar:
        assert "alpha/fox-s1.mp4" in tar.getnames()
    for key in ("datasets/all/shard-000000.tar", "datasets/all/notes.bin"):  # a killed export's, another's
        s3_target.fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=f"videos/{key}")
    with Catalog(url) as catalog:
        again = export_dataset(catalog, to, shard_size=50_000, storage_options=s3_target.options)
    assert again.written == [] and again.kept == first.parts
    assert s3_target.listing() == [*objects, "upload:videos/datasets/all/notes.bin"]
    assert json.loads(s3_target.read("datasets/all/export.json"))["complete"] is True


def test_latents_only_outputs_export_without_videos(tmp_path, monkeypatch):
    """A latents-only run exports as samples without an mp4 (webdataset), or as an hf imagefolder listed by
    the thumbnails with the latents beside; an hf folder mixing them with videos is refused."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset
    from safetensors.torch import load_file

    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.upgrade()
    source = model_source("tiny-t2v")
    pipe = flows.shard.load_pipeline(source)
    only = {"save_latents": "only"}
    specs = [JobSpec(item, seed, "tiny-t2v", source.fingerprint, {"prompt": item, **FAST, **extra})
             for item, seed, extra in (("cat", 1, only), ("dog", 2, only), ("eel", 3, {}))]  # fmt: skip
    _generate(catalog, "lat", specs, source, pipe, tmp_path)
    outputs = {o.uri.rpartition("/")[2]: o for o in catalog.outputs()}
    assert sorted(outputs) == ["cat-s1.latents.safetensors", "dog-s2.latents.safetensors", "eel-s3.mp4"]

    shards = tmp_path / "wds"
    summary = export_dataset(catalog, str(shards))
    assert summary.samples == 3 and summary.skipped == []
    samples = {s["__key__"]: s for s in _read_webdataset(shards)}
    assert {k: sorted(m for m in s if not m.startswith("__")) for k, s in samples.items()} == {
        "lat/cat-s1": ["json", "safetensors", "webp"], "lat/dog-s2": ["json", "safetensors", "webp"],
        "lat/eel-s3": ["json", "mp4", "webp"],
    }  # fmt: skip
    for key, name in (("lat/cat-s1", "cat-s1.latents.safetensors"), ("lat/eel-s3", "eel-s3.mp4")):
        member = samples[key]["safetensors" if "latents" in name else "mp4"]
        assert hashlib.sha256(member).hexdigest() == outputs[name].sha256
        assert json.loads(samples[key]["json"])["codec"] == outputs[name].codec
    assert "latents only (no video decoded): 2" in (shards / "README.md").read_text()

    with pytest.raises(ValueError, match="2 of the 3 selected outputs are latents only"):
        export_dataset(catalog, str(tmp_path / "mixed"), fmt="hf")
    folder = tmp_path / "hf"
    summary = export_dataset(catalog, str(folder), fmt="hf", selection=Selection(where="not video"))
    assert summary.samples == 2 and not (folder / "videos").exists()
    ds = load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 2 and {"first_frame", "latents", "key", "sha256"} <= set(ds.column_names)
    for row in ds:
        assert row["first_frame"].size == (64, 48)
        latents = load_file(folder / row["latents"])["latents"]
        assert tuple(latents.shape) == (16, 2, 6, 8)
        assert hashlib.sha256((folder / row["latents"]).read_bytes()).hexdigest() == row["sha256"]
        assert row["sha256"] == outputs[Path(row["uri"]).name].sha256
    assert 'load_dataset("imagefolder"' in (folder / "README.md").read_text()
    before = _files(folder)
    again = export_dataset(catalog, str(folder), fmt="hf", selection=Selection(where="not video"))
    assert again.written == [] and _files(folder) == before
    # Such a folder lists its samples by their thumbnails: one missing skips its sample until it is back.
    thumbnail = Path(outputs["cat-s1.latents.safetensors"].thumbnail_uri)
    kept = thumbnail.read_bytes()
    thumbnail.unlink()
    gap = export_dataset(catalog, str(tmp_path / "gap"), fmt="hf", selection=Selection(where="not video"))
    assert gap.samples == 1 and [s["reason"] for s in gap.skipped] == [
        "thumbnail missing (a latents folder lists its samples by their thumbnails)"]
    thumbnail.write_bytes(kept)
    mended = export_dataset(catalog, str(tmp_path / "gap"), fmt="hf", selection=Selection(where="not video"))
    assert mended.samples == 2 and mended.skipped == []
    catalog.close()
