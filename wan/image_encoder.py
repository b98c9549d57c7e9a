"""CLIP ViT-H/14 image encoder (I2V / FLF2V): transformers' `CLIPVisionModel` behind the official interface.

Wan 2.1 conditions its image-to-video models on the visual tower of open-clip's
`xlm-roberta-large-vit-huge-14`: the output of the *penultimate* transformer block (31 of 32), CLS token
included, without the final LayerNorm or projection head: `[B, 257, 1280]` per image. transformers'
equivalent is `CLIPVisionModel(...).hidden_states[-2]`.

The official file `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` holds the whole open-clip
model (`visual.*`, `textual.*`, `log_scale`); only `visual.*` is used. `clip_state_dict_from_official`
and `clip_state_dict_to_official` translate between its key names (fused `to_qkv`, `head` [D, E]) and
the transformers `CLIPVisionModelWithProjection` layout (`vision_model.*` + `visual_projection.weight`,
which is also the on-disk layout of a diffusers `image_encoder/` folder). `clip_config_from_official`
reads the architecture off the tensor shapes.

Shapes: `B` images, `S = image_size` (224), `p = patch_size` (14), `D = hidden_size` (1280),
`N = 1 + (S / p)^2` tokens (257).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from wan.weights import (
    CheckpointError,
    check_state_dict,
    load_strict,
    read_state_dict,
    restore_meta_buffers,
    tensor_shape,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "WanImageEncoder",
    "clip_config_from_official",
    "clip_state_dict_from_official",
    "clip_state_dict_to_official",
    "clip_vit_h14_config",
    "tiny_clip_config",
]

# OpenAI CLIP pixel statistics (used by the official Wan code for the open-clip ViT-H/14 as well).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ViT-H/14 uses 80-dim attention heads (1280 = 16 x 80); the head count is not visible in the weights.
_VIT_H_HEAD_DIM = 80
# Input images must lie in [-1, 1]; this much slack is tolerated (rounding, a caller's own resampling).
_RANGE_TOLERANCE = 0.01

# ---------------------------------------------------------------------------------------------------
# Configs


def _clip_vision_config(**sizes: int) -> CLIPVisionConfig:
    """A `CLIPVisionConfig` with the open-clip ViT settings Wan uses: exact GELU, LayerNorm eps 1e-5."""
    return CLIPVisionConfig(
        hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0, num_channels=3, **sizes
    )


def clip_vit_h14_config() -> CLIPVisionConfig:
    """The ViT-H/14 visual tower of Wan 2.1: 224 px, patch 14, width 1280, 32 layers, 16 heads, MLP 5120.

    `projection_dim` 1024 is the open-clip `head` (unused by Wan).
    """
    return _clip_vision_config(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=1024,
    )


def tiny_clip_config(
    hidden_size: int = 32,
    layers: int = 3,
    heads: int = 4,
    image_size: int = 28,
    patch_size: int = 14,
    intermediate_size: int = 64,
    projection_dim: int = 16,
) -> CLIPVisionConfig:
    """A small CLIP vision config for tests and tiny presets.

    With the defaults the features are `[B, 5, 32]` (CLS + a 2 x 2 patch grid, width 32).
    """
    return _clip_vision_config(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
    )


# ---------------------------------------------------------------------------------------------------
# Official (open-clip) <-> transformers key mapping

_HF = "vision_model."
_HF_PROJECTION = "visual_projection.weight"
# Whole-tensor renames (apart from a reshape for the two embeddings, see below).
_TOP_KEYS = {
    "visual.patch_embedding.weight": f"{_HF}embeddings.patch_embedding.weight",  # [D, 3, p, p], no bias
    "visual.cls_embedding": f"{_HF}embeddings.class_embedding",  # [1, 1, D] <-> [D]
    "visual.pos_embedding": f"{_HF}embeddings.position_embedding.weight",  # [1, N, D] <-> [N, D]
    "visual.pre_norm.weight": f"{_HF}pre_layrnorm.weight",
    "visual.pre_norm.bias": f"{_HF}pre_layrnorm.bias",
    "visual.post_norm.weight": f"{_HF}post_layernorm.weight",
    "visual.post_norm.bias": f"{_HF}post_layernorm.bias",
}
_TOP_KEYS_INV = {v: k for k, v in _TOP_KEYS.items()}
# Per-block modules: official `visual.transformer.{i}.<m>` <-> `vision_model.encoder.layers.{i}.<m>`.
_BLOCK_MODULES = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
_BLOCK_MODULES_INV = {v: k for k, v in _BLOCK_MODULES.items()}
_QKV = ("q_proj", "k_proj", "v_proj")  # the order of the row blocks in the fused `to_qkv` [3D, D]
_OFFICIAL_BLOCK = re.compile(r"visual\.transformer\.(\d+)\.(.+)\.(weight|bias)")
_HF_BLOCK = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Parts of the official file that are not the visual tower.
_IGNORED_PREFIXES = ("textual.",)
_IGNORED_KEYS = ("log_scale",)


def _is_ignored(key: str) -> bool:
    return key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES)


def clip_state_dict_from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official open-clip keys (`visual.*`) -> `CLIPVisionModelWithProjection` keys.

    `visual.transformer.{i}.attn.to_qkv.{weight,bias}` [3D, D] / [3D] is split row-wise into
    `self_attn.{q,k,v}_proj` [D, D] / [D] (views, no copy); `cls_embedding` [1, 1, D] becomes
    `class_embedding` [D]; `pos_embedding` [1, N, D] becomes `position_embedding.weight` [N, D];
    `head` [D, E] becomes `visual_projection.weight` [E, D] (transposed copy). `textual.*` and
    `log_scale` are dropped; any other key passes through unchanged, so a strict load reports it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _is_ignored(key):
            continue
        if key == "visual.cls_embedding":
            out[_TOP_KEYS[key]] = value.reshape(value.shape[-1])
        elif key == "visual.pos_embedding":
            out[_TOP_KEYS[key]] = value.reshape(-1, value.shape[-1])
        elif key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif key == "visual.head":
            out[_HF_PROJECTION] = value.t().contiguous()
        elif m := _OFFICIAL_BLOCK.fullmatch(key):
            layer, module, kind = m.groups()
            prefix = f"{_HF}encoder.layers.{layer}"
            if module == "attn.to_qkv":
                if value.shape[0] % 3:
                    raise CheckpointError(f"{key!r}: {value.shape[0]} rows, not 3 equal q/k/v blocks")
                for name, part in zip(_QKV, value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = part
            elif module in _BLOCK_MODULES:
                out[f"{prefix}.{_BLOCK_MODULES[module]}.{kind}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    return out


def clip_state_dict_to_official(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`CLIPVisionModelWithProjection` keys -> official open-clip `visual.*` keys (inverse of the above).

    q/k/v projections are concatenated back into `to_qkv` (a copy); `visual_projection.weight` [E, D]
    becomes `visual.head` [D, E]. Unknown keys pass through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf_sd.items():
        if key == _TOP_KEYS["visual.cls_embedding"]:
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == _TOP_KEYS["visual.pos_embedding"]:
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif key in _TOP_KEYS_INV:
            out[_TOP_KEYS_INV[key]] = value
        elif key == _HF_PROJECTION:
            out["visual.head"] = value.t().contiguous()
        elif m := _HF_BLOCK.fullmatch(key):
            layer, module, kind = m.groups()
            prefix = f"visual.transformer.{layer}"
            if module.startswith("self_attn.") and module.removeprefix("self_attn.") in _QKV:
                qkv.setdefault((layer, kind), {})[module.removeprefix("self_attn.")] = value
            elif module in _BLOCK_MODULES_INV:
                out[f"{prefix}.{_BLOCK_MODULES_INV[module]}.{kind}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) == set(_QKV):
            out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts[n] for n in _QKV])
        else:  # incomplete triple: leave the pieces under their own names
            for name, value in parts.items():
                out[f"{_HF}encoder.layers.{layer}.self_attn.{name}.{kind}"] = value
    return out


def clip_config_from_official(
    sd: Mapping[str, torch.Tensor], source: str = "state dict", num_heads: int | None = None
) -> CLIPVisionConfig:
    """Infer the `CLIPVisionConfig` of an official open-clip visual tower (`visual.*` keys) from its shapes.

    hidden_size, patch_size from `visual.patch_embedding.weight` [D, 3, p, p]; image_size = p * sqrt(N - 1)
    from `visual.pos_embedding` [1, N, D]; num_hidden_layers from the `visual.transformer.{i}` indices;
    intermediate_size from `visual.transformer.0.mlp.0.weight` [I, D]; projection_dim from `visual.head`
    [D, E] (D when absent: the strict key check reports it). The head count cannot be read off the
    weights: `num_heads=None` means D / 80 (ViT-H/14: 1280 wide, 16 heads of 80), otherwise pass it.
    Raises `CheckpointError` naming `source` and the key when one of these is missing or inconsistent.
    """

    shape = functools.partial(tensor_shape, sd, source=source, needed_for="to infer the CLIP vision config")

    hidden, channels, patch, patch_w = shape("visual.patch_embedding.weight", 4)
    if channels != 3 or patch != patch_w:
        found = (hidden, channels, patch, patch_w)
        raise CheckpointError(
            f"{source}: 'visual.patch_embedding.weight' should be [D, 3, p, p], found {found}"
        )
    positions = shape("visual.pos_embedding", 3)[1]
    grid = round((positions - 1) ** 0.5)
    if grid < 1 or grid * grid != positions - 1:
        raise CheckpointError(
            f"{source}: 'visual.pos_embedding' has {positions} positions, not 1 + a square patch grid"
        )
    layers = {int(m.group(1)) for k in sd if (m := _OFFICIAL_BLOCK.fullmatch(k))}
    if not layers:
        raise CheckpointError(
            f"{source}: no 'visual.transformer.{{i}}.*' keys, not an open-clip visual tower"
        )
    intermediate = shape("visual.transformer.0.mlp.0.weight", 2)[0]
    projection = shape("visual.head", 2)[1] if "visual.head" in sd else hidden
    if num_heads is None:
        if hidden % _VIT_H_HEAD_DIM:
            raise CheckpointError(
                f"{source}: cannot infer the number of attention heads: width {hidden} is not a multiple of "
                f"{_VIT_H_HEAD_DIM} (the ViT-H/14 head size); pass num_heads"
            )
        num_heads = hidden // _VIT_H_HEAD_DIM
    if num_heads < 1 or hidden % num_heads:
        raise CheckpointError(f"{source}: width {hidden} is not divisible by num_heads={num_heads}")
    return _clip_vision_config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=num_heads,
        image_size=grid * patch,
        patch_size=patch,
        projection_dim=projection,
    )


def _official_visual(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual part of an official file: `textual.*` and `log_scale` dropped, other keys kept.

    A bare visual-tower state dict (no `visual.` prefix, e.g. `patch_embedding.weight`) gets the prefix.
    """
    if not any(k.startswith("visual.") for k in sd) and "patch_embedding.weight" in sd:
        sd = {f"visual.{k}": v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not _is_ignored(k)}


