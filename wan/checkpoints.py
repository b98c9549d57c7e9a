"""Checkpoint directories -> our modules.

Two layouts load, both unchanged from how they are published:

* official `Wan-AI/Wan2.1-*`: `config.json`, `diffusion_pytorch_model.safetensors` (or shards with
  `diffusion_pytorch_model.safetensors.index.json`), `Wan2.1_VAE.pth`,
  `models_t5_umt5-xxl-enc-bf16.pth`, tokenizer in `google/umt5-xxl/`; image-to-video and
  first-last-frame models (I2V / FLF2V) also `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`
  (the CLIP tokenizer folder `xlm-roberta-large/` beside it is not needed: only the visual tower is used);
* `*-Diffusers`: `model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/` (keys are
  converted to ours on load); I2V / FLF2V also `image_encoder/` (a transformers CLIP vision model).
  Their `image_processor/` is ignored: images are preprocessed as the official code does (bicubic
  squash to 224 x 224, no crop; see `wan.image_encoder.WanImageEncoder.preprocess`), not with
  diffusers' resize-and-centre-crop `CLIPImageProcessor`.

Sizes the official `config.json` leaves out (text width, patch size, image width, the FLF2V image
position count) are read from the tensors. Everything is validated strictly: one error lists every
missing file, missing or unexpected key and shape mismatch, naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from wan.configs import PRESETS, DiTConfig, Preset, get_preset
from wan.dit_keys import dit_state_dict_from_diffusers
from wan.image_encoder import WanImageEncoder, tiny_clip_config
from wan.model import WanModel
from wan.text_encoder import WanTextEncoder
from wan.vae import WanVAE
from wan.weights import CheckpointError, load_strict, read_state_dict

__all__ = [
    "CLIP_FILE",
    "CheckpointLayout",
    "LoadedCheckpoint",
    "clip_num_heads",
    "detect_layout",
    "dit_config_from",
    "load_checkpoint",
    "load_dit",
    "load_image_encoder",
    "load_vae",
    "match_preset",
]

DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
IMAGE_ENCODER_DIR = "image_encoder"
# Key prefixes of the DiT's image embedding (official / diffusers): present only in I2V and FLF2V models.
_IMAGE_KEY_PREFIXES = ("img_emb.", "condition_embedder.image_embedder.")


@dataclass(frozen=True)
class CheckpointLayout:
    """Where each component of a checkpoint directory lives."""

    kind: str  # "official" or "diffusers"
    root: Path
    dit_config: Path
    dit_weights: Path  # a .safetensors file or a shard .index.json
    vae: Path
    text_encoder: Path  # the T5 .pth (official) or the text_encoder/ directory (diffusers)
    tokenizer: Path
    # The CLIP .pth (official) or the image_encoder/ directory (diffusers); None for text-to-video.
    image_encoder: Path | None = None


@dataclass
class LoadedCheckpoint:
    """Every component of a checkpoint, on the CPU; `image_encoder` is None for text-to-video."""

    preset: Preset
    dit: WanModel
    vae: WanVAE
    text_encoder: WanTextEncoder
    layout: CheckpointLayout
    image_encoder: WanImageEncoder | None = None


def _weights_in(directory: Path) -> Path | None:
    """The DiT weight file of a directory: single file, or the shard index."""
    for candidate in (directory / DIT_WEIGHTS, directory / f"{DIT_WEIGHTS}.index.json"):
        if candidate.is_file():
            return candidate
    return None


def detect_layout(ckpt_dir: str | Path) -> CheckpointLayout:
    """Recognise an official or diffusers checkpoint directory; list everything missing at once.

    Whether the model takes images (and so needs the CLIP image encoder) is read from the DiT's
    config (official `model_type`, diffusers `image_dim`) or, failing that, from its weight names.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    if (root / "model_index.json").is_file() or (root / "transformer").is_dir():
        weights = _weights_in(root / "transformer")
        layout = CheckpointLayout(
            "diffusers",
            root,
            root / "transformer" / "config.json",
            weights or root / "transformer" / DIT_WEIGHTS,
            root / "vae" / DIT_WEIGHTS,
            root / "text_encoder",
            root / "tokenizer",
            root / IMAGE_ENCODER_DIR,
        )
    else:
        weights = _weights_in(root)
        layout = CheckpointLayout(
            "official",
            root,
            root / "config.json",
            weights or root / DIT_WEIGHTS,
            root / VAE_FILE,
            root / T5_FILE,
            root / T5_TOKENIZER,
            root / CLIP_FILE,
        )
    if not _takes_images(layout):
        layout = dataclasses.replace(layout, image_encoder=None)
    parts = (layout.dit_config, layout.dit_weights, layout.vae, layout.text_encoder, layout.tokenizer)
    missing = [_relative(p, root) for p in (*parts, layout.image_encoder) if p is not None and not p.exists()]
    if missing:
        raise CheckpointError(
            f"{root}: not a complete Wan 2.1 checkpoint ({layout.kind} layout); missing: {', '.join(missing)}"
        )
    return layout


