"""DiT: parity with diffusers' WanTransformer3DModel, key names, meta-device parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from twins import randomise_dit

from wan.configs import DiTConfig, get_preset
from wan.dit_keys import (
    diffusers_transformer_config,
    dit_state_dict_from_diffusers,
    dit_state_dict_to_diffusers,
)
from wan.model import WanModel
from wan.rope import rope_split

# diffusers splits image and text context at a hard-coded 512 text tokens, so keep text_len at 512.
TINY = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=24)


def _diffusers_twin(cfg: DiTConfig, ours: WanModel):
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(**diffusers_transformer_config(cfg))
    ref.load_state_dict(dit_state_dict_to_diffusers(ours.state_dict()), strict=True)
    return ref.eval()


@pytest.mark.parametrize("grid", [(5, 6, 10), (3, 4, 6)])
def test_dit_matches_diffusers(grid):
    torch.manual_seed(0)
    model = WanModel(TINY).eval()
    randomise_dit(model, 1)
    ref = _diffusers_twin(TINY, model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, *grid, generator=g)
    context = torch.randn(2, TINY.text_len, TINY.text_dim, generator=g)
    context[:, 9:] = 0  # zero padding, attended to as in the reference
    for t in ([999, 999], [750, 3], [0, 500]):
        t = torch.tensor(t)
        with torch.no_grad():
            ours = model(x, t, context)
            theirs = ref(x, t, context, return_dict=False)[0]
        assert ours.shape == x.shape
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_i2v_dit_matches_diffusers():
    cfg = dataclasses.replace(TINY, model_type="i2v", in_dim=36, image_dim=20)
    model = WanModel(cfg).eval()
    randomise_dit(model, 3)
    ref = _diffusers_twin(cfg, model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 36, 3, 4, 6, generator=g)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    clip = torch.randn(1, 7, 20, generator=g)
    t = torch.tensor([640])
    with torch.no_grad():
        ours = model(x, t, context, clip)
        theirs = ref(x, t, context, encoder_hidden_states_image=clip, return_dict=False)[0]
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_key_conversion_round_trip():
    model = WanModel(dataclasses.replace(TINY, model_type="i2v", in_dim=36, image_dim=20))
    sd = model.state_dict()
    back = dit_state_dict_from_diffusers(dit_state_dict_to_diffusers(sd))
    assert back.keys() == sd.keys()


def test_official_key_names():
    keys = WanModel(TINY).state_dict().keys()
    for key in [
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "text_embedding.2.bias",
        "time_embedding.0.weight",
        "time_embedding.2.weight",
        "time_projection.1.weight",
        "head.modulation",
        "head.head.weight",
        "blocks.0.modulation",
        "blocks.1.self_attn.norm_q.weight",
        "blocks.0.norm3.weight",
        "blocks.0.cross_attn.norm_k.weight",
        "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.bias",
    ]:
        assert key in keys
    assert len([k for k in keys if k.startswith("blocks.0.")]) == 27


def test_rope_split():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(16) == (8, 4, 4)


@pytest.mark.parametrize(
    ("name", "params"),
    [("t2v-1.3B", 1_418_996_800), ("t2v-14B", 14_288_491_520), ("i2v-14B-480P", 16_394_801_216)],
)
def test_full_size_parameter_counts_on_meta(name, params):
    with torch.device("meta"):
        model = WanModel(get_preset(name).dit)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 1e-3, count
