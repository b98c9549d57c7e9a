"""DiT parameter names: diffusers' `WanTransformer3DModel` <-> the official (our) checkpoint keys.

One ordered table of (diffusers, official) name fragments serves both directions. The official
`norm3` (affine, before cross-attention) is diffusers' `norm2`; the parameter-free FFN norm has no key.
FLF2V's image position embedding `img_emb.emb_pos` [1, 514, 1280] is diffusers'
`condition_embedder.image_embedder.pos_embed` (same shape; config `pos_embed_seq_len`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from wan.configs import DiTConfig

__all__ = ["diffusers_transformer_config", "dit_state_dict_from_diffusers", "dit_state_dict_to_diffusers"]

# (diffusers pattern, official pattern); `{b}` stands for the "blocks.<i>." prefix.
_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    ("scale_shift_table", "modulation"),
    ("attn1.to_q.", "self_attn.q."),
    ("attn1.to_k.", "self_attn.k."),
    ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn1.norm_q.", "self_attn.norm_q."),
    ("attn1.norm_k.", "self_attn.norm_k."),
    ("attn2.to_q.", "cross_attn.q."),
    ("attn2.to_k.", "cross_attn.k."),
    ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."),
    ("attn2.norm_q.", "cross_attn.norm_q."),
    ("attn2.norm_k.", "cross_attn.norm_k."),
    ("attn2.add_k_proj.", "cross_attn.k_img."),
    ("attn2.add_v_proj.", "cross_attn.v_img."),
    ("attn2.norm_added_k.", "cross_attn.norm_k_img."),
    ("norm2.", "norm3."),
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
)
_TOP_RULES: tuple[tuple[str, str], ...] = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
    ("patch_embedding.", "patch_embedding."),
)
_BLOCK = re.compile(r"^(blocks\.\d+\.)(.*)$")
# Extra keys some diffusers checkpoints carry that no module uses.
_IGNORED_DIFFUSERS = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.")


def _rename(key: str, to_official: bool) -> str:
    src, dst = (0, 1) if to_official else (1, 0)
    match = _BLOCK.match(key)
    prefix, rest, rules = (match.group(1), match.group(2), _BLOCK_RULES) if match else ("", key, _TOP_RULES)
    for rule in rules:
        if rest.startswith(rule[src]):
            return prefix + rule[dst] + rest[len(rule[src]) :]
    return key  # unknown keys pass through; strict loading reports them with the file name


def dit_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `transformer/` keys -> official keys (unknown keys are kept for strict loading to report)."""
    return {_rename(k, True): v for k, v in sd.items() if not _IGNORED_DIFFUSERS.match(k)}


def dit_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> diffusers `WanTransformer3DModel` keys."""
    return {_rename(k, False): v for k, v in sd.items()}


def diffusers_transformer_config(cfg: DiTConfig) -> dict:
    """Keyword arguments for diffusers' `WanTransformer3DModel` with the same architecture as `cfg`."""
    return dict(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        eps=cfg.eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.image_dim else None,
        pos_embed_seq_len=cfg.image_tokens,
    )