def _relative(path: Path, root: Path) -> str:
    """`path` relative to the checkpoint root, directories (no suffix) with a trailing slash."""
    return str(path.relative_to(root)) + ("/" if path.suffix == "" else "")


def _takes_images(layout: CheckpointLayout) -> bool:
    """Whether the DiT is an image-to-video (or first-last-frame) model, read cheaply: the config's
    `model_type` (official) or `image_dim` (diffusers), else the weight names (safetensors header or
    shard index). Unreadable or missing files count as "no": loading reports them properly."""
    try:
        config = json.loads(layout.dit_config.read_text())
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict):
        if layout.kind == "official" and "model_type" in config:
            return config["model_type"] != "t2v"
        if layout.kind == "diffusers" and config.get("image_dim") is not None:
            return True
    return any(k.startswith(_IMAGE_KEY_PREFIXES) for k in _weight_names(layout.dit_weights))


def _weight_names(path: Path) -> list[str]:
    """The tensor names of a .safetensors file or shard index, without reading tensors ([] if unreadable)."""
    try:
        if path.name.endswith(".index.json"):
            return list(json.loads(path.read_text())["weight_map"])
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:  # missing or malformed: the strict loader reports it with the file name
        return []


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON config ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _require(config: dict, key: str, path: Path):
    if key not in config:
        raise CheckpointError(f"{path}: config has no {key!r}")
    return config[key]


def _shape(sd: dict[str, torch.Tensor], key: str, source: Path) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return sd[key].shape


