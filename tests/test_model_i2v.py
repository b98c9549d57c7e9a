"""DiT in image-to-video (I2V) and first-last-frame-to-video (FLF2V) mode.

Parity with diffusers' `WanTransformer3DModel` (image_dim, added_kv_proj_dim and, for FLF2V,
pos_embed_seq_len set) on the same random weights converted through `wan.dit_keys`; key names; the
presets; meta-device parameter counts of the 14B models.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wan.configs import (
    FLF2V_IMAGE_TOKENS,
    FLF2V_NEGATIVE_PROMPT,
    I2V_NEGATIVE_PROMPT,
    DiTConfig,
    get_preset,
)
from wan.dit_keys import (
    diffusers_transformer_config,
    dit_state_dict_from_diffusers,
    dit_state_dict_to_diffusers,
)
from wan.model import WanModel

TOL = 1e-4  # max abs difference allowed against diffusers in float32
CLIP_TOKENS = 257  # tokens per image of the real CLIP (1 CLS + 16 x 16 patches)

TINY_I2V = get_preset("tiny-i2v").dit
TINY_FLF2V = get_preset("tiny-flf2v").dit
# The tiny architecture with the official FLF2V position-embedding length (2 x 257).
TINY_FLF2V_514 = dataclasses.replace(TINY_FLF2V, image_tokens=FLF2V_IMAGE_TOKENS)


def _model(cfg: DiTConfig, seed: int) -> WanModel:
    """Our DiT with PyTorch's default init for matrices and random norms, biases, modulations and emb_pos."""
    torch.manual_seed(seed)
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "img_emb.emb_pos":
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1 or name.endswith("modulation"):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model


def _twin(cfg: DiTConfig, ours: WanModel):
    """diffusers' transformer with the same weights (strict load: every key converts)."""
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(**diffusers_transformer_config(cfg))
    ref.load_state_dict(dit_state_dict_to_diffusers(ours.state_dict()), strict=True)
    return ref.eval()


