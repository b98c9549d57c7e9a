"""Checkpoint layouts written by the tests (official single file, official sharded, diffusers) all
load and generate identical videos, for text-, image- and first-last-frame-to-video; broken checkpoints
fail with errors that name file and key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from twins import full_clip_model, round_text_encoder_to_bf16, write_diffusers, write_official

from wan.checkpoints import (
    CLIP_FILE,
    DIT_WEIGHTS,
    VAE_FILE,
    CheckpointLayout,
    detect_layout,
    dit_config_from,
    load_checkpoint,
    match_preset,
)
from wan.configs import get_preset
from wan.dit_keys import (
    diffusers_transformer_config,
    dit_state_dict_from_diffusers,
    dit_state_dict_to_diffusers,
)
from wan.image_encoder import WanImageEncoder, clip_state_dict_to_official, tiny_clip_config
from wan.model import WanModel
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


# ------------------------------------------------------------------------------- image-to-video layouts

IMAGE_SMALL = dict(size=(64, 48), frame_num=5, sampling_steps=2, seed=4, progress=False)


def _image(seed: int, width: int = 64, height: int = 48) -> torch.Tensor:
    """A random picture [3, H, W] in [-1, 1]."""
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _images(preset: str) -> dict[str, torch.Tensor]:
    images = {"image": _image(1)}
    if preset == "tiny-flf2v":
        images["last_image"] = _image(2)
    return images


@pytest.fixture(scope="module", params=["tiny-i2v", "tiny-flf2v"])
def image_source(request) -> WanPipeline:
    return round_text_encoder_to_bf16(WanPipeline.from_config(request.param, seed=3, device="cpu"))


@pytest.fixture(scope="module")
def i2v_official(tmp_path_factory) -> Path:
    pipe = round_text_encoder_to_bf16(WanPipeline.from_config("tiny-i2v", seed=3, device="cpu"))
    return write_official(pipe, tmp_path_factory.mktemp("i2v") / "Wan2.1-I2V-tiny")


@pytest.mark.slow
def test_image_to_video_layouts_load_and_agree(image_source, tmp_path):
    """Official single file, official shards and diffusers, for I2V and FLF2V: the same videos, bit-exact."""
    name = image_source.preset.name
    roots = [
        write_official(image_source, tmp_path / "official"),
        write_official(image_source, tmp_path / "sharded", shards=3),
        write_diffusers(image_source, tmp_path / "diffusers"),
    ]
    assert (roots[0] / CLIP_FILE).is_file() and (roots[2] / "image_encoder" / "config.json").is_file()
    assert [detect_layout(r).image_encoder for r in roots] == [
        roots[0] / CLIP_FILE,
        roots[1] / CLIP_FILE,
        roots[2] / "image_encoder",
    ]
    images = _images(name)
    expected = image_source.generate("a fox", **images, **IMAGE_SMALL)
    assert expected.shape == (3, 5, 48, 64)
    for root in roots:
        pipe = WanPipeline.from_pretrained(root, device="cpu")
        assert pipe.preset.name == name, root.name
        assert pipe.dit.cfg == image_source.dit.cfg, root.name
        assert pipe.image_encoder is not None and pipe.image_encoder.dtype == torch.float32
        assert pipe.image_encoder.model.config.num_attention_heads == 4  # the tiny CLIP's, not width / 80
        features = pipe.image_encoder.encode(images["image"])
        assert torch.equal(features, image_source.image_encoder.encode(images["image"])), root.name
        assert torch.equal(pipe.generate("a fox", **images, **IMAGE_SMALL), expected), root.name


def test_official_config_without_model_type_is_read_from_the_weights(image_source, tmp_path):
    root = write_official(image_source, tmp_path / "ckpt")
    config = json.loads((root / "config.json").read_text())
    del config["model_type"]
    (root / "config.json").write_text(json.dumps(config))
    assert detect_layout(root).image_encoder == root / CLIP_FILE  # told by the weight names
    parts = load_checkpoint(root)
    assert parts.preset.name == image_source.preset.name
    assert parts.dit.cfg == image_source.dit.cfg and parts.image_encoder is not None


def test_missing_clip_file_is_listed_with_the_others(i2v_official, tmp_path):
    broken = shutil.copytree(i2v_official, tmp_path / "broken")
    (broken / CLIP_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"missing: {re.escape(CLIP_FILE)}$"):
        WanPipeline.from_pretrained(broken, device="cpu")
    (broken / VAE_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"missing: Wan2\.1_VAE\.pth, {re.escape(CLIP_FILE)}$"):
        WanPipeline.from_pretrained(broken, device="cpu")


def test_missing_diffusers_image_encoder_is_named(tmp_path):
    pipe = round_text_encoder_to_bf16(WanPipeline.from_config("tiny-i2v", seed=3, device="cpu"))
    root = write_diffusers(pipe, tmp_path / "diffusers")
    shutil.rmtree(root / "image_encoder")
    with pytest.raises(CheckpointError, match=r"\(diffusers layout\); missing: image_encoder/$"):
        WanPipeline.from_pretrained(root, device="cpu")


def test_clip_that_does_not_fit_the_dit_is_refused(i2v_official, tmp_path):
    broken = shutil.copytree(i2v_official, tmp_path / "broken")
    narrow = WanImageEncoder.from_config(tiny_clip_config(hidden_size=16, intermediate_size=32))
    torch.save(clip_state_dict_to_official(full_clip_model(narrow).state_dict()), broken / CLIP_FILE)
    with pytest.raises(CheckpointError, match=r"16 wide but the DiT takes 32-wide CLIP features"):
        WanPipeline.from_pretrained(broken, device="cpu")


def test_the_text_to_video_checkpoint_needs_no_clip(official):
    assert detect_layout(official).image_encoder is None
    assert load_checkpoint(official).image_encoder is None


@pytest.mark.parametrize("kind", ["official", "diffusers"])
@pytest.mark.parametrize(
    ("name", "directory"),
    [
        ("i2v-14B-480P", "Wan2.1-I2V-14B-480P"),
        ("i2v-14B-720P", "Wan2.1-I2V-14B-720P"),
        ("flf2v-14B", "Wan2.1-FLF2V-14B-720P"),
        ("t2v-14B", "Wan2.1-T2V-14B"),
    ],
)
def test_full_size_configs_are_inferred_and_matched(name, directory, kind, tmp_path):
    """The published 14B architectures (shapes only, on the meta device) in both layouts: model type,
    image width and FLF2V's 514 image tokens are read back and the preset found by the directory name."""
    cfg = get_preset(name).dit
    with torch.device("meta"):
        sd = WanModel(cfg).state_dict()
    root = tmp_path / (directory + ("-Diffusers" if kind == "diffusers" else ""))
    root.mkdir()
    if kind == "official":
        config = {k: getattr(cfg, k) for k in ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers")}
        config |= {"model_type": cfg.model_type, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "eps": cfg.eps}
    else:
        config = diffusers_transformer_config(cfg)
        sd = dit_state_dict_from_diffusers(dit_state_dict_to_diffusers(sd))
    (root / "config.json").write_text(json.dumps(config))
    layout = CheckpointLayout(kind, root, root / "config.json", root / DIT_WEIGHTS, *[root] * 3)
    inferred = dit_config_from(layout, sd)
    assert inferred == cfg
    assert inferred.image_tokens == (514 if name.startswith("flf2v") else None)
    assert match_preset(inferred, None, str(root)).name == name
