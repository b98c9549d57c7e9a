"""Checkpoint directories -> our modules.

Two layouts load, both unchanged from how they are published:

* official `Wan-AI/Wan2.1-*`: `config.json`, `diffusion_pytorch_model.safetensors` (or shards with
  `diffusion_pytorch_model.safetensors.index.json`), `Wan2.1_VAE.pth`,
  `models_t5_umt5-xxl-enc-bf16.pth`, tokenizer in `google/umt5-xxl/`;
* `*-Diffusers`: `model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/` (keys are
  converted to ours on load).

Sizes the official `config.json` leaves out (text width, patch size, image width) are read from the
tensors. Everything is validated strictly: one error lists every missing file, missing or unexpected
key and shape mismatch, naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from wan.configs import PRESETS, DiTConfig, Preset, get_preset
from wan.dit_keys import dit_state_dict_from_diffusers
from wan.model import WanModel
from wan.text_encoder import WanTextEncoder
from wan.vae import WanVAE
from wan.weights import CheckpointError, load_strict, read_state_dict

__all__ = ["CheckpointLayout", "LoadedCheckpoint", "detect_layout", "load_checkpoint", "load_dit", "load_vae"]

DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"


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


@dataclass
class LoadedCheckpoint:
    preset: Preset
    dit: WanModel
    vae: WanVAE
    text_encoder: WanTextEncoder
    layout: CheckpointLayout


def _weights_in(directory: Path) -> Path | None:
    """The DiT weight file of a directory: single file, or the shard index."""
    for candidate in (directory / DIT_WEIGHTS, directory / f"{DIT_WEIGHTS}.index.json"):
        if candidate.is_file():
            return candidate
    return None


def detect_layout(ckpt_dir: str | Path) -> CheckpointLayout:
    """Recognise an official or diffusers checkpoint directory; list everything missing at once."""
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
        )
    missing = [
        str(p.relative_to(root)) + ("/" if p.suffix == "" else "")
        for p in (layout.dit_config, layout.dit_weights, layout.vae, layout.text_encoder, layout.tokenizer)
        if not p.exists()
    ]
    if missing:
        raise CheckpointError(
            f"{root}: not a complete Wan 2.1 checkpoint ({layout.kind} layout); missing: {', '.join(missing)}"
        )
    return layout


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
    """Build the DiT config from config.json plus the shapes the official config leaves out."""
    c, path = _read_json(layout.dit_config), layout.dit_config
    image_dim = sd["img_emb.proj.0.weight"].shape[0] if "img_emb.proj.0.weight" in sd else None
    patch = tuple(_shape(sd, "patch_embedding.weight", layout.dit_weights)[2:])
    text_dim = _shape(sd, "text_embedding.0.weight", layout.dit_weights)[1]
    if layout.kind == "official":
        fields = {
            k: _require(c, k, path)
            for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim")
        }
        model_type = c.get("model_type", "i2v" if image_dim else "t2v")
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
        model_type = "i2v" if image_dim else "t2v"
        extra = {k: c[k] for k in ("freq_dim", "eps") if k in c}
    return DiTConfig(
        model_type=model_type, text_dim=text_dim, patch_size=patch, image_dim=image_dim, **fields, **extra
    )


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
    """The preset whose DiT this is: the named task (checked), else by architecture and directory name."""
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
    kind = "i2v" if cfg.image_dim else "t2v"
    return Preset(f"custom-{kind}", kind, cfg)


def load_checkpoint(
    ckpt_dir: str | Path, *, task: str | None = None, text_dtype: torch.dtype | None = None
) -> LoadedCheckpoint:
    """Load every component of a checkpoint directory on the CPU."""
    layout = detect_layout(ckpt_dir)
    dit = load_dit(layout)
    preset = match_preset(dit.cfg, task, str(layout.root))
    if preset.task == "i2v":
        raise CheckpointError(f"{layout.root}: image-to-video checkpoints are not supported yet")
    vae = load_vae(layout)
    if layout.kind == "official":
        text_encoder = WanTextEncoder.from_official(layout.text_encoder, layout.tokenizer, dtype=text_dtype)
    else:
        text_encoder = WanTextEncoder.from_diffusers(layout.text_encoder, layout.tokenizer, dtype=text_dtype)
    return LoadedCheckpoint(preset, dit, vae, text_encoder, layout)
