"""Latents as an output (`wanflow generate --save-latents`): the final latents stored beside the video as
safetensors, recorded in the catalog and the sidecar, verified with the video, and decoding with `WanVAE` to
the very frames the video was encoded from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from stream_helpers import record_stream

import flows.shard
from flows.models import model_source
from flows.shard import JobContext, run_job
from storage.catalog import Catalog, JobSpec
from storage.layout import OutputLayout
from storage.outputs import LATENTS_KEY, verifier
from wan.pipeline import to_uint8_frames

FAST = {"size": "64*48", "frame_num": 9, "steps": 2}


def test_saved_latents_decode_to_the_frames_the_video_was_made_of(tmp_path, monkeypatch):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.upgrade()
    source = model_source("tiny-t2v")
    params = {"prompt": "a fox", **FAST, "save_latents": True}
    spec = JobSpec("fox", 3, "tiny-t2v", source.fingerprint, params)
    run = catalog.create_run("latents", "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(run.id, [spec])
    (job,) = catalog.jobs(run.id)
    pipe = flows.shard.load_pipeline(source)
    encoded = record_stream(monkeypatch, pipe)  # the frames handed to the encoder, as they went
    ctx = JobContext(
        catalog=catalog, run_id=run.id, run_name=run.name, source=source, pipeline=pipe,
        layout=OutputLayout(str(tmp_path / "out")), storage_options={}, worker="w",
    )  # fmt: skip
    assert run_job(ctx, job.id)["status"] == "succeeded"
    output = catalog.output_of(job.id)
    assert output.latents_uri.endswith("/latents/fox/fox-s3.latents.safetensors")
    assert output.latents_bytes > 0 and len(output.latents_sha256) == 64
    assert verifier()(output)
    with safe_open(output.latents_uri, "pt") as f:
        latents = f.get_tensor(LATENTS_KEY)
        metadata = f.metadata()
    assert tuple(latents.shape) == (16, 3, 6, 8) and latents.dtype == torch.float32  # [z, T, h, w]
    assert metadata["model"] == "tiny-t2v" and "latents_std" in metadata
    assert json.loads(metadata["latents_mean"]) == pipe.vae.latents_mean.tolist()
    with torch.no_grad():
        decoded = pipe.vae.decode(latents[None])[0]  # [3, F, H, W] in [-1, 1]
    frames = to_uint8_frames(decoded).numpy()  # [F, H, W, 3], as the stream converts them
    assert np.array_equal(frames, np.concatenate(encoded))
    # The float frames agree too, within 1e-5 (the same decode of the same latents).
    streamed = torch.cat(list(pipe.vae.decode_stream(latents[None].clone())), dim=2)[0]
    assert (streamed - decoded).abs().max().item() <= 1e-5
    sidecar = json.loads(Path(output.sidecar_uri).read_text())
    assert sidecar["latents"]["latents_uri"] == output.latents_uri
    assert sidecar["latents"]["layout"] == "[z, T, h, w] float32"

    # A missing latents file makes the output unverified: a re-run redoes the job.
    os.remove(output.latents_uri)
    assert not verifier()(output)
    catalog.close()


def test_save_latents_is_a_run_default_and_part_of_the_identity(tmp_path):
    from flows.manifest import RunDefaults, load_manifest

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"item_id": "a", "prompt": "p"}) + "\n")
    plain = load_manifest(str(path), RunDefaults(model="tiny-t2v")).requests[0]
    kept = load_manifest(str(path), RunDefaults(model="tiny-t2v", save_latents=True)).requests[0]
    assert "save_latents" not in plain.params() and kept.params()["save_latents"] is True


def test_latents_only_skips_the_decode_and_stores_what_the_video_run_kept(tmp_path):
    """`--latents-only`: the same latents as a run that kept them beside the video, the first frame alone
    decoded (the thumbnail, the video's own first frame), no video, poster or signals; the row names the
    latents file and verifies by it."""
    from PIL import Image

    from storage.catalog import LATENTS_CODEC

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.upgrade()
    source = model_source("tiny-t2v")
    specs = [JobSpec(item, 3, "tiny-t2v", source.fingerprint, {"prompt": "fox", **FAST, "save_latents": kept})
             for item, kept in (("beside", True), ("only", "only"))]  # fmt: skip
    run = catalog.create_run("latents", "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(run.id, specs)
    pipe = flows.shard.load_pipeline(source)
    decoded: list[int] = []  # latent frames through the VAE decoder, per call
    hook = pipe.vae.decoder.register_forward_hook(lambda _m, args, _o: decoded.append(args[0].shape[2]))
    ctx = JobContext(
        catalog=catalog, run_id=run.id, run_name=run.name, source=source, pipeline=pipe,
        layout=OutputLayout(str(tmp_path / "out")), storage_options={}, worker="w",
    )  # fmt: skip
    outputs = {}
    try:
        for job in catalog.jobs(run.id):
            decoded.clear()
            assert run_job(ctx, job.id)["status"] == "succeeded"
            outputs[job.item_id] = (catalog.output_of(job.id), len(decoded))
    finally:
        hook.remove()
    (beside, beside_decodes), (only, only_decodes) = outputs["beside"], outputs["only"]
    assert (beside_decodes, only_decodes) == (3, 1)  # 3 latent frames for the video; the first alone
    assert only.codec == LATENTS_CODEC and not only.has_video and beside.has_video
    assert only.uri == only.latents_uri and only.uri.endswith("/only/only-s3.latents.safetensors")
    assert (only.sha256, only.bytes) == (only.latents_sha256, only.latents_bytes)
    assert (only.width, only.height, only.frames, only.fps) == (64, 48, beside.frames, beside.fps)
    assert beside.frames == 9
    assert only.poster_uri is None and only.motion is None and only.phash is None
    assert not list((tmp_path / "out" / "latents" / "only").glob("*.mp4"))
    with safe_open(beside.latents_uri, "pt") as a, safe_open(only.latents_uri, "pt") as b:
        assert torch.equal(a.get_tensor(LATENTS_KEY), b.get_tensor(LATENTS_KEY))  # the same sampling
        assert a.metadata() == b.metadata()
    # The thumbnail is the video's first frame: the causal VAE decodes latent frame 0 alone exactly.
    first = [np.asarray(Image.open(o.thumbnail_uri).convert("RGB")) for o in (beside, only)]
    assert np.array_equal(first[0], first[1])
    sidecar = json.loads(Path(only.sidecar_uri).read_text())
    assert sidecar["output"]["codec"] == LATENTS_CODEC and sidecar["output"]["uri"] == only.uri
    assert "signals" not in sidecar and sidecar["job"]["params"]["save_latents"] == "only"
    assert verifier()(only)
    os.remove(only.latents_uri)
    assert not verifier()(only)  # a re-run redoes it
    catalog.close()


def test_latents_only_is_its_own_job_and_a_generate_flag(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.manifest import RunDefaults, load_manifest

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"item_id": "a", "prompt": "p"}) + "\n")
    only = load_manifest(str(path), RunDefaults(model="tiny-t2v", save_latents="only")).requests[0]
    assert only.params()["save_latents"] == "only"
    assert type(only).from_record(only.to_record()) == only
    result = CliRunner().invoke(app, ["generate", str(path), "--latents-only", "--no-save-latents"])
    assert result.exit_code != 0 and "--latents-only stores the latents" in result.output
