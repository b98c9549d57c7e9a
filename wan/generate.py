"""`python -m wan.generate`: one video from the command line, with the official `generate.py` flags.

    python -m wan.generate --task t2v-1.3B --size 832*480 --ckpt_dir ./Wan2.1-T2V-1.3B \\
        --prompt "Two cats boxing on a stage" --base_seed 42 --save_file cats.mp4
    python -m wan.generate --task tiny-t2v --prompt "a fox"      # random weights, no checkpoint

Writes an H.264 mp4 (yuv420p, 16 fps) with the ffmpeg binary that imageio-ffmpeg ships, streaming
decoded chunks into the encoder as they come.
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

import torch

from wan.configs import PRESETS, get_preset, parse_size, validate_request
from wan.pipeline import WanPipeline
from wan.weights import CheckpointError

__all__ = ["build_parser", "main", "write_mp4"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wan.generate",
        description="Generate one video with Wan 2.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default="t2v-14B", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--size", default=None, help="W*H, for instance 832*480 (default: the task's)")
    p.add_argument("--frame_num", type=int, default=None, help="frames, 4n+1 (default: the task's, 81)")
    p.add_argument("--ckpt_dir", default=None, help="official or -Diffusers checkpoint directory")
    p.add_argument("--prompt", default=None, help="what the video shows")
    p.add_argument("--negative_prompt", default="", help="empty: the official default negative prompt")
    p.add_argument("--base_seed", type=int, default=-1, help="-1 picks a random seed")
    p.add_argument("--sample_solver", default=None, choices=["unipc", "dpm++", "euler"])
    p.add_argument("--sample_steps", type=int, default=None)
    p.add_argument("--sample_shift", type=float, default=None)
    p.add_argument("--sample_guide_scale", type=float, default=None)
    p.add_argument("--save_file", default=None, help="output .mp4 (default: a name from task, size, seed)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="DiT dtype (default bf16 on GPU)")
    p.add_argument("--fps", type=int, default=None, help="output frame rate (default 16)")
    p.add_argument("--image", default=None, help="image-to-video: the image to animate")
    p.add_argument("--first_frame", default=None, help="first-last-frame-to-video: the first frame")
    p.add_argument("--last_frame", default=None, help="first-last-frame-to-video: the last frame")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = get_preset(args.task)
    try:
        if args.prompt is None:
            raise ValueError("--prompt is required")
        if args.ckpt_dir is None and not preset.tiny:
            raise ValueError(
                f"--ckpt_dir is required for {args.task} (use --task tiny-t2v for random weights)"
            )
        image, last_image = _images(args, preset.task)
        size = parse_size(args.size) if args.size else preset.sampling.size
        # Refuse a bad size or frame count before loading (possibly 14B of) weights.
        frame_num = preset.sampling.frame_num if args.frame_num is None else args.frame_num
        steps = preset.sampling.steps if args.sample_steps is None else args.sample_steps
        validate_request(preset, size, frame_num, steps)
        device = torch.device(args.device) if args.device else None
        dtype = _DTYPES[args.dtype] if args.dtype else None
        seed = args.base_seed if args.base_seed >= 0 else random.randint(0, 2**63 - 1)

        start = time.perf_counter()
        if args.ckpt_dir is None:
            print(
                f"[wan] {args.task}: no --ckpt_dir, using RANDOM weights (the video is noise-like)",
                file=sys.stderr,
            )
            pipe = WanPipeline.from_config(args.task, seed=0, device=device, dtype=dtype)
        else:
            pipe = WanPipeline.from_pretrained(args.ckpt_dir, task=args.task, device=device, dtype=dtype)
        print(
            f"[wan] loaded {pipe.source} on {pipe.device} ({pipe.dtype}) "
            f"in {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
        )
        settings = dict(
            negative_prompt=args.negative_prompt,
            size=size,
            frame_num=args.frame_num,
            sampling_steps=args.sample_steps,
            shift=args.sample_shift,
            guide_scale=args.sample_guide_scale,
            sample_solver=args.sample_solver,
        )
        resolved = pipe.settings(**settings)  # validate before any work
        video_size = pipe.video_size(resolved, image)  # image-to-video: the image's aspect ratio
        out = Path(args.save_file or _default_name(args.task, video_size, seed, args.prompt))
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        frames = write_mp4(
            pipe.generate_stream(args.prompt, seed=seed, image=image, last_image=last_image, **settings),
            out,
            video_size,
            args.fps or preset.sampling.fps,
        )
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"[wan] seed {seed}: {frames} frames {video_size[0]}x{video_size[1]}, "
        f"{resolved.steps} {resolved.solver} steps, {time.perf_counter() - start:.1f}s -> {out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
