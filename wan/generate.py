"""`python -m wan.generate`: one video from the command line, with the official `generate.py` flags.

    python -m wan.generate --task t2v-1.3B --size 832*480 --ckpt_dir ./Wan2.1-T2V-1.3B \\
        --prompt "Two cats boxing on a stage" --base_seed 42 --save_file cats.mp4
    python -m wan.generate --task tiny-t2v --prompt "a fox"      # random weights, no checkpoint

Writes an H.264 mp4 (yuv420p, 16 fps) with the ffmpeg binary that imageio-ffmpeg ships, streaming
decoded chunks into the encoder as they come.

Fast modes (not in the official script): `--lora FILE[:STRENGTH]` (repeat to stack LoRAs; diffusers,
ComfyUI and Kohya layouts), `--cache fbcache[:THRESHOLD]` or `--cache magcache[:THRESHOLD]` (step caching),
`--recipe few-step` (4 steps, no guidance: for step- and CFG-distilled LoRAs):

    python -m wan.generate --task t2v-14B --ckpt_dir ./Wan2.1-T2V-14B --recipe few-step \
        --lora ./wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors --prompt "..."

GPU memory, as the official flags: `--offload_model True` (models on the GPU only while they run),
`--t5_cpu` (the text encoder on the CPU), and `--vae_tiling [TILE:OVERLAP]` (tiled decode).

One video on several GPUs (or CPU processes, gloo), as the official flags:

    torchrun --nproc_per_node 8 -m wan.generate --task t2v-14B --ckpt_dir ./Wan2.1-T2V-14B \
        --ulysses_size 4 --ring_size 1 --cfg_parallel --dit_zero3 --t5_zero3 --prompt "..."

`--ulysses_size x --ring_size` (x 2 with `--cfg_parallel`) must equal the number of processes; ZeRO-3
alone (no layout flags) shards the weights while every process runs the whole forward. With several
processes and none of these flags, a layout is chosen (CFG halves, then Ulysses, then ring). Rank 0 writes
the video; every rank must be given the same arguments.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from wan.configs import PRESETS, get_preset, parse_size, validate_request
from wan.distributed.parallel import ParallelConfig, auto_config, init_distributed, local_device
from wan.fast_modes import RECIPES, CacheSetting, get_recipe, parse_lora_ref
from wan.pipeline import MemoryOptions, WanPipeline
from wan.weights import CheckpointError

__all__ = ["build_parser", "main", "parallel_config", "write_mp4"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default said once: in its help text when that says it, else appended when there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


class Unsupported(Exception):
    """An official `generate.py` flag or task that wanflow does not implement: refused in one line."""


# Official flags with no counterpart here, and why (each is refused in one line, not by argparse's usage).
UNSUPPORTED_FLAGS = {
    "--use_prompt_extend": "prompt extension (it needs a separate Qwen or DashScope model)",
    "--prompt_extend_method": "prompt extension (it needs a separate Qwen or DashScope model)",
    "--prompt_extend_model": "prompt extension (it needs a separate Qwen or DashScope model)",
    "--prompt_extend_target_lang": "prompt extension (it needs a separate Qwen or DashScope model)",
    "--src_video": "VACE video editing (the vace-* tasks)",
    "--src_mask": "VACE video editing (the vace-* tasks)",
    "--src_ref_images": "VACE video editing (the vace-* tasks)",
}
UNSUPPORTED_TASKS = {
    "t2i-14B": "text-to-image (t2i-14B) is not supported",
    "vace-1.3B": "VACE video editing (vace-1.3B) is not supported",
    "vace-14B": "VACE video editing (vace-14B) is not supported",
}  # fmt: skip
# Task names of the official script that stand for one of two presets here: the size decides.
TASK_BY_AREA = {"i2v-14B": (832 * 480, "i2v-14B-480P", "i2v-14B-720P")}
# A prompt for each kind of task when none is given (the official script has one per task too).
DEFAULT_PROMPTS = {
    "t2v": "A red fox trots through fresh snow at dawn, its breath steaming in the cold light.",
    "i2v": "The scene comes alive: a gentle breeze, soft light moving across it, the camera pushing in.",
    "flf2v": "A smooth, continuous shot that moves from the first frame to the last.",
}


class _Refuse(argparse.Action):
    """An official flag that wanflow does not implement: says so in one line (`Unsupported`)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        flag = (option_string or self.dest).replace("-", "_").replace("__", "--", 1)
        raise Unsupported(f"{flag} is not supported: wanflow does not implement {UNSUPPORTED_FLAGS[flag]}")


