"""VAE: official key names and sizes, key conversion, shapes, streaming decode, parity with diffusers."""

from __future__ import annotations

import pytest
import torch

from wan.vae import (
    OFFICIAL_LATENTS_MEAN,
    OFFICIAL_LATENTS_STD,
    WanVAE,
    vae_config_from_state_dict,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)

TINY = {"dim": 8}
FULL_CONFIG = {
    "dim": 96,
    "z_dim": 16,
    "dim_mult": (1, 2, 4, 4),
    "num_res_blocks": 2,
    "temporal_downsample": (False, True, True),
}


def _randomise(vae: WanVAE, seed: int) -> WanVAE:
    """Default init for convolutions; random RMS gammas and a non-zero attention `proj` (zero-initialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("proj.weight"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return vae.eval()


def _tiny(seed: int = 0, **kwargs) -> WanVAE:
    torch.manual_seed(seed)
    return _randomise(WanVAE(**{**TINY, **kwargs}), seed + 1)


def _video(b: int, f: int, h: int, w: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(b: int, t: int, h: int, w: int, seed: int = 4) -> torch.Tensor:
    return torch.randn(b, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


def _diffusers_twin(ours: WanVAE, base_dim: int):
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(base_dim=base_dim, z_dim=16).eval()
    ref.load_state_dict(vae_state_dict_to_diffusers(ours.state_dict()), strict=True)
    return ref


def _diffusers_encode(ref, video: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    return (ref.encode(video).latent_dist.mode() - mean) / std


def _diffusers_decode(ref, latents: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    return ref.decode(latents * std + mean).sample


# --- names, sizes, configs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_meta() -> WanVAE:
    with torch.device("meta"):
        return WanVAE()


def test_official_key_names_and_shapes(full_meta):
    sd = full_meta.state_dict()
    expected = {
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.bias": (16,),
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.10.residual.6.weight": (384, 384, 3, 3, 3),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.middle.1.proj.bias": (384,),
        "encoder.middle.2.residual.3.gamma": (384, 1, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.middle.0.residual.2.weight": (384, 384, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.7.time_conv.bias": (768,),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
        "decoder.head.0.gamma": (96, 1, 1, 1),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert {k.split(".")[0] for k in sd} == {"encoder", "conv1", "conv2", "decoder"}
    assert max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")) == 10
    assert max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.upsamples.")) == 14
    assert not any("time_conv" in k for k in sd if k.startswith("decoder.upsamples.11."))
    # The latent statistics are buffers outside the checkpoint.
    assert not any("mean" in k or "std" in k for k in sd)
    assert dict(full_meta.named_buffers()).keys() == {"latents_mean", "latents_std"}
    torch.testing.assert_close(WanVAE(**TINY).latents_mean, torch.tensor(OFFICIAL_LATENTS_MEAN))


def test_full_size_parameter_count(full_meta):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(full_meta) - 126.9e6) < 0.1e6
    assert abs(count(full_meta.encoder) - 53.6e6) < 0.1e6
    assert abs(count(full_meta.decoder) - 73.3e6) < 0.1e6
    assert full_meta.stride == (4, 8, 8) and full_meta.z_dim == 16


def test_config_from_state_dict(full_meta):
    sd = full_meta.state_dict()
    assert vae_config_from_state_dict(sd) == FULL_CONFIG
    assert vae_config_from_state_dict(vae_state_dict_to_diffusers(sd)) == FULL_CONFIG
    tiny = WanVAE(dim=8, num_res_blocks=1, dim_mult=(1, 2, 2), temporal_downsample=(True, False))
    assert vae_config_from_state_dict(tiny.state_dict()) == {
        "dim": 8,
        "z_dim": 16,
        "dim_mult": (1, 2, 2),
        "num_res_blocks": 1,
        "temporal_downsample": (True, False),
    }
    assert tiny.stride == (2, 4, 4)


@pytest.mark.parametrize("base_dim", [96, 8])
def test_key_conversion_matches_diffusers_module(base_dim):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        ours, ref = WanVAE(dim=base_dim), AutoencoderKLWan(base_dim=base_dim)
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    converted = vae_state_dict_to_diffusers(sd)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ref_sd.items()}
    for diffusers_key, official_key in [
        ("decoder.up_blocks.1.resnets.0.conv_shortcut.weight", "decoder.upsamples.4.shortcut.weight"),
        ("decoder.up_blocks.1.upsamplers.0.time_conv.weight", "decoder.upsamples.7.time_conv.weight"),
        ("decoder.up_blocks.3.resnets.2.norm2.gamma", "decoder.upsamples.14.residual.3.gamma"),
        ("encoder.mid_block.attentions.0.to_qkv.weight", "encoder.middle.1.to_qkv.weight"),
        ("decoder.mid_block.resnets.1.conv1.bias", "decoder.middle.2.residual.2.bias"),
        ("quant_conv.weight", "conv1.weight"),
        ("decoder.conv_in.weight", "decoder.conv1.weight"),
    ]:
        assert converted[diffusers_key] is sd[official_key]
    back = vae_state_dict_from_diffusers(converted)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    assert vae_state_dict_from_diffusers(ref_sd).keys() == sd.keys()


def test_key_conversion_other_depth():
    """A different block count per stage converts both ways (the up_blocks index is derived, not fixed)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        ours, ref = WanVAE(dim=8, num_res_blocks=3), AutoencoderKLWan(base_dim=8, num_res_blocks=3)
    assert vae_state_dict_to_diffusers(ours.state_dict()).keys() == ref.state_dict().keys()
    assert vae_state_dict_from_diffusers(ref.state_dict()).keys() == ours.state_dict().keys()


