"""WanPipeline: load the model once, then generate many videos from prompts.

    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B")          # or .from_config("tiny-t2v", seed=0)
    video = pipe.generate("a fox in the snow", size=(832, 480), seed=7)  # [3, F, H, W] in [-1, 1]
    for chunk in pipe.generate_stream("a fox in the snow", seed=7):     # uint8 [n, H, W, 3] as decoded
        ...
    frames = pipe(prompt="a fox", num_inference_steps=30, generator=torch.Generator().manual_seed(7),
                  output_type="np").frames                             # as diffusers: [1, F, H, W, 3]

Several prompts of one size are sampled together in one batched DiT forward (`generate_batch`), and
the conditional and unconditional passes share one forward unless `batch_cfg=False`; both give the
same videos as generating one at a time.

Image-to-video presets take `image=` (and first-last-frame presets `last_image=`): a PIL image, a uint8
array [H, W, 3] or a float tensor [3, H, W] in [-1, 1]. Their `size` is a maximum area: the video
takes the image's aspect ratio within it (`wan.conditioning.size_for_image`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import torch
from tqdm.auto import tqdm

from wan.cache import CacheCounts, CacheSetting, mag_ratios_for, step_cache
from wan.conditioning import condition_video, crop_to_aspect, frame_mask, image_tensor, size_for_image
from wan.configs import Preset, default_shift, get_preset, parse_size, validate_request
from wan.guidance import Denoiser, choose_guidance
from wan.lora import LoraSet, applied_loras, apply_loras
from wan.model import WanModel
from wan.sampling import SOLVERS, FlowSampler, initial_noise, latent_shape
from wan.text_encoder import WanTextEncoder, text_encoder_dtype
from wan.vae import VAETiling, WanVAE

if TYPE_CHECKING:
    from wan.distributed.parallel import ParallelConfig, ParallelPlan
    from wan.video_output import VideoPipelineOutput

NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]  # one video's latent shape -> [B, *shape]

__all__ = [
    "OFFICIAL_NAMES",
    "GenerationSettings",
    "ImageCondition",
    "MemoryOptions",
    "SettingsArgs",
    "WanPipeline",
    "default_device",
    "default_dtype",
    "parse_vae_tiling",
    "platform_names",
    "to_uint8_frames",
]

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3] on the CPU."""
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu()


class SettingsArgs(TypedDict, total=False):
    """Optional per-request settings; anything left out comes from the preset's defaults. The names are the
    platform's (a manifest's fields); the official `generate.py` names are accepted too (`OFFICIAL_NAMES`)."""

    negative_prompt: str | None
    size: tuple[int, int] | str | None
    frame_num: int | None
    steps: int | None
    shift: float | None
    guide_scale: float | None
    solver: str | None
    cache: CacheSetting | str | dict[str, Any] | None  # 'KIND[:THRESHOLD]' (`wan.cache.CacheSetting.parse`)
    sampling_steps: int | None  # the official names, aliases of the above
    sample_steps: int | None
    sample_shift: float | None
    sample_guide_scale: float | None
    sample_solver: str | None


# The official `generate.py` / `WanT2V.generate` names -> the platform's (a manifest's fields).
OFFICIAL_NAMES = {
    "sampling_steps": "steps", "sample_steps": "steps", "sample_shift": "shift",
    "sample_guide_scale": "guide_scale", "sample_solver": "solver",
}  # fmt: skip