def _task(value: str) -> str:
    if value in UNSUPPORTED_TASKS:
        raise Unsupported(f"--task {value}: {UNSUPPORTED_TASKS[value]}")
    return value


def _add(parser: Any, *flags: str, **options: Any) -> argparse.Action:
    """`parser.add_argument` with every flag also spelled with dashes (`--ckpt_dir` and `--ckpt-dir`: the
    official script's spelling first, then wanflow's); the platform's names (`--steps` for the official
    `--sample_steps`) come as further flags."""
    spelled = [*flags, *(f.replace("_", "-") for f in flags if f.startswith("--") and "_" in f)]
    return parser.add_argument(*dict.fromkeys(spelled), **options)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wan.generate",
        description="Generate one video with Wan 2.1.",
        formatter_class=_HelpFormatter,
    )
    _add(p, "--task", default="t2v-14B", type=_task, choices=sorted([*PRESETS, *TASK_BY_AREA]),
         help="model preset (i2v-14B: the 480P or 720P one, by --size)")  # fmt: skip
    _add(p, "--size", default=None, help="W*H, for instance 832*480 (default: the task's)")
    _add(p, "--frame_num", type=int, default=None, help="frames, 4n+1 (default: the task's, 81)")
    _add(p, "--ckpt_dir", default=None, help="official or -Diffusers checkpoint directory")
    _add(p, "--prompt", default=None, help="what the video shows (default: an example prompt for the task)")
    _add(p, "--negative_prompt", default="", help="empty: the official default negative prompt")
    _add(p, "--base_seed", type=int, default=-1, help="-1 picks a random seed")
    _add(p, "--sample_solver", "--solver", default=None, choices=["unipc", "dpm++", "euler"],
         help="sampler (default: the task's, unipc)")  # fmt: skip
    _add(p, "--sample_steps", "--steps", type=int, default=None, help="sampling steps (default: the task's)")
    _add(p, "--sample_shift", "--shift", type=float, default=None,
         help="noise schedule shift (default: the task's for the size)")  # fmt: skip
    _add(p, "--sample_guide_scale", "--guide_scale", type=float, default=None,
         help="classifier-free guidance scale (default: the task's)")  # fmt: skip
    _add(p, "--save_file", default=None, help="output .mp4 (default: a name from task, size, seed)")
    _add(p, "--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    _add(p, "--dtype", default=None, choices=sorted(_DTYPES),
         help="DiT dtype (default bf16 on GPU); under fp16 the text encoder runs in bf16 (umT5 "
              "overflows in fp16)")  # fmt: skip
    _add(p, "--fps", type=int, default=None, help="output frame rate (default 16)")
    _add(p, "--image", default=None, help="image-to-video: the image to animate")
    _add(p, "--first_frame", default=None, help="first-last-frame-to-video: the first frame")
    _add(p, "--last_frame", default=None, help="first-last-frame-to-video: the last frame")
    _add(p, "--compile", action="store_true", help="torch.compile the DiT blocks (slower first step)")
    f = p.add_argument_group("fast modes")
    _add(f, "--lora", action="append", default=None, metavar="FILE[:STRENGTH]",
         help="merge a LoRA .safetensors into the DiT (default strength 1); repeat to stack")  # fmt: skip
    _add(f, "--cache", default=None, metavar="KIND[:THRESHOLD]",
         help="step cache: fbcache (first-block, default 0.05) or magcache (default 0.12)")  # fmt: skip
    _add(f, "--recipe", default=None, choices=sorted(RECIPES),
         help="sampling settings for distilled LoRAs (few-step: 4 steps, guidance 1, shift 5, euler); "
              "--steps, --guide_scale, ... still win")  # fmt: skip
    m = p.add_argument_group("GPU memory")
    _add(m, "--offload_model", nargs="?", const=True, default=None, type=_flag, metavar="BOOL",
         help="keep models on the CPU, each on the GPU only while it runs (default: True for one "
              "process, False under torchrun, as the official script)")  # fmt: skip
    _add(m, "--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    _add(m, "--vae_tiling", nargs="?", const="on", default=None, metavar="TILE:OVERLAP",
                   help="decode in overlapping spatial tiles (latent cells; default 32:8)")  # fmt: skip
    g = p.add_argument_group("several processes (torchrun --nproc_per_node N)")
    _add(g, "--ulysses_size", type=int, default=None, help="Ulysses (all-to-all) group size")
    _add(g, "--ring_size", type=int, default=None, help="ring-attention group size")
    _add(g, "--cfg_parallel", action="store_true", help="conditional and unconditional passes on "
                   "separate halves of the processes")  # fmt: skip
    _add(g, "--dit_zero3", action="store_true", help="shard the DiT's weights (DeepSpeed ZeRO-3)")
    _add(g, "--t5_zero3", action="store_true", help="shard the text encoder's weights (ZeRO-3)")
    _add(g, "--deepspeed_config", default=None, help="DeepSpeed JSON for ZeRO-3 (default: built in; "
                   "infra/deepspeed/zero3-inference.json is the tuned one)")  # fmt: skip
    _add(g, "--dit_fsdp", action="store_true", help="the official FSDP flag: runs as --dit_zero3")
    _add(g, "--t5_fsdp", action="store_true", help="the official FSDP flag: runs as --t5_zero3")
    u = p.add_argument_group("official flags refused (one line says why)")
    for flag in UNSUPPORTED_FLAGS:
        _add(u, flag, nargs="?", action=_Refuse, help=argparse.SUPPRESS)
    return p


