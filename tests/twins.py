"""Test helpers: diffusers twins of our tiny pipelines, and tiny checkpoints in the published layouts.

`diffusers_twin(pipe)` builds diffusers' `WanPipeline` (image-to-video pipelines: its
`WanImageToVideoPipeline`) from the same weights (converted to diffusers keys). `write_official(pipe,
root)` writes the official `Wan-AI/Wan2.1-*` layout (single file or shards with an index);
`write_diffusers(pipe, root)` lets diffusers itself write the `-Diffusers` layout. Both write the CLIP
image encoder too when the pipeline has one (see `full_clip_model` for its dropped last layer).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

from wan.checkpoints import CLIP_FILE, DIT_WEIGHTS, T5_FILE, T5_TOKENIZER, VAE_FILE
from wan.dit_keys import diffusers_transformer_config, dit_state_dict_to_diffusers
from wan.image_encoder import WanImageEncoder, clip_state_dict_to_official
from wan.pipeline import WanPipeline
from wan.sampling import unipc_sigmas
from wan.text_encoder import t5_state_dict_to_official
from wan.vae import diffusers_vae_config, vae_state_dict_to_diffusers


def diffusers_transformer(pipe: WanPipeline):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**diffusers_transformer_config(pipe.dit.cfg))
    model.load_state_dict(dit_state_dict_to_diffusers(pipe.dit.state_dict()), strict=True)
    return model.eval()


def diffusers_vae(pipe: WanPipeline):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**diffusers_vae_config(pipe.preset.vae))
    vae.load_state_dict(vae_state_dict_to_diffusers(pipe.vae.state_dict()), strict=True)
    return vae.eval()


def official_grid_scheduler(steps: int, shift: float):
    """diffusers' UniPC on the official sigma grid (timesteps truncated to integers, as officially)."""
    from diffusers import UniPCMultistepScheduler

    class OfficialGridUniPC(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
            super().set_timesteps(sigmas=unipc_sigmas(steps, shift).copy(), device=device)

    return OfficialGridUniPC(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, num_train_timesteps=1000
    )


def full_clip_model(encoder: WanImageEncoder, seed: int = 0) -> CLIPVisionModelWithProjection:
    """The complete CLIP vision tower (with projection) a checkpoint holds, around `encoder`'s weights.

    `WanImageEncoder` drops the tower's last layer (its output is never used) and has no projection
    head, but a checkpoint stores both. They are drawn at random here (from `seed`); since neither
    affects the penultimate-layer features, a pipeline loaded from the written checkpoint computes
    exactly what `encoder` does. Every weight `encoder` has is copied; nothing else is left unset.
    """
    config = copy.deepcopy(encoder.model.config)  # still describes the full L-layer tower
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = CLIPVisionModelWithProjection(config)
    missing, unexpected = full.vision_model.load_state_dict(encoder.model.state_dict(), strict=False)
    last = f"encoder.layers.{config.num_hidden_layers - 1}."
    assert not unexpected and missing and all(k.startswith(last) for k in missing), (missing, unexpected)
    return full.float().eval()


def diffusers_twin(pipe: WanPipeline, steps: int = 4, shift: float = 5.0):
    """diffusers' pipeline with `pipe`'s weights: `WanPipeline`, or `WanImageToVideoPipeline` (with a
    CLIP image encoder and processor) when `pipe` takes images."""
    from diffusers import WanImageToVideoPipeline
    from diffusers import WanPipeline as DiffusersWanPipeline

    parts = dict(
        tokenizer=pipe.text_encoder.tokenizer,
        text_encoder=pipe.text_encoder.model,
        transformer=diffusers_transformer(pipe),
        vae=diffusers_vae(pipe),
        scheduler=official_grid_scheduler(steps, shift),
    )
    if pipe.image_encoder is None:
        return DiffusersWanPipeline(**parts)
    from transformers import CLIPImageProcessorPil

    size = pipe.image_encoder.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return WanImageToVideoPipeline(
        **parts, image_encoder=full_clip_model(pipe.image_encoder), image_processor=processor
    )


def write_official(pipe: WanPipeline, root: Path, shards: int = 1) -> Path:
    """The official layout. The T5 file is bf16, as published; the CLIP file (image-to-video) holds the
    whole open-clip model in float32: the visual tower (see `full_clip_model`) plus stand-ins for the
    text tower (`textual.*`) and `log_scale`, which loaders must ignore. No `xlm-roberta-large/`
    tokenizer is written: it is not needed."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = pipe.dit.cfg
    config = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": cfg.model_type,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "in_dim": cfg.in_dim,
        "out_dim": cfg.out_dim,
        "text_len": cfg.text_len,
        "eps": cfg.eps,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    sd = {k: v.float().contiguous() for k, v in pipe.dit.state_dict().items()}
    if shards == 1:
        save_file(sd, str(root / DIT_WEIGHTS))
    else:
        keys = list(sd)
        per = math.ceil(len(keys) / shards)
        weight_map = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
            save_file(part, str(root / name))
            weight_map.update(dict.fromkeys(part, name))
        index = {
            "metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())},
            "weight_map": weight_map,
        }
        (root / f"{DIT_WEIGHTS}.index.json").write_text(json.dumps(index, indent=2))
    torch.save(pipe.vae.state_dict(), root / VAE_FILE)
    t5 = t5_state_dict_to_official(pipe.text_encoder.model.state_dict())
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.items()}, root / T5_FILE)
    pipe.text_encoder.tokenizer.save_pretrained(str(root / T5_TOKENIZER))
    if pipe.image_encoder is not None:
        visual = clip_state_dict_to_official(full_clip_model(pipe.image_encoder).state_dict())
        clip = {k: v.float().contiguous().clone() for k, v in visual.items()}
        generator = torch.Generator().manual_seed(0)
        clip["textual.token_embedding.weight"] = torch.randn(16, 8, generator=generator)
        clip["textual.head.weight"] = torch.randn(4, 8, generator=generator)
        clip["log_scale"] = torch.tensor(4.6052)
        torch.save(clip, root / CLIP_FILE)
    return root


def write_diffusers(pipe: WanPipeline, root: Path) -> Path:
    """The `-Diffusers` layout, written by diffusers' own save_pretrained (image-to-video pipelines add
    `image_encoder/`, a `CLIPVisionModelWithProjection`, and `image_processor/`)."""
    diffusers_twin(pipe).save_pretrained(str(root))
    return root


def round_text_encoder_to_bf16(pipe: WanPipeline) -> WanPipeline:
    """Make the T5 weights exactly representable in bf16, so a bf16 official file loses nothing."""
    with torch.no_grad():
        for p in pipe.text_encoder.model.parameters():
            p.copy_(p.bfloat16().float())
    return pipe


def randomise_dit(model: torch.nn.Module, seed: int) -> None:
    """Keep PyTorch's default init for matrices; give norms, biases and modulations random values too
    (its init leaves them trivial, which would hide mistakes in how they are used)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("modulation"):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
