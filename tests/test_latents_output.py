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
    encoded: list[np.ndarray] = []  # the frames handed to the encoder, as they went
    original = pipe.generate_stream

    def recording(*args, **kwargs):
        for chunk in original(*args, **kwargs):
            encoded.append(np.asarray(chunk).copy())
            yield chunk

    monkeypatch.setattr(pipe, "generate_stream", recording)
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
