"""CLIP image encoder: parity with transformers' CLIPVisionModel, official open-clip layout, loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from wan.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    WanImageEncoder,
    clip_config_from_official,
    clip_state_dict_from_official,
    clip_state_dict_to_official,
    clip_vit_h14_config,
    tiny_clip_config,
)
from wan.weights import CheckpointError

HEADS = 4


@pytest.fixture(scope="module")
def config() -> CLIPVisionConfig:
    return tiny_clip_config(hidden_size=32, layers=3, heads=HEADS, image_size=28, patch_size=14)


@pytest.fixture(scope="module")
def encoder(config) -> WanImageEncoder:
    return WanImageEncoder.from_config(config, seed=0)


@pytest.fixture(scope="module")
def reference(config) -> CLIPVisionModel:
    """transformers' model with the same weights as `encoder` (all 3 layers)."""
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval()


@pytest.fixture(scope="module")
def with_projection(config) -> CLIPVisionModelWithProjection:
    """A CLIPVisionModelWithProjection (the diffusers `image_encoder` class) with its own random weights."""
    torch.manual_seed(1)
    return CLIPVisionModelWithProjection(config).eval()


def _images() -> list[torch.Tensor]:
    """Two images in [-1, 1] of different sizes and aspect ratios (one smaller than 28 px, one larger)."""
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, 40, 64, generator=g) * 2 - 1, torch.rand(3, 23, 17, generator=g) * 2 - 1]