def _inputs(cfg: DiTConfig, batch: int, grid: tuple[int, int, int], seed: int):
    """Latents [B, in_dim, F, H, W] and zero-padded text features [B, text_len, text_dim]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_dim, *grid, generator=g)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    for i in range(batch):
        text[i, 7 + 5 * i :] = 0  # zero padding, attended to (no mask) as in the reference
    return x, text, g


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("grid", [(3, 4, 6), (5, 6, 10)])
def test_i2v_dit_matches_diffusers(grid):
    model = _model(TINY_I2V, 10)
    ref = _twin(TINY_I2V, model)
    x, text, g = _inputs(TINY_I2V, 2, grid, 11)
    clip = torch.randn(2, CLIP_TOKENS, TINY_I2V.image_dim, generator=g)
    diffs = []
    for t in ([999, 999], [750, 3], [0, 500]):
        t = torch.tensor(t)
        with torch.no_grad():
            ours = model(x, t, text, clip)
            theirs = ref(x, t, text, encoder_hidden_states_image=clip, return_dict=False)[0]
        diffs.append(_max_diff(ours, theirs))
    print(f"i2v parity, grid {grid}: max abs diff {max(diffs):.3e}")
    assert max(diffs) <= TOL


def test_i2v_image_features_matter_and_broadcast():
    """The image branch is live (other features, other output); one feature set serves a whole batch."""
    model = _model(TINY_I2V, 20)
    x, text, g = _inputs(TINY_I2V, 2, (3, 4, 4), 21)
    clip = torch.randn(1, CLIP_TOKENS, TINY_I2V.image_dim, generator=g)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        shared = model(x, t, text, clip)
        repeated = model(x, t, text, clip.expand(2, -1, -1))
        other = model(x, t, text, torch.randn(clip.shape, generator=g))
    assert torch.equal(shared, repeated)
    assert _max_diff(shared, other) > 1e-3


@pytest.mark.parametrize("cfg", [TINY_FLF2V, TINY_FLF2V_514], ids=["tiny-flf2v", "pos514"])
def test_flf2v_dit_matches_diffusers(cfg):
    model = _model(cfg, 30)
    ref = _twin(cfg, model)
    assert ref.condition_embedder.image_embedder.pos_embed.shape == (1, cfg.image_tokens, cfg.image_dim)
    x, text, g = _inputs(cfg, 2, (3, 4, 6), 31)
    per_frame = cfg.image_tokens // 2
    # diffusers (like the official code) takes the frames batched: [2B, Lp/2, C], (first, last) per sample
    frames = torch.randn(2 * 2, per_frame, cfg.image_dim, generator=g)
    both = frames.reshape(2, cfg.image_tokens, cfg.image_dim)  # our documented form: [B, Lp, C]
    diffs = []
    for t in ([999, 999], [640, 17]):
        t = torch.tensor(t)
        with torch.no_grad():
            theirs = ref(x, t, text, encoder_hidden_states_image=frames, return_dict=False)[0]
            ours = model(x, t, text, both)
            ours_frames = model(x, t, text, frames)
        assert torch.equal(ours, ours_frames)
        diffs.append(_max_diff(ours, theirs))
    print(f"flf2v parity, {cfg.image_tokens} image tokens: max abs diff {max(diffs):.3e}")
    assert max(diffs) <= TOL


def test_flf2v_position_embedding_is_used():
    model = _model(TINY_FLF2V, 40)
    x, text, g = _inputs(TINY_FLF2V, 1, (3, 4, 4), 41)
    clip = torch.randn(1, TINY_FLF2V.image_tokens, TINY_FLF2V.image_dim, generator=g)
    t = torch.tensor([300])
    with torch.no_grad():
        before = model(x, t, text, clip)
        model.img_emb.emb_pos.zero_()
        after = model(x, t, text, clip)
    assert _max_diff(before, after) > 1e-3


def test_image_feature_errors():
    i2v, flf2v = _model(TINY_I2V, 50), _model(TINY_FLF2V, 51)
    x, text, _ = _inputs(TINY_I2V, 1, (1, 2, 2), 52)
    t = torch.tensor([10])
    with pytest.raises(ValueError, match="needs CLIP image features"):
        i2v(x, t, text)
    with pytest.raises(ValueError, match="padded to 512"):
        i2v(x, t, text[:, :100], torch.zeros(1, CLIP_TOKENS, 32))
    with pytest.raises(ValueError, match=r"\[B, 10, 32\] or \[2B, 5, 32\]"):
        flf2v(x, t, text, torch.zeros(1, 5, 32))  # one frame only
    with pytest.raises(ValueError, match="image feature sets"):
        i2v(x, t, text, torch.zeros(3, CLIP_TOKENS, 32))
    with pytest.raises(ValueError, match="text-to-video"):
        WanModel(get_preset("tiny-t2v").dit)(torch.zeros(1, 16, 1, 2, 2), t, text, torch.zeros(1, 5, 32))


def test_flf2v_config_rules():
    assert dataclasses.replace(TINY_I2V, model_type="flf2v").image_tokens == FLF2V_IMAGE_TOKENS
    with pytest.raises(ValueError, match="is for flf2v"):
        dataclasses.replace(TINY_I2V, image_tokens=10)
    with pytest.raises(ValueError, match="needs image_dim"):
        DiTConfig(model_type="flf2v")
    with pytest.raises(ValueError, match="even"):
        dataclasses.replace(TINY_FLF2V, image_tokens=9)


def test_image_key_names_and_conversion():
    sd = WanModel(TINY_FLF2V).state_dict()
    assert sd["img_emb.emb_pos"].shape == (1, 10, 32)
    for key in [
        "img_emb.proj.0.weight",
        "img_emb.proj.1.bias",
        "img_emb.proj.3.weight",
        "img_emb.proj.4.bias",
    ]:
        assert key in sd
    block = [k for k in sd if k.startswith("blocks.0.")]
    assert len(block) == 32
    for key in ["k_img.weight", "k_img.bias", "v_img.weight", "v_img.bias", "norm_k_img.weight"]:
        assert f"blocks.0.cross_attn.{key}" in sd
    converted = dit_state_dict_to_diffusers(sd)
    assert converted["condition_embedder.image_embedder.pos_embed"].shape == (1, 10, 32)
    assert "blocks.1.attn2.norm_added_k.weight" in converted
    assert dit_state_dict_from_diffusers(converted).keys() == sd.keys()
    assert "img_emb.emb_pos" not in WanModel(TINY_I2V).state_dict()
    kwargs = diffusers_transformer_config(TINY_FLF2V)
    assert (kwargs["image_dim"], kwargs["added_kv_proj_dim"], kwargs["pos_embed_seq_len"]) == (32, 64, 10)
    assert diffusers_transformer_config(TINY_I2V)["pos_embed_seq_len"] is None


def test_flf2v_presets():
    i2v, flf = get_preset("i2v-14B-720P"), get_preset("flf2v-14B")
    assert flf.task == "flf2v" and flf.num_images == 2 and i2v.num_images == 1
    assert get_preset("t2v-14B").num_images == 0
    assert flf.dit == dataclasses.replace(i2v.dit, model_type="flf2v", image_tokens=514)
    s = flf.sampling
    assert (s.steps, s.shift, s.guide_scale, s.frame_num, s.size) == (50, 16.0, 5.0, 81, (1280, 720))
    assert s.negative_prompt == FLF2V_NEGATIVE_PROMPT == "镜头切换，" + I2V_NEGATIVE_PROMPT
    assert s.negative_prompt.startswith("镜头切换，镜头晃动，色调艳丽")
    assert set(flf.sizes) == {(720, 1280), (1280, 720), (480, 832), (832, 480)}
    tiny = get_preset("tiny-flf2v")
    assert tiny.task == "flf2v" and tiny.tiny
    assert tiny.dit == dataclasses.replace(get_preset("tiny-i2v").dit, model_type="flf2v", image_tokens=10)
    assert tiny.sampling.negative_prompt == FLF2V_NEGATIVE_PROMPT


# T2V-14B (14,288,491,584) + 40 blocks x (k_img, v_img, norm_k_img: 52,444,160) + 20 more patch input
# channels (409,600) + img_emb (8,211,200); FLF2V adds emb_pos (514 x 1280 = 657,920).
I2V_14B_PARAMS = 16_394_878_784


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("i2v-14B-480P", I2V_14B_PARAMS),
        ("i2v-14B-720P", I2V_14B_PARAMS),
        ("flf2v-14B", I2V_14B_PARAMS + 514 * 1280),
    ],
)
def test_14b_image_parameter_counts_on_meta(name, params):
    with torch.device("meta"):
        model = WanModel(get_preset(name).dit)
    assert sum(p.numel() for p in model.parameters()) == params
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert block == 403_838_464  # facts sheet: 403.84 M per I2V block
    if name.startswith("flf2v"):
        assert model.img_emb.emb_pos.shape == (1, 514, 1280)
