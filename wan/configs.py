"""Model presets, supported sizes and sampling defaults (numbers from the official Wan 2.1 configs).

A preset bundles the DiT architecture, the VAE architecture, the text encoder (only for tiny presets:
real checkpoints carry theirs and its size is read from the tensors) and the task's sampling defaults.
Plain frozen dataclasses: `get_preset("t2v-1.3B").dit.dim == 1536`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "FLF2V_IMAGE_TOKENS",
    "FLF2V_NEGATIVE_PROMPT",
    "I2V_NEGATIVE_PROMPT",
    "PRESETS",
    "RANDOM_WEIGHTS_SEED",
    "DiTConfig",
    "Preset",
    "SamplingDefaults",
    "TextEncoderConfig",
    "VAEConfig",
    "get_preset",
    "parse_size",
    "validate_request",
]

# The official `sample_neg_prompt` (Chinese). An empty negative prompt means "use this one".
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Image-to-video prepends "camera shake".
I2V_NEGATIVE_PROMPT = "镜头晃动，" + DEFAULT_NEGATIVE_PROMPT
# First-last-frame-to-video prepends "shot change" to the image-to-video one.
FLF2V_NEGATIVE_PROMPT = "镜头切换，" + I2V_NEGATIVE_PROMPT

# Length of the official FLF2V image position embedding: 257 CLIP tokens for each of the two frames.
FLF2V_IMAGE_TOKENS = 2 * 257

SIZES_480P = ((832, 480), (480, 832))
SIZES_720P = ((1280, 720), (720, 1280))


@dataclass(frozen=True)
class DiTConfig:
    """The diffusion transformer. Field names follow the official `config.json`.

    `model_type`: "t2v", "i2v" (CLIP features of one image) or "flf2v" (first and last frames: the
    image embedding has a learned position embedding `img_emb.emb_pos` [1, image_tokens, image_dim]).
    """

    model_type: str = "t2v"
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    image_dim: int | None = None  # CLIP width (1280) for image-to-video, None for text-to-video
    # Length of `img_emb.emb_pos` (both frames' tokens); "flf2v" only, where it defaults to 2 x 257.
    image_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.model_type == "flf2v" and self.image_tokens is None:
            object.__setattr__(self, "image_tokens", FLF2V_IMAGE_TOKENS)  # not in the official config.json
        if self.image_tokens is not None:
            if self.model_type != "flf2v":
                raise ValueError(
                    f"image_tokens (an image position embedding) is for flf2v, not {self.model_type}"
                )
            if self.image_dim is None:
                raise ValueError("an flf2v model needs image_dim (the CLIP width)")
            if self.image_tokens < 2 or self.image_tokens % 2:
                raise ValueError(
                    f"image_tokens {self.image_tokens} must be a positive even number (two frames)"
                )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and at least 6 for the 3-D RoPE split")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """The 3-D causal VAE (official `_video_vae` settings by default)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    stride: tuple[int, int, int] = (4, 8, 8)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A umT5 encoder's size; used to build tiny random encoders (real ones are read from the file)."""

    vocab_size: int = 256384
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_ff: int = 10240


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-task defaults, as the official `generate.py` sets them."""

    steps: int = 50
    shift: float = 5.0
    guide_scale: float = 5.0
    solver: str = "unipc"
    frame_num: int = 81
    size: tuple[int, int] = (1280, 720)
    fps: int = 16
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT


@dataclass(frozen=True)
class Preset:
    """Everything needed to build a pipeline for one task/model."""

    name: str
    task: str  # "t2v", "i2v" or "flf2v"
    dit: DiTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    sizes: tuple[tuple[int, int], ...] = SIZES_480P + SIZES_720P
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    tiny: bool = False  # random-weight preset for tests and the demo

    @property
    def num_images(self) -> int:
        """How many conditioning images a request needs: 0 (t2v), 1 (i2v) or 2 (flf2v: first and last)."""
        return {"t2v": 0, "i2v": 1, "flf2v": 2}[self.task]


_T2V_1_3B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_T2V_14B = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_I2V_14B = dataclasses.replace(_T2V_14B, model_type="i2v", in_dim=36, image_dim=1280)
_FLF2V_14B = dataclasses.replace(_I2V_14B, model_type="flf2v", image_tokens=FLF2V_IMAGE_TOKENS)

# Tiny presets: the same architecture, narrow everywhere (4 heads of 16 channels -> RoPE split 8/4/4),
# so a 9-frame video takes a couple of seconds on a CPU.
_TINY_T5 = TextEncoderConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, d_ff=64)
_TINY_VAE = VAEConfig(dim=8)
_TINY_DIT = DiTConfig(dim=64, ffn_dim=128, freq_dim=256, num_heads=4, num_layers=2, text_dim=32)
# The tiny CLIP is 32 wide with 5 tokens per image (28 px / patch 14 -> 2 x 2 patches + CLS).
_TINY_I2V_DIT = dataclasses.replace(_TINY_DIT, model_type="i2v", in_dim=36, image_dim=32)
_TINY_FLF2V_DIT = dataclasses.replace(_TINY_I2V_DIT, model_type="flf2v", image_tokens=2 * 5)
_TINY_SIZES = ((64, 48), (48, 64), (96, 64), (64, 96), (128, 128))
RANDOM_WEIGHTS_SEED = 0  # the seed of a preset's random weights where no checkpoint is given

PRESETS: dict[str, Preset] = {
    "t2v-1.3B": Preset(
        "t2v-1.3B", "t2v", _T2V_1_3B, sampling=SamplingDefaults(size=(832, 480)), sizes=SIZES_480P
    ),
    "t2v-14B": Preset("t2v-14B", "t2v", _T2V_14B),
    "i2v-14B-480P": Preset(
        "i2v-14B-480P",
        "i2v",
        _I2V_14B,
        sampling=SamplingDefaults(steps=40, shift=3.0, size=(832, 480), negative_prompt=I2V_NEGATIVE_PROMPT),
    ),
    "i2v-14B-720P": Preset(
        "i2v-14B-720P",
        "i2v",
        _I2V_14B,
        sampling=SamplingDefaults(steps=40, shift=5.0, negative_prompt=I2V_NEGATIVE_PROMPT),
    ),
    # Trained at 720P; the official code allows all four sizes (as a maximum area).
    "flf2v-14B": Preset(
        "flf2v-14B",
        "flf2v",
        _FLF2V_14B,
        sampling=SamplingDefaults(
            steps=50, shift=16.0, guide_scale=5.0, negative_prompt=FLF2V_NEGATIVE_PROMPT
        ),
    ),
    "tiny-t2v": Preset(
        "tiny-t2v",
        "t2v",
        _TINY_DIT,
        vae=_TINY_VAE,
        sampling=SamplingDefaults(steps=10, size=(64, 48), frame_num=9),
        sizes=_TINY_SIZES,
        text_encoder=_TINY_T5,
        tiny=True,
    ),
    "tiny-i2v": Preset(
        "tiny-i2v",
        "i2v",
        _TINY_I2V_DIT,
        vae=_TINY_VAE,
        sampling=SamplingDefaults(
            steps=10, shift=3.0, size=(64, 48), frame_num=9, negative_prompt=I2V_NEGATIVE_PROMPT
        ),
        sizes=_TINY_SIZES,
        text_encoder=_TINY_T5,
        tiny=True,
    ),
    "tiny-flf2v": Preset(
        "tiny-flf2v",
        "flf2v",
        _TINY_FLF2V_DIT,
        vae=_TINY_VAE,
        sampling=SamplingDefaults(
            steps=10, shift=16.0, size=(64, 48), frame_num=9, negative_prompt=FLF2V_NEGATIVE_PROMPT
        ),
        sizes=_TINY_SIZES,
        text_encoder=_TINY_T5,
        tiny=True,
    ),
}


def default_shift(preset: Preset, size: tuple[int, int]) -> float:
    """The sampling shift when none is given. As the official `generate.py`: image-to-video at 832*480 or
    480*832 uses 3.0 and at other sizes 5.0, whichever i2v checkpoint runs; other tasks keep the preset's."""
    if preset.task == "i2v" and not preset.name.startswith("tiny-"):
        return 3.0 if tuple(size) in ((832, 480), (480, 832)) else 5.0
    return preset.sampling.shift