def dit_config_from(layout: CheckpointLayout, sd: dict[str, torch.Tensor]) -> DiTConfig:
    """Build the DiT config from config.json plus the shapes the official config leaves out.

    `sd` has official key names (diffusers weights are converted first). The model type is the
    official config's `model_type` when given; otherwise (and always for diffusers, whose config has no
    such field) it follows the weights: an image position embedding `img_emb.emb_pos` means "flf2v", an
    image embedding "i2v", neither "t2v". FLF2V's image token count is the length of `img_emb.emb_pos`
    (514 in the released model; tiny test models have fewer).
    """
    c, path = _read_json(layout.dit_config), layout.dit_config
    image_dim = sd["img_emb.proj.0.weight"].shape[0] if "img_emb.proj.0.weight" in sd else None
    emb_pos = sd.get("img_emb.emb_pos")
    patch = tuple(_shape(sd, "patch_embedding.weight", layout.dit_weights)[2:])
    text_dim = _shape(sd, "text_embedding.0.weight", layout.dit_weights)[1]
    inferred_type = "flf2v" if emb_pos is not None else "i2v" if image_dim else "t2v"
    if layout.kind == "official":
        fields = {
            k: _require(c, k, path)
            for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim")
        }
        model_type = c.get("model_type", inferred_type)
        extra = {k: c[k] for k in ("freq_dim", "text_len", "eps") if k in c}
    else:
        heads, head_dim = _require(c, "num_attention_heads", path), _require(c, "attention_head_dim", path)
        fields = {
            "dim": heads * head_dim,
            "ffn_dim": _require(c, "ffn_dim", path),
            "num_heads": heads,
            "num_layers": _require(c, "num_layers", path),
            "in_dim": c.get("in_channels", 16),
            "out_dim": c.get("out_channels", 16),
        }
        model_type = inferred_type
        extra = {k: c[k] for k in ("freq_dim", "eps") if k in c}
        declared = c.get("pos_embed_seq_len")
        if emb_pos is not None and declared is not None and declared != emb_pos.shape[1]:
            raise CheckpointError(
                f"{path}: pos_embed_seq_len {declared} does not match the weights' image position "
                f"embedding of {emb_pos.shape[1]} tokens ({layout.dit_weights})"
            )
    if model_type not in ("t2v", "i2v", "flf2v"):
        raise CheckpointError(f"{path}: unknown model_type {model_type!r} (expected t2v, i2v or flf2v)")
    if model_type != "t2v" and image_dim is None:
        raise CheckpointError(
            f"{layout.dit_weights}: missing key 'img_emb.proj.0.weight' (the image embedding of a "
            f"{model_type} model)"
        )
    # Without emb_pos (a broken flf2v file) keep the default length: the strict load names the missing key.
    if model_type == "flf2v" and emb_pos is not None:
        extra["image_tokens"] = emb_pos.shape[1]
    try:
        return DiTConfig(
            model_type=model_type, text_dim=text_dim, patch_size=patch, image_dim=image_dim, **fields, **extra
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: inconsistent DiT config ({exc})") from exc


def load_dit(layout: CheckpointLayout) -> WanModel:
    """Read, convert (diffusers layout) and strictly load the DiT. Weights keep their stored dtype."""
    sd = read_state_dict(layout.dit_weights)
    if layout.kind == "diffusers":
        sd = dit_state_dict_from_diffusers(sd)
    cfg = dit_config_from(layout, sd)
    with torch.device("meta"):
        model = WanModel(cfg)
    dtype = next(iter(sd.values())).dtype
    return load_strict(model.to(dtype), sd, str(layout.dit_weights))


def load_vae(layout: CheckpointLayout) -> WanVAE:
    sd = read_state_dict(layout.vae)  # from_state_dict recognises and converts the diffusers layout
    try:
        return WanVAE.from_state_dict({k: v.float() for k, v in sd.items()}, source=str(layout.vae))
    except KeyError as exc:
        raise CheckpointError(f"{layout.vae}: missing key {exc} needed to size the VAE") from exc


def match_preset(cfg: DiTConfig, task: str | None, hint: str) -> Preset:
    """The preset whose DiT this is: the named task (checked), else by architecture and directory name.

    I2V 480P and 720P share one architecture; the directory name (`...-480P`) tells them apart.
    """
    if task is not None:
        preset = get_preset(task)
        if preset.dit != cfg:
            raise CheckpointError(
                f"{hint}: the checkpoint's DiT ({cfg.model_type}, dim {cfg.dim}, {cfg.num_layers} layers) "
                f"is not the {task} architecture"
            )
        return preset
    candidates = [p for p in PRESETS.values() if p.dit == cfg]
    for preset in candidates:
        resolution = preset.name.rsplit("-", 1)[-1]
        if resolution.endswith("P") and resolution.lower() in hint.lower():
            return preset
    if candidates:
        return candidates[0]
    return Preset(f"custom-{cfg.model_type}", cfg.model_type, cfg)


def clip_num_heads(preset: Preset) -> int | None:
    """The CLIP head count to assume for an official CLIP file, which does not record it.

    Tiny presets use `tiny_clip_config` (4 heads at any width: its head count is not width / 80), so
    their count comes from there; for the others None lets `clip_config_from_official` use the
    ViT-H/14 head size (width / 80: 16 heads for the released 1280-wide tower).
    """
    if preset.tiny and preset.dit.image_dim is not None:
        return tiny_clip_config(hidden_size=preset.dit.image_dim).num_attention_heads
    return None


def load_image_encoder(
    layout: CheckpointLayout, preset: Preset, dtype: torch.dtype | None = None
) -> WanImageEncoder:
    """Load the CLIP image encoder of an I2V / FLF2V checkpoint and check it fits the DiT.

    Official: the open-clip `.pth` (`WanImageEncoder.from_official`; head count from `clip_num_heads`).
    Diffusers: the `image_encoder/` folder (`WanImageEncoder.from_diffusers`).
    """
    path = layout.image_encoder
    if path is None or not path.exists():
        name = CLIP_FILE if layout.kind == "official" else f"{IMAGE_ENCODER_DIR}/"
        raise CheckpointError(
            f"{layout.root}: a {preset.task} checkpoint needs the CLIP image encoder; missing: {name}"
        )
    if layout.kind == "official":
        encoder = WanImageEncoder.from_official(path, dtype, num_heads=clip_num_heads(preset))
    else:
        encoder = WanImageEncoder.from_diffusers(path, dtype)
    cfg = preset.dit
    if encoder.dim != cfg.image_dim:
        raise CheckpointError(
            f"{path}: the image encoder is {encoder.dim} wide but the DiT takes {cfg.image_dim}-wide "
            "CLIP features"
        )
    if cfg.image_tokens is not None and cfg.image_tokens != 2 * encoder.num_tokens:
        raise CheckpointError(
            f"{path}: the image encoder gives {encoder.num_tokens} tokens per image but the DiT's image "
            f"position embedding has {cfg.image_tokens} (two images)"
        )
    return encoder


def load_checkpoint(
    ckpt_dir: str | Path,
    *,
    task: str | None = None,
    text_dtype: torch.dtype | None = None,
    image_dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Load every component of a checkpoint directory on the CPU.

    `text_dtype` / `image_dtype`: the T5 and CLIP dtypes (None keeps the stored ones).
    """
    layout = detect_layout(ckpt_dir)
    dit = load_dit(layout)
    preset = match_preset(dit.cfg, task, str(layout.root))
    image_encoder = load_image_encoder(layout, preset, image_dtype) if preset.task != "t2v" else None
    vae = load_vae(layout)
    if layout.kind == "official":
        text_encoder = WanTextEncoder.from_official(layout.text_encoder, layout.tokenizer, dtype=text_dtype)
    else:
        text_encoder = WanTextEncoder.from_diffusers(layout.text_encoder, layout.tokenizer, dtype=text_dtype)
    return LoadedCheckpoint(preset, dit, vae, text_encoder, layout, image_encoder)