def platform_names(values: dict[str, Any]) -> dict[str, Any]:
    """Settings keyword arguments with the official names turned into the platform's; ValueError when both
    spellings of one setting are given with different values, TypeError for an unknown name."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        target = OFFICIAL_NAMES.get(name, name)
        if target not in _SETTING_NAMES:
            raise TypeError(f"settings() got an unexpected keyword argument {name!r}")
        if value is None:
            continue
        if out.get(target) is not None and out[target] != value:
            raise ValueError(f"{name}={value!r} contradicts {target}={out[target]!r}: give one of them")
        out[target] = value
    return out


@dataclass(frozen=True)
class GenerationSettings:
    """Resolved sampling settings for one request (every default filled in from the preset)."""

    size: tuple[int, int]
    frame_num: int
    steps: int
    shift: float
    guide_scale: float
    solver: str
    negative_prompt: str
    cache: CacheSetting | None = None  # the step cache (`wan.cache`); None: every DiT forward computed

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationSettings:
        """The inverse of `dataclasses.asdict` (as settings travel between processes): the size a tuple
        again, the cache a `CacheSetting`."""
        cache = CacheSetting.parse(values.get("cache"))
        return cls(**{**values, "size": tuple(values["size"]), "cache": cache})


_SETTING_NAMES = frozenset(
    ("negative_prompt", "size", "frame_num", "steps", "shift", "guide_scale", "solver", "cache")
)  # `GenerationSettings` as a request names them


@dataclass(frozen=True)
class ImageCondition:
    """What an image-to-video request adds to the DiT's input, for one video.

    clip: [1, Li, image_dim] CLIP features (257 tokens per image, 514 for first and last);
    y: [1, 4 + z, T, h, w] the mask channels and the encoded condition video; size: (width, height).
    """

    clip: torch.Tensor
    y: torch.Tensor
    size: tuple[int, int]


@dataclass(frozen=True)
class MemoryOptions:
    """How a pipeline trades speed for GPU memory (the official command's names where it has them).

    offload_model: every model lives on the CPU and moves to the device only while it runs (text encoder,
        CLIP, DiT for the sampling loop, VAE for encode / decode), then back; peak GPU memory is about the
        largest single model plus its activations.
    t5_cpu: the text encoder stays on the CPU and runs there (its output moves to the device).
    vae_tiling: decode in overlapping spatial tiles with blended seams (`wan.vae.VAETiling`); None (the
        default) decodes whole frames exactly.

    `offload_model` changes nothing in the results. `t5_cpu` runs the text encoder in the CPU's kernels
    (text features within rounding of the GPU's); `vae_tiling` changes the decoded pixels slightly.
    """

    offload_model: bool = False
    t5_cpu: bool = False
    vae_tiling: VAETiling | None = None

    @classmethod
    def parse(
        cls, offload_model: bool | None = False, t5_cpu: bool | None = False, vae_tiling: str | None = None
    ) -> MemoryOptions:
        """From flag or setting values: two booleans and 'TILE[:OVERLAP]' (`parse_vae_tiling`)."""
        return cls(bool(offload_model), bool(t5_cpu), parse_vae_tiling(vae_tiling))

    def describe(self) -> dict[str, object]:
        """For logs, sidecars and the catalog's record of a run."""
        tiling = self.vae_tiling
        return {"offload_model": self.offload_model, "t5_cpu": self.t5_cpu,
                "vae_tiling": None if tiling is None else f"{tiling.tile}:{tiling.overlap}"}  # fmt: skip


def parse_vae_tiling(value: str | None) -> VAETiling | None:
    """'TILE[:OVERLAP]' in latent cells (8 pixels each), 'on' for the defaults, '' / 'off' / None for none."""
    if value is None or value.strip().lower() in ("", "off", "none", "false", "0"):
        return None
    if value.strip().lower() in ("on", "true", "1", "default"):
        return VAETiling()
    tile, _, overlap = value.partition(":")
    try:
        return VAETiling(int(tile), int(overlap) if overlap else VAETiling.overlap)
    except ValueError as exc:
        raise ValueError(
            f"vae_tiling {value!r}: expected TILE[:OVERLAP] in latent cells, e.g. 32:8 ({exc})"
        ) from None


class WanPipeline:
    """Text encoder + DiT + VAE (+ CLIP image encoder for image-to-video) on one device, with the
    preset's defaults; `memory` (`MemoryOptions`) trades speed for GPU memory."""

    def __init__(
        self,
        preset: Preset,
        dit: WanModel,
        vae: WanVAE,
        text_encoder: WanTextEncoder,
        *,
        image_encoder: torch.nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        source: str = "",
        memory: MemoryOptions | None = None,
        defer: Collection[str] = (),
    ) -> None:
        """`defer`: "dit" and/or "text_encoder" stay on the CPU for `distribute` (or `parallelize`)
        to place: ZeRO-3 moves them to the device one parameter shard at a time, so they never stand
        whole on a GPU."""
        unknown = set(defer) - {"dit", "text_encoder"}
        if unknown:
            raise ValueError(f"defer: unknown parts {sorted(unknown)}; expected 'dit' and/or 'text_encoder'")
        self.preset = preset
        self.deferred = set(defer)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.source = source or preset.name
        self.memory = memory or MemoryOptions()
        if self.takes_images and image_encoder is None:
            raise ValueError(f"{preset.name} is image-to-video: it needs a CLIP image encoder")
        self.dit = dit.cast(self.dtype).eval().requires_grad_(False)
        self.vae = vae.float().eval().requires_grad_(False)
        if text_encoder.dtype == torch.float16:  # umT5 overflows in fp16 (`text_encoder_dtype`)
            log.warning("the text encoder runs in bfloat16, not float16 (umT5 overflows in float16)")
            text_encoder.to(dtype=text_encoder_dtype(text_encoder.dtype))
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder.eval().requires_grad_(False) if image_encoder else None
        self._place()
        # Set by `distribute` when one video runs on several processes.
        self.parallel: ParallelPlan | None = None
        self.lora_merges = 0  # how many times a LoRA set was merged into (or removed from) the DiT
        # The last video's step-cache counts (DiT forwards, skipped forwards); None: it ran uncached.
        self.last_cache_counts: CacheCounts | None = None
        # The last `generate_stream(keep_latents=True)` video's final latents [z, T, h, w] float32 on the CPU.
        self.last_latents: torch.Tensor | None = None

    def _place(self) -> None:
        """Each part where it waits between uses: on the device, or on the CPU under `offload_model` (the
        text encoder under `t5_cpu`, and the parts deferred for ZeRO-3)."""
        cpu = torch.device("cpu")
        home = cpu if self.memory.offload_model else self.device
        self.dit.to(cpu if "dit" in self.deferred else home)
        self.vae.to(home)
        self.text_encoder.to(cpu if self.memory.t5_cpu or "text_encoder" in self.deferred else home)
        if self.image_encoder is not None:
            # As the official code: CLIP in half precision on a GPU, float32 on the CPU.
            clip_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self.image_encoder.to(home, clip_dtype)

    def to(
        self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> WanPipeline:
        """Move the pipeline to `device` and/or run the DiT in `dtype` (its float32 modules stay float32),
        as diffusers' `pipe.to("cuda")`, `pipe.to(torch.bfloat16)` or `pipe.to("cuda", torch.bfloat16)`;
        in place, returns the pipeline. The VAE stays float32, CLIP runs in half precision on a GPU (as
        officially) and the text encoder keeps its dtype. With `offload_model` the parts keep waiting on
        the CPU and come to `device` when used. A pipeline spread over processes (`distribute`) cannot
        move."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("to(): give one dtype")
            device, dtype = None, device
        if self.parallel is not None or self.deferred:
            raise RuntimeError("this pipeline is placed by distribute()/parallelize(): it cannot move")
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None and dtype != self.dtype:
            self.dtype = dtype
            self.dit.cast(dtype)
        self._place()
        return self

    @property
    def is_writer(self) -> bool:
        """Whether this process decodes and hands out the videos: always, except on ranks other than 0 of
        a parallel pipeline (they sample with the others and decode nothing)."""
        return self.parallel is None or self.parallel.rank == 0

    def describe(self) -> dict[str, object]:
        """How one video is spread over processes (the parallel layout, for sidecars); {} on one process."""
        return self.parallel.config.describe() if self.parallel is not None else {}

    def reset_peak_memory(self) -> None:
        """Start measuring this process's peak GPU memory afresh (`peak_memory_bytes`); nothing on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def peak_memory_bytes(self) -> int | None:
        """Peak GPU memory allocated since `reset_peak_memory` (None on the CPU)."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    # --------------------------------------------------------------------------------- parallelism
    def parallelize(self, config: ParallelConfig) -> WanPipeline:
        """Spread this pipeline over the default process group as `config` says: `build_plan`, then
        `distribute` (in place; returns the pipeline). Collective: every rank calls it with the same
        weights and config. ValueError for a layout that does not fit the world or the heads, an invalid
        DeepSpeed config, or memory options ZeRO-3 excludes, before any collective."""
        from wan.distributed.parallel import build_plan

        self._check_parallel(config)
        return self.distribute(build_plan(config, self.dit.cfg.num_heads))

    def _check_parallel(self, config: ParallelConfig) -> None:
        if config.zero3 and self.memory.offload_model:
            raise ValueError("offload_model cannot be combined with ZeRO-3: ZeRO-3 already keeps 1/N of the "
                             "weights on each GPU")  # fmt: skip
        if config.t5_zero3 and self.memory.t5_cpu:
            raise ValueError("t5_cpu and t5_zero3 exclude each other: the text encoder runs on the CPU, or "
                             "sharded over the GPUs")  # fmt: skip

    def distribute(self, plan: ParallelPlan) -> WanPipeline:
        """Place this pipeline's parts by `plan` (collective, in place; returns the pipeline): the DiT's
        sequence split over the plan's context mesh, the ZeRO-3 parts sharded, the other deferred parts
        moved to the device whole; sampling then follows the plan's CFG branch."""
        from wan.distributed.context_parallel import apply_context_parallel
        from wan.distributed.parallel import apply_zero3

        self._check_parallel(plan.config)
        if plan.mesh.world_size > 1:
            apply_context_parallel(self.dit, plan.mesh)
        if plan.config.dit_zero3:
            apply_zero3(self.dit, plan)
        if plan.config.t5_zero3:
            apply_zero3(self.text_encoder.model, plan)
        # Parts left on the CPU for ZeRO-3 (`defer=`) that it did not shard go to the device whole.
        for name in self.deferred - set(plan.config.zero3_parts):
            getattr(self, name).to(self.device)
        self.deferred = set()
        self.parallel = plan
        return self

    # ------------------------------------------------------------------------------------------ LoRAs
    @property
    def loras(self) -> LoraSet:
        """The LoRA set merged into the DiT now (empty: the base weights)."""
        return applied_loras(self.dit)

    def use_loras(self, loras: LoraSet | None) -> bool:
        """Merge `loras` into the DiT for the next videos (None or empty: the base weights), restoring the
        base weights first when another set is merged (bit-exactly, without reading the checkpoint).
        Returns whether the weights changed (the same set again changes nothing); `lora_merges` counts the
        changes. ValueError for a file that does not fit the model, before any weight changes."""
        loras = loras or LoraSet()
        if self.loras.identity == loras.identity:
            return False
        if self.parallel is not None and self.parallel.config.dit_zero3:
            raise ValueError("LoRAs cannot be merged into a DiT sharded by ZeRO-3 (dit_zero3): its weights "
                             "are split over the processes")  # fmt: skip
        apply_loras(self.dit, loras)
        self.lora_merges += 1
        return True

    @contextlib.contextmanager
    def resident(self, *modules: Any) -> Iterator[None]:
        """With `offload_model`: `modules` on the device for the block, back on the CPU after (and the
        CUDA cache emptied). Otherwise nothing moves. The text encoder stays put under `t5_cpu`."""
        moving = [m for m in modules if m is not None and not (m is self.text_encoder and self.memory.t5_cpu)]
        if not self.memory.offload_model or self.device.type == "cpu" or not moving:
            yield
            return
        for module in moving:
            module.to(self.device)
        try:
            yield
        finally:
            for module in moving:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def takes_images(self) -> bool:
        """Whether this is an image-to-video (or first-last-frame) model."""
        return self.preset.task != "t2v"

    @property
    def takes_last_image(self) -> bool:
        return self.preset.task == "flf2v"

    # ----------------------------------------------------------------------------------- constructors
    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        *,
        task: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        memory: MemoryOptions | None = None,
        defer: Collection[str] = (),
    ) -> WanPipeline:
        """Load an official `Wan-AI/Wan2.1-*` or `*-Diffusers` checkpoint directory (text-, image- or
        first-last-frame-to-video; the CLIP image encoder comes with the latter two). `torch_dtype` is
        diffusers' name for `dtype`: the DiT's and the text encoder's (default bf16 on a GPU, else
        float32), except that float16 runs the text encoder in bf16 (`text_encoder_dtype`)."""
        from wan.checkpoints import load_checkpoint

        device = torch.device(device) if device is not None else default_device()
        dtype = _one_dtype(dtype, torch_dtype) or default_dtype(device)
        # CLIP is cast straight to the dtype __init__ runs it in (fp16 on a GPU, as officially).
        clip_dtype = torch.float16 if device.type == "cuda" else torch.float32
        parts = load_checkpoint(
            ckpt_dir, task=task, text_dtype=text_encoder_dtype(dtype), image_dtype=clip_dtype
        )
        return cls(
            parts.preset,
            parts.dit,
            parts.vae,
            parts.text_encoder,
            image_encoder=parts.image_encoder,
            device=device,
            dtype=dtype,
            source=str(ckpt_dir),
            memory=memory,
            defer=defer,
        )

    @classmethod
    def from_config(
        cls,
        name: str,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        memory: MemoryOptions | None = None,
        defer: Collection[str] = (),
    ) -> WanPipeline:
        """Random weights for a preset (tiny presets: tests and the demo; full ones: benchmarks);
        `torch_dtype` as in `from_pretrained`."""
        dtype = _one_dtype(dtype, torch_dtype)
        preset = get_preset(name)
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(seed)
            dit = WanModel(preset.dit)
            vae = WanVAE.from_config(preset.vae)
        # As loaded checkpoints are: the text encoder in the pipeline's dtype (bf16 on a GPU; bf16 for fp16).
        run_dtype = dtype or default_dtype(device if device is not None else default_device())
        text_dtype = text_encoder_dtype(run_dtype)
        text_encoder = WanTextEncoder.random(preset.text_encoder, seed=seed, dtype=text_dtype)
        image_encoder = _random_image_encoder(preset, seed) if preset.task != "t2v" else None
        return cls(
            preset, dit, vae, text_encoder, image_encoder=image_encoder, device=device, dtype=dtype,
            source=f"{name} (random weights)", memory=memory, defer=defer,
        )  # fmt: skip

    # -------------------------------------------------------------------------------------- settings
    def settings(self, **given: Unpack[SettingsArgs]) -> GenerationSettings:
        """Fill unset values from the preset's defaults and validate them. Names: `SettingsArgs` (steps,
        solver, shift, guide_scale, ...; the official sampling_steps, sample_solver, ... too)."""
        values = platform_names(dict(given))
        d = self.preset.sampling
        size = values.get("size")
        resolved_size = parse_size(size) if size is not None else d.size
        out = GenerationSettings(
            size=resolved_size,
            frame_num=values.get("frame_num", d.frame_num),
            steps=values.get("steps", d.steps),
            shift=values["shift"] if "shift" in values else default_shift(self.preset, resolved_size),
            guide_scale=values.get("guide_scale", d.guide_scale),
            solver=values.get("solver") or d.solver,
            # As in the official code, an empty negative prompt means the default one.
            negative_prompt=values.get("negative_prompt") or d.negative_prompt,
            cache=CacheSetting.parse(values.get("cache")),
        )
        validate_request(self.preset, out.size, out.frame_num, out.steps)
        if out.solver not in SOLVERS:
            raise ValueError(f"solver {out.solver!r}: expected one of {', '.join(SOLVERS)}")
        return out

    # ------------------------------------------------------------------------------- image conditions
    def video_size(self, settings: GenerationSettings, image: object | None = None) -> tuple[int, int]:
        """(width, height) of the videos these settings make: `settings.size`, or for image-to-video the
        image's aspect ratio within that area."""
        if not self.takes_images or image is None:
            return settings.size
        max_w, max_h = settings.size
        height, width = image_tensor(image).shape[1:]
        return size_for_image((height, width), max_w * max_h, self.vae.stride[1], self.dit.cfg.patch_size[1])

    @torch.no_grad()
    def image_condition(
        self, image: object, settings: GenerationSettings, last_image: object | None = None
    ) -> ImageCondition:
        """CLIP features, mask and encoded condition video for one image-to-video request.

        `settings.size` is the maximum area; the video takes `image`'s aspect ratio within it. CLIP sees
        the original image(s); the VAE sees them resized to the video's size.
        """
        if not self.takes_images:
            raise ValueError(f"{self.preset.name} is text-to-video: it takes no image")
        if last_image is not None and not self.takes_last_image:
            raise ValueError(f"{self.preset.name} takes no last image (first-last-frame presets do)")
        if self.takes_last_image and last_image is None:
            raise ValueError(f"{self.preset.name} needs both a first and a last image")
        assert self.image_encoder is not None
        first = image_tensor(image).to(self.device)
        last = None
        if last_image is not None:  # the last frame takes the first one's aspect ratio (center crop)
            last = crop_to_aspect(image_tensor(last_image).to(self.device), tuple(first.shape[1:]))
        width, height = self.video_size(settings, first)
        images = [first] if last is None else [first, last]
        with self.resident(self.image_encoder):
            clip = torch.cat([self.image_encoder.encode(img[None]) for img in images], dim=1)
        video = condition_video(first, (width, height), settings.frame_num, last=last)
        with self.resident(self.vae):
            latents = self.vae.encode(video[None].to(self.device))
        mask = frame_mask(settings.frame_num, tuple(latents.shape[-2:]), keep_last=last is not None,
                          temporal_stride=self.vae.stride[0])  # fmt: skip
        y = torch.cat([mask[None].to(latents), latents], dim=1)
        return ImageCondition(clip=clip.float(), y=y, size=(width, height))

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample_latents(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None,
        settings: GenerationSettings,
        *,
        conditions: Sequence[ImageCondition] | None = None,
        batch_cfg: bool = True,
        progress: bool = True,
        noise: NoiseSource | None = None,
    ) -> torch.Tensor:
        """Denoise one latent video per (prompt, seed[, image condition]). Returns [B, z, T, h, w]
        float32 (h, w: the video's size / 8; for image-to-video, the conditions' common size).

        `noise`, when given, draws the starting latents instead of `seeds` (None then): called with one
        video's latent shape (z, T, h, w), it returns [B, z, T, h, w]."""
        if noise is None and (seeds is None or len(prompts) != len(seeds)):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds or [])} seeds")
        denoise, (width, height) = self._denoiser(len(prompts), settings, conditions)
        shape = latent_shape(settings.frame_num, width, height, self.vae.z_dim, self.vae.stride)
        if noise is None:
            assert seeds is not None
            x = torch.stack([initial_noise(s, shape, device=self.device) for s in seeds])
        else:
            x = noise(tuple(shape)).to(self.device, torch.float32)
            if tuple(x.shape) != (len(prompts), *shape):
                raise ValueError(f"latents: expected shape {(len(prompts), *shape)}, got {tuple(x.shape)}")
        context, uncond = self._encode_prompts(prompts, settings)
        split = self.parallel.cfg if self.parallel is not None else None  # this rank's CFG branch, if any
        guided = choose_guidance(denoise, context, uncond, settings.guide_scale, split=split,
                                 batched=batch_cfg)  # fmt: skip
        sampler = FlowSampler(settings.solver, settings.steps, settings.shift)
        # Every timestep goes to the device once, up front: a copy per step would wait for the GPU.
        timesteps = sampler.timesteps.to(self.device)
        steps = tqdm(range(len(timesteps)), desc="sampling", disable=not (progress and self.is_writer),
                     leave=False)  # fmt: skip
        self._check_cache(settings.cache)
        self.last_cache_counts = None
        with self.resident(self.dit), self._step_cache(settings) as cache:  # offload_model: DiT on the device
            denoise.branch_state = cache.context if cache is not None else None
            for i in steps:
                x = sampler.step(guided(x, timesteps[i].expand(x.shape[0])), i, x)
            if cache is not None:
                self.last_cache_counts = cache.counts()
        return x

    def latents_metadata(self) -> dict[str, str]:
        """What a stored latents file says about itself (text, for safetensors metadata): how the latents are
        normalised and what decodes them."""
        import json

        return {
            "format": "wanflow.latents/1", "model": self.preset.name, "layout": "[z, T, h, w] float32",
            "normalisation": "(mu - latents_mean) / latents_std per channel, as the DiT samples them; "
                             "WanVAE.decode takes them as they are",
            "latents_mean": json.dumps(self.vae.latents_mean.tolist()),
            "latents_std": json.dumps(self.vae.latents_std.tolist()),
            "vae_stride": json.dumps(list(self.vae.stride)),
        }  # fmt: skip

    def _step_cache(self, settings: GenerationSettings) -> contextlib.AbstractContextManager[Any]:
        ratios = mag_ratios_for(self.preset.name) if settings.cache is not None else None
        return step_cache(self.dit, settings.cache, settings.steps, ratios)

    def _check_cache(self, cache: CacheSetting | None) -> None:
        """Refuse a step cache where its decisions could differ between the processes of one video."""
        plan = self.parallel
        if cache is None or plan is None:
            return
        if plan.mesh.world_size > 1:
            raise ValueError(f"the {cache.kind} step cache does not support context parallelism yet "
                             "(ulysses_size / ring_size above 1): ranks would judge different tokens")
        if plan.cfg is not None and plan.config.dit_zero3:
            raise ValueError(f"the {cache.kind} step cache cannot run with cfg_parallel and dit_zero3 "
                             "together: the two branches may skip different steps while ZeRO-3 needs every "
                             "rank in each block")  # fmt: skip

    def _denoiser(
        self, n: int, settings: GenerationSettings, conditions: Sequence[ImageCondition] | None
    ) -> tuple[Denoiser, tuple[int, int]]:
        """The DiT with the batch's image conditioning (image-to-video: one condition per prompt, all of one
        size), and the videos' (width, height)."""
        if not self.takes_images:
            if conditions:
                raise ValueError(f"{self.preset.name} is text-to-video: it takes no image")
            return Denoiser(self.dit), settings.size
        if conditions is None or len(conditions) != n:
            raise ValueError(f"{self.preset.name} is image-to-video: give one image condition per prompt")
        if len({c.size for c in conditions}) != 1:
            raise ValueError("videos sampled together must have one size: images of other aspect "
                             "ratios go in separate batches")  # fmt: skip
        y = torch.cat([c.y for c in conditions]).to(self.device)
        clip = torch.cat([c.clip for c in conditions]).to(self.device)
        return Denoiser(self.dit, y, clip), conditions[0].size

    def _encode_prompts(
        self, prompts: Sequence[str], settings: GenerationSettings
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, L, C], the negative prompt's [B, L, C] or None when there is no guidance), on the
        pipeline's device."""
        with self.resident(self.text_encoder):
            context = self.text_encoder.encode_padded(list(prompts)).to(self.device)
            if settings.guide_scale == 1.0:
                return context, None
            uncond = self.text_encoder.encode_padded([settings.negative_prompt]).to(self.device)
        return context, uncond.expand(len(prompts), -1, -1)

    def generate_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        images: Sequence[object] | None = None,
        last_images: Sequence[object] | None = None,
        batch_cfg: bool = True,
        progress: bool = True,
        **settings: Unpack[SettingsArgs],
    ) -> torch.Tensor:
        """Sample several videos of one size together. Returns [B, 3, F, H, W] in [-1, 1] (float32).
        Image-to-video: one image per prompt (and one last image for first-last-frame presets), all of
        one aspect ratio."""
        resolved = self.settings(**settings)
        conditions = self._conditions(len(prompts), resolved, images, last_images)
        latents = self.sample_latents(
            prompts, seeds, resolved, conditions=conditions, batch_cfg=batch_cfg, progress=progress
        )
        with torch.no_grad(), self.resident(self.vae):
            return self.vae.decode(latents, self.memory.vae_tiling)

    def _conditions(
        self, n: int, settings: GenerationSettings, images: Sequence[object] | None,
        last_images: Sequence[object] | None,
    ) -> list[ImageCondition] | None:  # fmt: skip
        if images is None:
            if self.takes_images:
                raise ValueError(f"{self.preset.name} is image-to-video: pass image=")
            if last_images is not None:
                raise ValueError("last_image= needs image= as well")
            return None
        lasts = list(last_images) if last_images is not None else [None] * len(images)
        if len(images) != n or len(lasts) != n:
            raise ValueError(f"got {n} prompts but {len(images)} images and {len(lasts)} last images")
        return [self.image_condition(img, settings, last) for img, last in zip(images, lasts, strict=True)]

    def generate(
        self,
        prompt: str,
        *,
        seed: int = 0,
        image: object | None = None,
        last_image: object | None = None,
        batch_cfg: bool = True,
        progress: bool = True,
        **settings: Unpack[SettingsArgs],
    ) -> torch.Tensor:
        """One video: [3, F, H, W] float32 in [-1, 1]. Settings as in `settings()`; unset ones come from
        the preset (size is (width, height), as in the official '832*480'; for image-to-video the
        maximum area, the aspect ratio following `image`)."""
        return self.generate_batch(
            [prompt], [seed], images=None if image is None else [image],
            last_images=None if last_image is None else [last_image], batch_cfg=batch_cfg,
            progress=progress, **settings,
        )[0]  # fmt: skip

    @torch.no_grad()  # applied per step of the generator: the caller's grad mode is untouched
    def generate_stream(
        self,
        prompt: str,
        *,
        seed: int = 0,
        image: object | None = None,
        last_image: object | None = None,
        batch_cfg: bool = True,
        progress: bool = True,
        keep_latents: bool = False,
        decode_video: bool = True,
        **settings: Unpack[SettingsArgs],
    ) -> Iterator[torch.Tensor]:
        """Like `generate`, but yields uint8 frame chunks [n, H, W, 3] as the VAE decodes them
        (1 frame, then 4 per latent frame); no whole-video tensor is held. With `keep_latents`, the final
        latents the VAE decodes are kept in `last_latents` ([z, T, h, w] float32, CPU, normalised as the
        DiT sees them: `WanVAE.decode` takes them back). `decode_video=False` (for latents-only outputs,
        with `keep_latents`) decodes the first latent frame alone and yields its one frame [1, H, W, 3]:
        the VAE is causal, so it is the video's first frame exactly, for a fraction of the decode.

        A parallel pipeline's ranks other than 0 (`is_writer` False) take part in the sampling and yield
        nothing: rank 0 decodes."""
        resolved = self.settings(**settings)
        conditions = self._conditions(
            1, resolved, None if image is None else [image], None if last_image is None else [last_image]
        )
        self.last_latents = None
        latents = self.sample_latents(
            [prompt], [seed], resolved, conditions=conditions, batch_cfg=batch_cfg, progress=progress
        )
        if keep_latents:
            self.last_latents = latents[0].detach().to("cpu", torch.float32, copy=True)
        if not self.is_writer:
            return
        decoded = latents if decode_video else latents[:, :, :1]
        with self.resident(self.vae):
            for chunk in self.vae.decode_stream(decoded, self.memory.vae_tiling):
                yield to_uint8_frames(chunk[0])

    # ------------------------------------------------------------------------ diffusers' convention
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        image: object | None = None,
        last_image: object | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        batch_cfg: bool = True,
        progress: bool = True,
        **settings: Unpack[SettingsArgs],
    ) -> VideoPipelineOutput | tuple[Any]:
        """Generate as diffusers' `WanPipeline` is called: `pipe(prompt=..., num_inference_steps=...,
        guidance_scale=..., generator=..., output_type="np")` returns an object whose `.frames` holds the
        videos, one per prompt and `num_videos_per_prompt`, in that order: "np" [B, F, H, W, 3] float32 in
        [0, 1], "pt" [B, F, 3, H, W], "pil" B lists of F images, "latent" [B, z, T, h, w]
        (`wan.video_output`); `return_dict=False` gives the tuple `(frames,)`.

        The noise is drawn as diffusers draws it: from `generator` (one, or one per video), else from
        torch's global generator; `latents` [B, z, T, h, w] replaces it. With the same weights, a CPU
        `generator=torch.Generator().manual_seed(s)` gives the video `generate(..., seed=s)` gives.
        Other settings take the platform's names (`shift=`, `solver=`, ...).

        Where this differs from diffusers: unset values come from the preset (`size`, `frame_num`,
        `steps`, `guide_scale`: for 1.3B 832x480, 81 frames, 50 steps, 5.0, as officially); an unset or
        empty `negative_prompt` is the official default negative prompt (diffusers: ""); image-to-video
        takes `image=` (one for all prompts, or one per prompt), and `height` x `width` is the largest
        area, the video taking the image's aspect ratio within it.
        """
        from wan.video_output import VideoPipelineOutput, check_output_type, frames_as

        check_output_type(output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or num_videos_per_prompt < 1:
            raise ValueError("give at least one prompt and num_videos_per_prompt >= 1")
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]  # p0, p0, p1, p1, ...
        given: dict[str, Any] = dict(settings)
        diffusers_names = {
            "num_frames": ("frame_num", num_frames),
            "num_inference_steps": ("steps", num_inference_steps),
            "guidance_scale": ("guide_scale", guidance_scale),
        }
        for diffusers_name, (name, value) in diffusers_names.items():
            ours = platform_names(given).get(name)
            if value is not None and ours is not None and ours != value:
                raise ValueError(f"{diffusers_name}={value!r} contradicts {name}={ours!r}: give one of them")
            if value is not None:
                given[name] = value
        if negative_prompt is not None:
            given["negative_prompt"] = _one_negative(negative_prompt)
        if height is not None or width is not None:
            default_w, default_h = self.preset.sampling.size
            given["size"] = (width or default_w, height or default_h)
        resolved = self.settings(**given)
        images = _per_video(image, len(prompts), num_videos_per_prompt, "image")
        lasts = _per_video(last_image, len(prompts), num_videos_per_prompt, "last_image")
        conditions = self._conditions(len(prompts), resolved, images, lasts)
        out = self.sample_latents(
            prompts, None, resolved, conditions=conditions, batch_cfg=batch_cfg, progress=progress,
            noise=lambda shape: _draw_noise(len(prompts), shape, generator, latents),
        )  # fmt: skip
        if output_type == "latent":
            frames: Any = out
        else:
            with torch.no_grad(), self.resident(self.vae):
                frames = frames_as(self.vae.decode(out, self.memory.vae_tiling), output_type)
        return VideoPipelineOutput(frames=frames) if return_dict else (frames,)