# ---------------------------------------------------------------------------------------------------
# The encoder


class WanImageEncoder(nn.Module):
    """CLIP visual tower returning the penultimate block's output, with the official preprocessing.

    `model` is a complete (trained) `CLIPVisionModel` with `L` layers; the encoder takes it over: its last
    layer is removed (its output is never used, as in the official `use_31_block=True`), so
    `self.model(...).last_hidden_state` *is* hidden_states[-2] of the full model (before the post-LayerNorm,
    which transformers applies to the pooled CLS only); `model.config.num_hidden_layers` keeps describing
    the trained tower (L), `num_layers` too. The model is switched to eval mode, no grad and
    SDPA attention (on CPU in float32 it matches eager attention to ~1e-7 and avoids materialising the
    attention matrix; the official code uses flash attention).
    """

    def __init__(self, model: CLIPVisionModel):
        super().__init__()
        if not isinstance(model, CLIPVisionModel):
            raise TypeError(f"expected a transformers CLIPVisionModel, got {type(model).__name__}")
        layers = model.encoder.layers
        if len(layers) < 1:
            raise ValueError("the CLIP vision model has no encoder layers")
        self.num_layers = len(layers)  # layers of the trained tower (32 for ViT-H/14); L - 1 are run
        model.encoder.layers = nn.ModuleList(list(layers)[:-1])  # config.num_hidden_layers still says L
        model.set_attn_implementation("sdpa")
        self.model = model.requires_grad_(False)
        self.eval()

    # -- properties --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    @property
    def dim(self) -> int:
        """hidden_size, the width D of the features (1280 for ViT-H/14)."""
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        """Side S of the square the images are resized to (224 for ViT-H/14)."""
        return self.model.config.image_size

    @property
    def num_tokens(self) -> int:
        """N = 1 + (S / p)^2 feature rows per image: CLS + patch grid (257 for ViT-H/14)."""
        return 1 + (self.image_size // self.model.config.patch_size) ** 2

    # -- preprocessing and encoding ----------------------------------------------------------------

    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Official CLIP preprocessing: [B, 3, H, W] (or a list of [3, H_i, W_i]) in [-1, 1] -> [B, 3, S, S].

        Each image is resized to S x S with bicubic interpolation (align_corners=False, no antialias, no
        crop: the aspect ratio is squashed), mapped to [0, 1] with x * 0.5 + 0.5 and normalised with the
        OpenAI CLIP mean/std. Computed in float32 on the encoder's device; returns float32.
        Raises `ValueError` for a wrong shape, a non-float dtype, or values outside [-1, 1].
        """
        batches = [self._check_image(x) for x in _as_image_list(images)]
        size = (self.image_size, self.image_size)
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        out = []
        for x in batches:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
            out.append((x * 0.5 + 0.5).sub(mean).div(std))
        return torch.cat(out)

    def _check_image(self, x: torch.Tensor) -> torch.Tensor:
        """Validate one [B, 3, H, W] batch and return it as float32 on the encoder's device."""
        if not x.is_floating_point():
            raise ValueError(
                f"expected float images in [-1, 1], got dtype {x.dtype} (map uint8 pixels with x / 127.5 - 1)"
            )
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"expected images of shape [B, 3, H, W] or [3, H, W], got {list(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        lo, hi = x.aminmax()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError("images contain NaN or infinite values")
        if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"expected float images in [-1, 1], got values in [{lo.item():.4g}, {hi.item():.4g}] "
                "(map [0, 255] pixels with x / 127.5 - 1, [0, 1] pixels with 2 * x - 1)"
            )
        return x

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the tower on preprocessed pixels [B, 3, S, S] -> features [B, N, D] float32.

        The pixels are cast to the module's dtype (fp16/bf16 on GPU as officially, float32 on CPU); the
        output is the penultimate block's hidden states, CLS first, without the post-LayerNorm.
        """
        s = self.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s) or not len(pixel_values):
            raise ValueError(
                f"expected pixel values of shape [B, 3, {s}, {s}], got {list(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"expected float pixel values, got dtype {pixel_values.dtype}")
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.model(pixel_values=pixels).last_hidden_state.float()

    def encode(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Images in [-1, 1] ([B, 3, H, W], [3, H, W] or a list of [3, H_i, W_i]) -> features [B, N, D].

        `preprocess` then `encode_pixels`: [B, 257, 1280] float32 for ViT-H/14.
        """
        return self.encode_pixels(self.preprocess(images))

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Same as `encode`."""
        return self.encode(images)

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_official(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        *,
        device: str | torch.device = "cpu",
        num_heads: int | None = None,
    ) -> WanImageEncoder:
        """Load `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (or any official-layout file).

        Only `visual.*` is used (`textual.*` and `log_scale` are ignored; a bare visual-tower dict without
        the `visual.` prefix is accepted too). The config is read off the tensor shapes (`num_heads`: see
        `clip_config_from_official`); the model is built on the meta device and takes the file's tensors
        directly. `dtype=None` keeps the stored dtype (the official code runs fp16 on GPU, fp32 on CPU).
        Every visual key is checked, the unused last block and `head` included: missing, unexpected and
        mis-shaped keys raise one `CheckpointError` naming the file and the official keys.
        """
        source = str(path)
        sd = _official_visual(read_state_dict(path))
        config = clip_config_from_official(sd, source=source, num_heads=num_heads)
        target = dtype or sd["visual.patch_embedding.weight"].dtype
        with torch.device("meta"):
            full = CLIPVisionModelWithProjection(config)
        full.to(target)
        expected = {k: v.shape for k, v in clip_state_dict_to_official(full.state_dict()).items()}
        check_state_dict(expected, sd, source)
        load_strict(full, clip_state_dict_from_official(sd), source)
        model = full.vision_model
        restore_meta_buffers(model)
        return cls(model).to(device)

    @classmethod
    def from_diffusers(
        cls,
        directory: str | Path,
        dtype: torch.dtype | None = None,
        *,
        device: str | torch.device = "cpu",
    ) -> WanImageEncoder:
        """Load a diffusers `image_encoder/` folder (a transformers CLIPVisionModel(WithProjection) save).

        Loaded offline with transformers' own `from_pretrained`; the projection is discarded. `dtype=None`
        keeps the stored dtype. transformers would silently re-initialise missing weights; here a missing
        or mis-shaped weight raises `CheckpointError` naming the folder and the keys (unexpected extra
        keys, e.g. an old persistent `position_ids`, are left to transformers, which ignores them).
        """
        path = Path(directory)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: not a transformers model directory (no config.json)")
        try:
            architectures = json.loads(config_file.read_text()).get("architectures") or []
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config_file}: unreadable config ({exc})") from exc
        with_projection = "CLIPVisionModelWithProjection" in architectures
        loader = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
        try:
            loaded, info = loader.from_pretrained(
                str(path), dtype=dtype or "auto", local_files_only=True, output_loading_info=True
            )
        except Exception as exc:  # any loader failure (incl. shape mismatches), reported with the folder
            reason = f"{type(exc).__name__}: {exc}"
            raise CheckpointError(f"{path}: cannot load {loader.__name__} ({reason})") from exc
        missing = sorted(info.get("missing_keys") or ())
        mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
        if missing or mismatched:
            problems = [f"missing key(s): {', '.join(missing)}"] if missing else []
            problems += [f"shape mismatch(es): {', '.join(mismatched)}"] if mismatched else []
            raise CheckpointError(f"{path}: checkpoint does not match the model: " + "; ".join(problems))
        model = loaded.vision_model if with_projection else loaded
        return cls(model).to(device)

    @classmethod
    def from_config(
        cls,
        config: CLIPVisionConfig,
        seed: int = 0,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WanImageEncoder:
        """Random weights (transformers' CLIP init of the full `L`-layer model) drawn from `seed`.

        The global RNG is left untouched. `CLIPVisionModel(config)` built under `torch.manual_seed(seed)`
        holds the same weights, which is what the tests compare against.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPVisionModel(copy.deepcopy(config))  # the caller's config object stays untouched
        return cls(model.to(dtype)).to(device)


def _as_image_list(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A tensor [B, 3, H, W] / [3, H, W], or a non-empty list of [3, H_i, W_i] -> list of [b, 3, H, W]."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [images.unsqueeze(0)]
        if images.ndim == 4:
            return [images]
        raise ValueError(f"expected images of shape [B, 3, H, W] or [3, H, W], got {list(images.shape)}")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise ValueError(
            f"expected an image tensor or a list of [3, H, W] tensors, got {type(images).__name__}"
        )
    if not images:
        raise ValueError("no images to encode")
    out = []
    for i, x in enumerate(images):
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"image {i}: expected a [3, H, W] tensor, got {got}")
        out.append(x.unsqueeze(0))
    return out