def _flag(value: str) -> bool:
    """'True' / 'False' (and yes/no, 1/0), as the official command's boolean options take."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def parallel_config(args: argparse.Namespace, world_size: int, num_heads: int) -> ParallelConfig | None:
    """The layout the flags ask for, checked against `world_size` processes (None: one plain process)."""
    zero3 = dict(dit_zero3=args.dit_zero3, t5_zero3=args.t5_zero3, deepspeed_config=args.deepspeed_config)
    chosen = args.ulysses_size is not None or args.ring_size is not None or args.cfg_parallel
    if world_size == 1 and not (chosen or args.dit_zero3 or args.t5_zero3):
        return None
    if chosen or args.dit_zero3 or args.t5_zero3:
        config = ParallelConfig(args.ulysses_size or 1, args.ring_size or 1, args.cfg_parallel, **zero3)
    else:
        config = auto_config(world_size, num_heads, **zero3)
    config.validate(world_size, num_heads)
    return config


def write_mp4(frames: Iterable[torch.Tensor], path: Path, size: tuple[int, int], fps: int) -> int:
    """Encode uint8 chunks [n, H, W, 3] to H.264 yuv420p at `path`; returns the number of frames.

    The file appears at `path` only when complete: it is written beside it and renamed at the end.
    """
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial.mp4")
    try:
        count = _encode(frames, partial, size, fps)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return count


def _encode(frames: Iterable[torch.Tensor], path: Path, size: tuple[int, int], fps: int) -> int:
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(
        str(path),
        size,
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        output_params=["-crf", "18"],
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    writer.send(None)
    count = 0
    try:
        for chunk in frames:
            for frame in chunk.numpy():
                writer.send(frame)
                count += 1
    finally:
        writer.close()
    return count


def _images(args: argparse.Namespace, task: str) -> tuple[object | None, object | None]:
    """The input images the task needs, read and decoded up front (before loading weights)."""
    given = {"--image": args.image, "--first_frame": args.first_frame, "--last_frame": args.last_frame}
    wanted = {"t2v": (), "i2v": ("--image",), "flf2v": ("--first_frame", "--last_frame")}[task]
    extra = [flag for flag, value in given.items() if value is not None and flag not in wanted]
    if extra:
        raise ValueError(f"--task {args.task} takes no {' or '.join(extra)}"
                         + (f" (it needs {' and '.join(wanted)})" if wanted else ""))  # fmt: skip
    missing = [flag for flag in wanted if given[flag] is None]
    if missing:
        raise ValueError(f"--task {args.task} needs {' and '.join(missing)}")
    first, last, *_ = [*(_read_image(flag, given[flag]) for flag in wanted), None, None]
    return first, last


def _read_image(flag: str, path: str) -> object:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{flag} {path}: cannot read the image ({exc})") from None


def _default_name(task: str, size: tuple[int, int], seed: int, prompt: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40] or "video"
    return f"{task}_{size[0]}x{size[1]}_s{seed}_{slug}.mp4"


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, file=sys.stderr)


def _shared_seed(seed: int, world_size: int) -> int:
    """Rank 0's seed on every rank (a random one is drawn per process)."""
    if world_size == 1:
        return seed
    import torch.distributed as dist

    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _official_flags(args: argparse.Namespace, world_size: int) -> list[str]:
    """Turn the official script's flags into ours (in place); the lines that say what was done."""
    said = []
    if args.task in TASK_BY_AREA:
        limit, small, large = TASK_BY_AREA[args.task]
        width, height = parse_size(args.size) if args.size else (1280, 720)  # the official default size
        chosen = small if width * height <= limit else large
        said.append(f"[wan] --task {args.task} at {width}*{height}: {chosen}")
        args.task = chosen
    for fsdp, zero3 in (("dit_fsdp", "dit_zero3"), ("t5_fsdp", "t5_zero3")):
        if getattr(args, fsdp):
            setattr(args, zero3, True)
            said.append(f"[wan] --{fsdp} runs as DeepSpeed ZeRO-3 (--{zero3}): the weights are sharded alike")
    if args.offload_model is None:
        args.offload_model = world_size == 1  # the official default
    return said


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except Unsupported as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank, world_size = init_distributed()
    for line in _official_flags(args, world_size):
        _say(rank, line)
    preset = get_preset(args.task)
    try:
        if args.prompt is None:
            args.prompt = DEFAULT_PROMPTS[preset.task]
            _say(rank, f"[wan] no --prompt: using the example prompt {args.prompt!r}")
        if args.ckpt_dir is None and not preset.tiny:
            raise ValueError(
                f"--ckpt_dir is required for {args.task} (use --task tiny-t2v for random weights)"
            )
        image, last_image = _images(args, preset.task)
        size = parse_size(args.size) if args.size else preset.sampling.size
        _apply_recipe(args)
        cache = CacheSetting.parse(args.cache)
        loras = [parse_lora_ref(value) for value in args.lora or ()]
        for ref in loras:
            if not Path(ref.uri).is_file():
                raise ValueError(f"--lora {ref.uri}: no such file")
        # Refuse a bad size, frame count or layout before loading (possibly 14B of) weights.
        frame_num = preset.sampling.frame_num if args.frame_num is None else args.frame_num
        steps = preset.sampling.steps if args.sample_steps is None else args.sample_steps
        validate_request(preset, size, frame_num, steps)
        layout = parallel_config(args, world_size, preset.dit.num_heads)
        if layout is not None and layout.zero3:
            from wan.distributed.zero3 import load_config

            load_config(layout.deepspeed_config)
        memory = MemoryOptions.parse(args.offload_model, args.t5_cpu, args.vae_tiling)
        if layout is not None and layout.zero3 and args.compile:
            raise ValueError("--compile cannot be combined with --dit_zero3 / --t5_zero3 (ZeRO-3 gathers "
                             "weights in hooks that compiled blocks would trace)")  # fmt: skip
        if layout is not None and layout.ulysses_size * layout.ring_size > 1 and args.compile:
            raise ValueError("--compile cannot be combined with --ulysses_size / --ring_size (the sequence-"
                             "sharded self-attention breaks every compiled block's graph); compile on one "
                             "process or with --cfg_parallel alone")  # fmt: skip
        if layout is not None and layout.zero3 and memory.offload_model:
            raise ValueError("--offload_model cannot be combined with --dit_zero3 / --t5_zero3 (ZeRO-3 "
                             "already keeps 1/N of the weights per GPU)")  # fmt: skip
        device = torch.device(args.device) if args.device else (local_device() if world_size > 1 else None)
        dtype = _DTYPES[args.dtype] if args.dtype else None
        seed = args.base_seed if args.base_seed >= 0 else random.randint(0, 2**63 - 1)
        seed = _shared_seed(seed, world_size)

        # ZeRO-3 parts stay on the CPU until sharded onto the GPUs, a parameter at a time.
        defer = [] if layout is None else layout.zero3_parts
        start = time.perf_counter()
        if args.ckpt_dir is None:
            _say(rank, f"[wan] {args.task}: no --ckpt_dir, using RANDOM weights (the video is noise-like)")
            pipe = WanPipeline.from_config(
                args.task, seed=0, device=device, dtype=dtype, memory=memory, defer=defer
            )
        else:
            pipe = WanPipeline.from_pretrained(
                args.ckpt_dir, task=args.task, device=device, dtype=dtype, memory=memory, defer=defer
            )
        if loras:  # merged before compiling and sharding: the DiT's weights are final from here
            from wan.lora import LoraSet, read_lora

            pipe.use_loras(LoraSet.of(*((read_lora(ref.uri), ref.strength) for ref in loras)))
            _say(rank, "[wan] LoRAs merged: " + ", ".join(str(ref) for ref in loras))
        if args.compile:
            if cache is not None:
                raise ValueError("--cache cannot be combined with --compile yet (the cache wraps the blocks "
                                 "that --compile compiles)")  # fmt: skip
            pipe.dit.compile_blocks()
        if layout is not None:
            pipe.parallelize(layout)
            _say(rank, f"[wan] {world_size} processes: ulysses {layout.ulysses_size} x ring "
                       f"{layout.ring_size} x cfg {layout.cfg_size}, ZeRO-3 dit {layout.dit_zero3} "
                       f"t5 {layout.t5_zero3}")  # fmt: skip
        _say(rank, f"[wan] loaded {pipe.source} on {pipe.device} ({pipe.dtype}) "
                   f"in {time.perf_counter() - start:.1f}s")  # fmt: skip
        settings = dict(
            negative_prompt=args.negative_prompt,
            size=size,
            frame_num=args.frame_num,
            steps=args.sample_steps,
            shift=args.sample_shift,
            guide_scale=args.sample_guide_scale,
            solver=args.sample_solver,
            cache=cache,
        )
        resolved = pipe.settings(**settings)  # validate before any work
        video_size = pipe.video_size(resolved, image)  # image-to-video: the image's aspect ratio
        out = Path(args.save_file or _default_name(args.task, video_size, seed, args.prompt))
        start = time.perf_counter()
        frames = 0
        stream = pipe.generate_stream(args.prompt, seed=seed, image=image, last_image=last_image, **settings)
        if pipe.is_writer:
            out.parent.mkdir(parents=True, exist_ok=True)
            frames = write_mp4(stream, out, video_size, args.fps or preset.sampling.fps)
        else:
            for _ in stream:  # samples with the others; rank 0 decodes and writes
                pass
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}" if world_size == 1 else f"error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    seconds = time.perf_counter() - start
    counts = pipe.last_cache_counts
    cached = f", {resolved.cache}: {counts.skipped} of {counts.forwards} forwards skipped" if counts else ""
    _say(rank, f"[wan] seed {seed}: {frames} frames {video_size[0]}x{video_size[1]}, "
               f"{resolved.steps} {resolved.solver} steps{cached}, {seconds:.1f}s -> {out}")  # fmt: skip
    return 0


def _apply_recipe(args: argparse.Namespace) -> None:
    """--recipe fills the sampling flags left unset (steps, guide scale, shift, solver)."""
    if args.recipe is None:
        return
    recipe = get_recipe(args.recipe)
    for flag, value in (("sample_steps", recipe.steps), ("sample_guide_scale", recipe.guide_scale),
                        ("sample_shift", recipe.shift), ("sample_solver", recipe.solver)):  # fmt: skip
        if getattr(args, flag) is None:
            setattr(args, flag, value)


if __name__ == "__main__":
    sys.exit(main())