# --- behaviour on a tiny width ----------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "height", "width"), [(1, 16, 24), (5, 40, 56), (9, 40, 56), (7, 32, 32)])
def test_tiny_shapes(frames, height, width):
    vae = _tiny()
    with torch.no_grad():
        z = vae.encode(_video(2, frames, height, width))
        assert z.shape == (2, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
        x = vae.decode(z)
    assert x.shape == (2, 3, 1 + 4 * (z.shape[2] - 1), height, width)
    assert x.abs().max() <= 1.0


def test_decode_stream_equals_decode():
    vae = _tiny()
    z = _latents(1, 4, 5, 7)
    with torch.no_grad():
        chunks = list(vae.decode_stream(z))
        whole = vae.decode(z)
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    assert all(c.shape == (1, 3, c.shape[2], 40, 56) for c in chunks)
    assert torch.equal(torch.cat(chunks, 2), whole)


def test_causal_prefixes():
    """Encoding a prefix of the video gives a prefix of the latents, and the same for decoding."""
    vae = _tiny()
    video, z = _video(1, 9, 16, 24), _latents(1, 3, 2, 3)
    with torch.no_grad():
        assert torch.allclose(vae.encode(video[:, :, :5]), vae.encode(video)[:, :, :2], atol=1e-6)
        assert torch.allclose(vae.encode(video[:, :, :1]), vae.encode(video)[:, :, :1], atol=1e-6)
        assert torch.allclose(vae.decode(z[:, :, :2]), vae.decode(z)[:, :, :5], atol=1e-6)


def test_tiny_matches_diffusers_batch_of_two():
    vae = _tiny()
    ref = _diffusers_twin(vae, base_dim=8)
    video, z = _video(2, 13, 24, 40), _latents(2, 4, 3, 5)  # 4 chunks: first, second, steady state
    with torch.no_grad():
        assert (vae.encode(video) - _diffusers_encode(ref, video)).abs().max() < 1e-5
        assert (vae.decode(z) - _diffusers_decode(ref, z)).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_from_state_dict(layout):
    vae = _tiny(num_res_blocks=1)
    sd = vae.state_dict() if layout == "official" else vae_state_dict_to_diffusers(vae.state_dict())
    loaded = WanVAE.from_state_dict(sd)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    z = _latents(1, 2, 2, 3)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), vae.decode(z))
    torch.testing.assert_close(loaded.latents_std, torch.tensor(OFFICIAL_LATENTS_STD))


def test_bad_inputs():
    vae = _tiny()
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_video(1, 1, 20, 24))
    with pytest.raises(ValueError, match=r"\[B, 3, F>=1, H, W\]"):
        vae.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 8, 1, 2, 2))
    with pytest.raises(ValueError, match="latents"):
        vae.decode_stream(torch.zeros(1, 16, 0, 2, 2))  # eagerly, not at the first next()


def test_fp32_inside_autocast():
    vae = _tiny()
    video, z = _video(1, 5, 16, 16), _latents(1, 2, 2, 2)
    with torch.no_grad():
        expected = vae.encode(video), vae.decode(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = vae.encode(video.bfloat16()), vae.decode(z.bfloat16())
    assert all(t.dtype == torch.float32 for t in got)
    assert torch.allclose(got[0], vae.encode(video.bfloat16().float()), atol=1e-6)
    assert torch.allclose(got[1], vae.decode(z.bfloat16().float()), atol=1e-6)
    assert got[0].shape == expected[0].shape and got[1].shape == expected[1].shape


# --- full-size parity with diffusers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def full_pair():
    torch.manual_seed(0)
    ours = _randomise(WanVAE(), 1)
    return ours, _diffusers_twin(ours, base_dim=96)


@pytest.mark.slow
def test_full_size_encode_matches_diffusers(full_pair):
    ours, ref = full_pair
    video = _video(1, 9, 64, 96)
    with torch.no_grad():
        z, z_ref = ours.encode(video), _diffusers_encode(ref, video)
    assert z.shape == (1, 16, 3, 8, 12)
    assert z.std() > 0.1
    assert (z - z_ref).abs().max() < 1e-4


@pytest.mark.slow
def test_full_size_decode_matches_diffusers(full_pair):
    ours, ref = full_pair
    z = _latents(1, 3, 8, 12)
    with torch.no_grad():
        x, x_ref = ours.decode(z), _diffusers_decode(ref, z)
    assert x.shape == (1, 3, 9, 64, 96)
    assert (x.abs() < 0.999).float().mean() > 0.5  # mostly unclamped, so the comparison means something
    assert (x - x_ref).abs().max() < 1e-4