def _preprocess_independently(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] in [-1, 1] -> [1, 3, size, size]: bicubic squash, to [0, 1], OpenAI CLIP normalisation."""
    x = F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _penultimate(
    model: CLIPVisionModel | CLIPVisionModelWithProjection, pixels: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-2]


# ---------------------------------------------------------------------------------------------------
# Parity with transformers


def test_encode_matches_transformers_penultimate_hidden_states(encoder, reference, config):
    images = _images()
    pixels = torch.cat([_preprocess_independently(x, 28) for x in images])
    torch.testing.assert_close(encoder.preprocess(images), pixels, rtol=0, atol=1e-6)
    ref = _penultimate(reference, pixels)
    assert ref.shape == (2, 5, 32)
    feats = encoder.encode(images)
    assert feats.shape == (2, 5, 32) and feats.dtype == torch.float32
    assert not feats.requires_grad
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(encoder.encode_pixels(pixels), ref, rtol=0, atol=1e-5)
    # Not the last layer and not post-LayerNormed: differs from the model's final output.
    with torch.no_grad():
        last = reference(pixel_values=pixels).last_hidden_state
    assert (feats - last).abs().max() > 1e-2


def test_batch_single_and_list_inputs_agree(encoder):
    g = torch.Generator().manual_seed(5)
    batch = torch.rand(3, 3, 36, 50, generator=g) * 2 - 1
    feats = encoder(batch)
    assert feats.shape == (3, 5, 32)
    torch.testing.assert_close(encoder.encode(list(batch)), feats, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.encode(batch[1]), feats[1:2], rtol=0, atol=1e-6)
    # An image already at 28 x 28 (bicubic at scale 1 is the identity) and the range boundaries.
    square = torch.linspace(-1, 1, 3 * 28 * 28).view(3, 28, 28)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(encoder.preprocess(square)[0], (square * 0.5 + 0.5 - mean) / std)


def test_properties_seed_and_truncation(encoder, config):
    assert (encoder.dim, encoder.image_size, encoder.num_tokens) == (32, 28, 5)
    assert encoder.num_layers == 3 and len(encoder.model.encoder.layers) == 2  # the last layer is dropped
    assert config.num_hidden_layers == 3  # the caller's config is not modified
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder.model.config._attn_implementation == "sdpa"
    state = torch.random.get_rng_state()
    again = WanImageEncoder.from_config(config, seed=0)
    other = WanImageEncoder.from_config(config, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    w = encoder.model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(again.model.encoder.layers[0].self_attn.q_proj.weight, w)
    assert not torch.equal(other.model.encoder.layers[0].self_attn.q_proj.weight, w)


def test_bf16_module_returns_float32(encoder, config):
    low = WanImageEncoder.from_config(config, seed=0, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    images = _images()
    feats = low.encode(images)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, encoder.encode(images), rtol=0.05, atol=0.1)


# ---------------------------------------------------------------------------------------------------
# Official open-clip layout


def _official_from_hf(model: CLIPVisionModelWithProjection) -> dict[str, torch.Tensor]:
    """The open-clip `visual.*` state dict of `model`, written out by hand (fused qkv, [1, 1, D] cls, ...)."""
    vm = model.vision_model
    emb = vm.embeddings
    sd = {
        "visual.patch_embedding.weight": emb.patch_embedding.weight,
        "visual.cls_embedding": emb.class_embedding.view(1, 1, -1),
        "visual.pos_embedding": emb.position_embedding.weight[None],
        "visual.pre_norm.weight": vm.pre_layrnorm.weight,
        "visual.pre_norm.bias": vm.pre_layrnorm.bias,
        "visual.post_norm.weight": vm.post_layernorm.weight,
        "visual.post_norm.bias": vm.post_layernorm.bias,
        "visual.head": model.visual_projection.weight.t(),
    }
    for i, layer in enumerate(vm.encoder.layers):
        att = layer.self_attn
        p = f"visual.transformer.{i}"
        for kind in ("weight", "bias"):
            qkv = [getattr(att, n).get_parameter(kind) for n in ("q_proj", "k_proj", "v_proj")]
            sd[f"{p}.attn.to_qkv.{kind}"] = torch.cat(qkv)
            sd[f"{p}.attn.proj.{kind}"] = att.out_proj.get_parameter(kind)
            sd[f"{p}.norm1.{kind}"] = layer.layer_norm1.get_parameter(kind)
            sd[f"{p}.norm2.{kind}"] = layer.layer_norm2.get_parameter(kind)
            sd[f"{p}.mlp.0.{kind}"] = layer.mlp.fc1.get_parameter(kind)
            sd[f"{p}.mlp.2.{kind}"] = layer.mlp.fc2.get_parameter(kind)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _write_official(model: CLIPVisionModelWithProjection, path: Path, edit=None) -> Path:
    """A whole-CLIP-style file: the visual tower plus text-tower junk and `log_scale`, as published."""
    sd = _official_from_hf(model)
    sd["textual.token_embedding.weight"] = torch.randn(50, 16)
    sd["textual.blocks.0.attn.q.weight"] = torch.randn(16, 16)
    sd["textual.head.0.weight"] = torch.randn(24, 16)
    sd["log_scale"] = torch.tensor(4.6052)
    if edit is not None:
        edit(sd)
    torch.save(sd, path)
    return path


def _open_clip_penultimate(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """The official VisionTransformer forward with `use_31_block=True`, straight from official-layout tensors.

    pixels [B, 3, S, S] -> [B, N, D]: patch conv (no bias), CLS, + pos, pre_norm, all blocks but the last.
    """
    x = F.conv2d(
        pixels, sd["visual.patch_embedding.weight"], stride=sd["visual.patch_embedding.weight"].shape[-1]
    )
    x = x.flatten(2).transpose(1, 2)
    b, _, d = x.shape
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + sd["visual.pos_embedding"]
    x = F.layer_norm(x, (d,), sd["visual.pre_norm.weight"], sd["visual.pre_norm.bias"], eps=1e-5)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("visual.transformer.")})
    for i in layers[:-1]:

        def w(name: str, i: int = i) -> tuple[torch.Tensor, torch.Tensor]:
            return sd[f"visual.transformer.{i}.{name}.weight"], sd[f"visual.transformer.{i}.{name}.bias"]

        h = F.layer_norm(x, (d,), *w("norm1"), eps=1e-5)
        q, k, v = F.linear(h, *w("attn.to_qkv")).view(b, -1, 3, heads, d // heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(a.transpose(1, 2).reshape(b, -1, d), *w("attn.proj"))
        h = F.layer_norm(x, (d,), *w("norm2"), eps=1e-5)
        x = x + F.linear(F.gelu(F.linear(h, *w("mlp.0"))), *w("mlp.2"))
    return x


def test_key_mapping_matches_hand_written_official_layout_and_round_trips(with_projection):
    hf_sd = with_projection.state_dict()
    official = _official_from_hf(with_projection)
    mapped = clip_state_dict_to_official(hf_sd)
    assert set(mapped) == set(official)
    assert len(official) == 8 + 3 * 12
    for k, v in official.items():
        assert torch.equal(mapped[k], v), k
    back = clip_state_dict_from_official(official)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k
    # Junk of the whole-CLIP file is dropped; unknown keys pass through for the strict check to report.
    junk = {"textual.x.weight": torch.zeros(1), "log_scale": torch.zeros(()), "visual.extra": torch.zeros(1)}
    assert set(clip_state_dict_from_official(junk)) == {"visual.extra"}


def test_from_official_matches_transformers_and_open_clip_forward(with_projection, tmp_path):
    pth = _write_official(
        with_projection, tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    )
    loaded = WanImageEncoder.from_official(pth, num_heads=HEADS)
    assert loaded.dtype == torch.float32 and loaded.num_layers == 3
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    images = _images()
    pixels = torch.cat([_preprocess_independently(x, 28) for x in images])
    feats = loaded.encode(images)
    torch.testing.assert_close(feats, _penultimate(with_projection, pixels), rtol=0, atol=1e-5)
    official = _official_from_hf(with_projection)
    torch.testing.assert_close(feats, _open_clip_penultimate(official, pixels, HEADS), rtol=0, atol=1e-5)
    # Round trip: the loaded weights (+ the dropped last layer and head) map back to the file exactly.
    raw = torch.load(pth, weights_only=True)
    visual = {k: v for k, v in raw.items() if k.startswith("visual.")}
    assert set(clip_state_dict_to_official(clip_state_dict_from_official(raw))) == set(visual)
    for k, v in clip_state_dict_to_official(clip_state_dict_from_official(raw)).items():
        assert torch.equal(v, visual[k]), k
    kept = clip_state_dict_to_official({f"vision_model.{k}": v for k, v in loaded.model.state_dict().items()})
    assert set(visual) - set(kept) == {"visual.head"} | {
        k for k in visual if k.startswith("visual.transformer.2.")
    }
    for k, v in kept.items():
        assert torch.equal(v, visual[k]), k
    # A bare visual-tower dict (no `visual.` prefix) and an explicit dtype.
    bare = tmp_path / "bare.pth"
    torch.save({k.removeprefix("visual."): v for k, v in visual.items()}, bare)
    as_bf16 = WanImageEncoder.from_official(bare, dtype=torch.bfloat16, num_heads=HEADS)
    assert as_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(as_bf16.encode(images), feats, rtol=0.05, atol=0.1)


def test_config_from_official_tiny_and_full_size(with_projection, config):
    inferred = clip_config_from_official(_official_from_hf(with_projection), num_heads=HEADS)
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "projection_dim",
    ):
        assert getattr(inferred, field) == getattr(config, field), field
    assert inferred.hidden_act == "gelu" and inferred.layer_norm_eps == 1e-5
    with pytest.raises(CheckpointError, match="num_heads"):  # 32 is not a multiple of 80
        clip_config_from_official(_official_from_hf(with_projection))

    # ViT-H/14 from meta tensors of the real shapes: 16 heads of 80 inferred by default.
    def meta(*shape):
        return torch.empty(shape, device="meta")

    real = {
        "visual.patch_embedding.weight": meta(1280, 3, 14, 14),
        "visual.pos_embedding": meta(1, 257, 1280),
        "visual.head": meta(1280, 1024),
    }
    for i in range(32):
        real[f"visual.transformer.{i}.mlp.0.weight"] = meta(5120, 1280)
    vit_h = clip_config_from_official(real)
    expected = clip_vit_h14_config()
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
    ):
        assert getattr(vit_h, field) == getattr(expected, field), field
    assert (vit_h.patch_size, vit_h.projection_dim) == (14, 1024)


def test_full_size_vit_h14_parameter_count():
    """ViT-H/14 on the meta device: 632.08 M parameters in the official visual tower (head included)."""
    with torch.device("meta"):
        full = CLIPVisionModelWithProjection(clip_vit_h14_config())
    official = clip_state_dict_to_official(full.state_dict())
    assert len(official) == 8 + 32 * 12
    assert official["visual.transformer.0.attn.to_qkv.weight"].shape == (3840, 1280)
    assert official["visual.head"].shape == (1280, 1024)
    n_official = sum(v.numel() for v in official.values())
    assert n_official == sum(p.numel() for p in full.parameters()) == 632_076_800
    assert sum(p.numel() for p in full.vision_model.parameters()) == 630_766_080  # without the head
    encoder = WanImageEncoder(full.vision_model)  # what runs: 31 blocks, no head
    assert (encoder.num_tokens, encoder.dim, encoder.num_layers) == (257, 1280, 32)
    assert sum(p.numel() for p in encoder.parameters()) == 611_088_640


def test_from_official_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth"):
        WanImageEncoder.from_official(tmp_path / "nope.pth", num_heads=HEADS)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda sd: sd.pop("visual.transformer.1.mlp.2.weight"), "visual.transformer.1.mlp.2.weight"),
        (lambda sd: sd.pop("visual.transformer.2.norm1.bias"), "visual.transformer.2.norm1.bias"),
        (lambda sd: sd.pop("visual.head"), "visual.head"),
        (
            lambda sd: sd.__setitem__("visual.transformer.0.attn.to_qkv.weight", torch.zeros(90, 32)),
            "visual.transformer.0.attn.to_qkv.weight",
        ),
        (lambda sd: sd.__setitem__("visual.pre_norm.bias", torch.zeros(33)), "visual.pre_norm.bias"),
        (
            lambda sd: sd.__setitem__("visual.patch_embedding.bias", torch.zeros(32)),
            "visual.patch_embedding.bias",
        ),
        (
            lambda sd: sd.__setitem__("visual.transformer.0.extra.weight", torch.zeros(3)),
            "visual.transformer.0.extra",
        ),
        (lambda sd: sd.__setitem__("stray_key", torch.zeros(3)), "stray_key"),
        (lambda sd: sd.pop("visual.patch_embedding.weight"), "visual.patch_embedding.weight"),
        (lambda sd: sd.pop("visual.transformer.0.mlp.0.weight"), "visual.transformer.0.mlp.0.weight"),
    ],
    ids=[
        "missing",
        "missing-unused-last-layer",
        "missing-head",
        "wrong-shape-qkv",
        "wrong-shape-norm",
        "unexpected-conv-bias",
        "unexpected",
        "unexpected-top-level",
        "missing-config-key",
        "missing-mlp-config-key",
    ],
)
def test_from_official_bad_checkpoint_names_file_and_key(with_projection, tmp_path, edit, key):
    pth = _write_official(with_projection, tmp_path / "bad_clip.pth", edit=edit)
    with pytest.raises(CheckpointError) as info:
        WanImageEncoder.from_official(pth, num_heads=HEADS)
    assert "bad_clip.pth" in str(info.value) and key in str(info.value)


# ---------------------------------------------------------------------------------------------------
# diffusers layout


def test_from_diffusers_with_projection_and_plain_vision_model(with_projection, tmp_path):
    folder = tmp_path / "image_encoder"
    with_projection.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        "CLIPVisionModelWithProjection"
    ]
    loaded = WanImageEncoder.from_diffusers(folder)
    assert loaded.dtype == torch.float32 and loaded.num_layers == 3
    images = _images()
    pixels = torch.cat([_preprocess_independently(x, 28) for x in images])
    ref = _penultimate(with_projection, pixels)
    torch.testing.assert_close(loaded.encode(images), ref, rtol=0, atol=1e-5)
    # A plain CLIPVisionModel save (no projection) works too.
    plain = tmp_path / "plain"
    with_projection.vision_model.save_pretrained(plain)
    torch.testing.assert_close(WanImageEncoder.from_diffusers(plain).encode(images), ref, rtol=0, atol=1e-5)
    assert WanImageEncoder.from_diffusers(folder, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_from_diffusers_errors(with_projection, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        WanImageEncoder.from_diffusers(tmp_path / "empty")
    folder = tmp_path / "image_encoder"
    with_projection.save_pretrained(folder)
    sd = load_file(str(folder / "model.safetensors"))
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    save_file({k: v for k, v in sd.items() if k != key}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:  # transformers alone would re-initialise it silently
        WanImageEncoder.from_diffusers(folder)
    assert "image_encoder" in str(info.value) and key in str(info.value)
    save_file({**sd, key: torch.zeros(3, 3)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="image_encoder"):
        WanImageEncoder.from_diffusers(folder)


# ---------------------------------------------------------------------------------------------------
# Bad image input


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8), r"float images in \[-1, 1\].*uint8"),
        (torch.rand(1, 3, 32, 32) * 255, r"\[-1, 1\]"),
        (torch.rand(1, 3, 32, 32) - 1.5, r"\[-1, 1\]"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.zeros(1, 4, 32, 32), r"\[B, 3, H, W\]"),
        (torch.zeros(32, 32), r"\[B, 3, H, W\]"),
        (torch.zeros(1, 1, 3, 32, 32), r"\[B, 3, H, W\]"),
        (torch.zeros(0, 3, 32, 32), r"\[B, 3, H, W\]"),
        ([torch.zeros(1, 3, 32, 32)], r"image 0: expected a \[3, H, W\]"),
        ([torch.zeros(3, 8, 8), "cat.png"], r"image 1: expected a \[3, H, W\]"),
        ([], "no images"),
        ("cat.png", "image tensor"),
    ],
    ids=[
        "uint8",
        "0-255-float",
        "below-range",
        "nan",
        "4-channels",
        "2d",
        "5d",
        "empty-batch",
        "list-4d",
        "list-str",
        "empty-list",
        "str",
    ],
)
def test_bad_images_raise_value_error(encoder, images, match):
    with pytest.raises(ValueError, match=match):
        encoder.encode(images)


def test_encode_pixels_checks_shape(encoder):
    with pytest.raises(ValueError, match=r"\[B, 3, 28, 28\]"):
        encoder.encode_pixels(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        encoder.encode_pixels(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