def _one_negative(negative_prompt: str | Sequence[str] | None) -> str | None:
    """One negative prompt for the batch (a list must repeat one text)."""
    if negative_prompt is None or isinstance(negative_prompt, str):
        return negative_prompt
    texts = set(negative_prompt)
    if len(texts) > 1:
        raise ValueError("negative_prompt: one text for the whole call (videos sampled together share it)")
    return texts.pop() if texts else None


def _per_video(image: object | None, n: int, per_prompt: int, name: str) -> list[object] | None:
    """`image` (one for every video, or a list with one per prompt) as a list with one per video."""
    if image is None:
        return None
    if not isinstance(image, list | tuple):
        return [image] * n
    if len(image) * per_prompt != n:
        raise ValueError(f"{name}: got {len(image)} for {n // per_prompt} prompts; give 1 or 1 per prompt")
    return [img for img in image for _ in range(per_prompt)]


def _draw_noise(
    n: int,
    shape: tuple[int, ...],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    latents: torch.Tensor | None,
) -> torch.Tensor:
    """Starting latents [n, *shape] float32, as diffusers draws them: `latents` as given; from one generator
    in one draw, or from one generator per video, on the generator's device; else torch's global RNG."""
    if latents is not None:
        if generator is not None:
            raise ValueError("give generator= or latents=, not both")
        return latents.float()
    if generator is None:
        return torch.randn((n, *shape), dtype=torch.float32)
    if isinstance(generator, torch.Generator):
        return torch.randn((n, *shape), generator=generator, device=generator.device, dtype=torch.float32)
    if len(generator) != n:
        raise ValueError(f"generator: got {len(generator)} for {n} videos; give one, or one per video")
    return torch.cat([torch.randn((1, *shape), generator=g, device=g.device, dtype=torch.float32).cpu()
                      for g in generator])  # fmt: skip


def _one_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype=` and diffusers' `torch_dtype=` name one setting: either, or both when they agree."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} contradicts torch_dtype={torch_dtype}: give one of them")
    return dtype or torch_dtype


def _random_image_encoder(preset: Preset, seed: int) -> torch.nn.Module:
    """A random-weight CLIP vision tower whose width matches the preset's DiT: tiny for the tiny presets,
    ViT-H/14 otherwise (benchmarks)."""
    from wan.image_encoder import WanImageEncoder, clip_vit_h14_config, tiny_clip_config

    width = preset.dit.image_dim
    config = tiny_clip_config(hidden_size=width) if preset.name.startswith("tiny-") else clip_vit_h14_config()
    return WanImageEncoder.from_config(config, seed=seed)
