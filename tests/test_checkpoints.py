"""Checkpoint layouts written by the tests (official single file, official sharded, diffusers) all
load and generate identical videos; broken checkpoints fail with errors that name file and key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from twins import round_text_encoder_to_bf16, write_diffusers, write_official

from wan.checkpoints import DIT_WEIGHTS, VAE_FILE, detect_layout
from wan.pipeline import WanPipeline
from wan.weights import CheckpointError

SMALL = dict(size=(64, 48), frame_num=5, sampling_steps=3, seed=9, progress=False)


@pytest.fixture(scope="module")
def source() -> WanPipeline:
    return round_text_encoder_to_bf16(WanPipeline.from_config("tiny-t2v", seed=1, device="cpu"))


@pytest.fixture(scope="module")
def official(source, tmp_path_factory):
    return write_official(source, tmp_path_factory.mktemp("official") / "Wan2.1-T2V-tiny")


@pytest.mark.slow
def test_three_layouts_load_and_agree(source, official, tmp_path):
    sharded = write_official(source, tmp_path / "sharded", shards=3)
    diffusers_dir = write_diffusers(source, tmp_path / "diffusers")
    assert (sharded / f"{DIT_WEIGHTS}.index.json").is_file()
    assert detect_layout(diffusers_dir).kind == "diffusers"

    expected = source.generate("a fox", **SMALL)
    for root in (official, sharded, diffusers_dir):
        pipe = WanPipeline.from_pretrained(root, device="cpu")
        assert pipe.preset.name == "tiny-t2v"
        assert pipe.dit.dtype == torch.float32
        assert torch.equal(pipe.generate("a fox", **SMALL), expected), root.name


def test_weights_are_loaded_not_initialised(source, official):
    pipe = WanPipeline.from_pretrained(official, device="cpu")
    for (name, ours), theirs in zip(
        pipe.dit.state_dict().items(), source.dit.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        WanPipeline.from_pretrained(tmp_path / "nope", device="cpu")


def test_missing_files_are_listed_together(official, tmp_path):
    broken = shutil.copytree(official, tmp_path / "broken")
    (broken / VAE_FILE).unlink()
    shutil.rmtree(broken / "google")
    with pytest.raises(CheckpointError, match=r"missing: Wan2\.1_VAE\.pth, google/umt5-xxl/"):
        WanPipeline.from_pretrained(broken, device="cpu")


def _edit_dit(official, tmp_path, edit):
    broken = shutil.copytree(official, tmp_path / "broken")
    sd = load_file(str(broken / DIT_WEIGHTS))
    edit(sd)
    save_file(sd, str(broken / DIT_WEIGHTS))
    return broken


def test_missing_key_is_named_with_its_file(official, tmp_path):
    broken = _edit_dit(official, tmp_path, lambda sd: sd.pop("blocks.1.cross_attn.norm_k.weight"))
    with pytest.raises(CheckpointError) as err:
        WanPipeline.from_pretrained(broken, device="cpu")
    assert DIT_WEIGHTS in str(err.value)
    assert "1 missing key(s): blocks.1.cross_attn.norm_k.weight" in str(err.value)


def test_wrong_shape_and_unexpected_key_are_reported_together(official, tmp_path):
    def edit(sd):
        sd["blocks.0.ffn.0.weight"] = torch.zeros(7, 64)
        sd["blocks.0.extra.weight"] = torch.zeros(1)

    broken = _edit_dit(official, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        WanPipeline.from_pretrained(broken, device="cpu")
    text = str(err.value)
    assert "blocks.0.ffn.0.weight: expected (128, 64), found (7, 64)" in text
    assert "unexpected key(s): blocks.0.extra.weight" in text


def test_missing_shard_is_named(source, tmp_path):
    sharded = write_official(source, tmp_path / "sharded", shards=2)
    (sharded / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard 'diffusion_pytorch_model-00002-of-00002\.safetensors'"):
        WanPipeline.from_pretrained(sharded, device="cpu")


def test_bad_config_is_named(official, tmp_path):
    broken = shutil.copytree(official, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    del config["num_layers"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: config has no 'num_layers'"):
        WanPipeline.from_pretrained(broken, device="cpu")


def test_task_must_match_the_weights(official):
    with pytest.raises(CheckpointError, match=r"is not the t2v-1\.3B architecture"):
        WanPipeline.from_pretrained(official, task="t2v-1.3B", device="cpu")