def get_preset(name: str) -> Preset:
    """Look a preset up by name; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(PRESETS)}") from None


def parse_size(size: str | tuple[int, int]) -> tuple[int, int]:
    """'832*480' (or 'WxH', or a (width, height) pair) -> (width, height)."""
    if isinstance(size, tuple | list):
        if len(size) != 2:
            raise ValueError(f"size must be (width, height), got {size!r}")
        return int(size[0]), int(size[1])
    text = str(size).lower().replace("x", "*")
    parts = text.split("*")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must look like 'W*H' (for instance '832*480'), got {size!r}")
    return int(parts[0]), int(parts[1])


def validate_request(preset: Preset, size: tuple[int, int], frame_num: int, steps: int) -> None:
    """Reject what the model cannot do, with a message naming the field; warn on untrained sizes."""
    width, height = size
    quantum = preset.vae.stride[1] * preset.dit.patch_size[1]
    if width <= 0 or height <= 0 or width % quantum or height % quantum:
        raise ValueError(f"size {width}*{height}: width and height must be positive multiples of {quantum}")
    if frame_num < 1 or (frame_num - 1) % preset.vae.stride[0]:
        raise ValueError(f"frame_num {frame_num}: must be of the form 4n+1 (1, 5, 9, ..., 81)")
    if steps < 1:
        raise ValueError(f"sampling steps {steps}: must be at least 1")
    if (width, height) not in preset.sizes:
        known = ", ".join(f"{w}*{h}" for w, h in preset.sizes)
        warnings.warn(
            f"size {width}*{height} is not one {preset.name} was trained at ({known}); quality may suffer",
            stacklevel=3,
        )
