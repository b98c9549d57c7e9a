"""`python -m wan.generate`: writes a playable H.264 mp4; bad flags fail with a clear message."""

from __future__ import annotations

import subprocess
import sys

import imageio_ffmpeg
import pytest

from wan.generate import main

TINY = [
    "--task",
    "tiny-t2v",
    "--size",
    "64*48",
    "--sample_steps",
    "2",
    "--prompt",
    "a fox",
    "--base_seed",
    "3",
]


def test_writes_an_mp4_with_every_frame(tmp_path, capsys):
    out = tmp_path / "videos" / "fox.mp4"
    assert main([*TINY, "--frame_num", "9", "--save_file", str(out)]) == 0
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 9
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and "seed 3: 9 frames 64x48" in err
    assert [p.name for p in out.parent.iterdir()] == ["fox.mp4"]  # no partial file left behind


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--frame_num", "8"], "frame_num 8: must be of the form 4n+1"),
        (["--size", "50*48"], "size 50*48: width and height must be positive multiples of 16"),
        (["--task", "t2v-1.3B"], "--ckpt_dir is required for t2v-1.3B"),
        (["--ckpt_dir", "/nonexistent/wan"], "/nonexistent/wan: checkpoint directory not found"),
    ],
)
def test_bad_flags_exit_2_with_a_message(tmp_path, capsys, flags, message):
    out = tmp_path / "x.mp4"
    assert main([*TINY, *flags, "--save_file", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_task_is_refused_by_the_parser():
    proc = subprocess.run(
        [sys.executable, "-m", "wan.generate", "--task", "t2v-2B", "--prompt", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid choice: 't2v-2B'" in proc.stderr


def _png(path, width=96, height=64):
    from PIL import Image

    Image.new("RGB", (width, height), (120, 40, 200)).save(path)
    return str(path)


def test_image_to_video_and_first_last_frame(tmp_path, capsys):
    image = _png(tmp_path / "in.png")
    tiny = [f if f != "tiny-t2v" else "tiny-i2v" for f in TINY]
    out = tmp_path / "i2v.mp4"
    assert main([*tiny, "--frame_num", "5", "--image", image, "--save_file", str(out)]) == 0
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 5
    assert "5 frames 64x32" in capsys.readouterr().err  # 96x64 within 64*48: the image's 3:2 aspect
    flf = [f if f != "tiny-t2v" else "tiny-flf2v" for f in TINY]
    out = tmp_path / "flf.mp4"
    flags = ["--frame_num", "5", "--first_frame", image, "--last_frame", _png(tmp_path / "b.png")]
    assert main([*flf, *flags, "--save_file", str(out)]) == 0
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 5


@pytest.mark.parametrize(
    ("task", "flags", "message"),
    [
        ("tiny-i2v", [], "--task tiny-i2v needs --image"),
        ("tiny-t2v", ["--image", "IMG"], "--task tiny-t2v takes no --image"),
        ("tiny-flf2v", ["--first_frame", "IMG"], "--task tiny-flf2v needs --last_frame"),
        ("tiny-i2v", ["--image", "BROKEN"], "cannot read the image"),
    ],
)
def test_image_flags_are_checked_before_loading(tmp_path, capsys, task, flags, message):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    flags = [{"IMG": _png(tmp_path / "ok.png"), "BROKEN": str(broken)}.get(f, f) for f in flags]
    tiny = [f if f != "tiny-t2v" else task for f in TINY]
    assert main([*tiny, *flags, "--save_file", str(tmp_path / "x.mp4")]) == 2
    assert message in capsys.readouterr().err


# Every flag of the official `generate.py` (Wan-Video/Wan2.1), with a value it takes.
OFFICIAL_FLAGS = {
    "--task": "t2v-1.3B", "--size": "832*480", "--frame_num": "81", "--ckpt_dir": "/ckpt",
    "--offload_model": "True", "--ulysses_size": "1", "--ring_size": "1", "--t5_fsdp": None, "--t5_cpu": None,
    "--dit_fsdp": None, "--save_file": "x.mp4", "--src_video": "v.mp4", "--src_mask": "m.mp4",
    "--src_ref_images": "a.png,b.png", "--prompt": "a fox", "--use_prompt_extend": None,
    "--prompt_extend_method": "local_qwen", "--prompt_extend_model": "Qwen",
    "--prompt_extend_target_lang": "zh", "--base_seed": "7", "--image": "cat.png", "--first_frame": "a.png",
    "--last_frame": "b.png", "--sample_solver": "unipc", "--sample_steps": "50", "--sample_shift": "5.0",
    "--sample_guide_scale": "5.0",
}  # fmt: skip


@pytest.mark.parametrize("flag", list(OFFICIAL_FLAGS))
def test_every_official_flag_is_taken_or_refused_in_one_line(flag):
    from wan.generate import UNSUPPORTED_FLAGS, Unsupported, build_parser

    value = OFFICIAL_FLAGS[flag]
    argv = [flag] if value is None else [flag, value]
    if flag in UNSUPPORTED_FLAGS:
        with pytest.raises(Unsupported, match=f"^{flag} is not supported: wanflow does not implement .+"):
            build_parser().parse_args(argv)
    else:
        build_parser().parse_args(argv)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--use_prompt_extend"], "error: --use_prompt_extend is not supported: wanflow does not implement"),
        (["--src-video", "v.mp4"], "error: --src_video is not supported"),
        (["--task", "t2i-14B"], "error: --task t2i-14B: text-to-image (t2i-14B) is not supported"),
        (["--task", "vace-1.3B"], "error: --task vace-1.3B: VACE video editing (vace-1.3B) is not supported"),
    ],
)
def test_unsupported_official_flags_and_tasks_end_in_one_line(capsys, flags, message):
    assert main([*flags, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_official_task_names_and_fsdp_flags_are_mapped(capsys):
    from wan.generate import _official_flags, build_parser

    args = build_parser().parse_args(["--task", "i2v-14B", "--size", "832*480", "--dit_fsdp", "--t5_fsdp"])
    said = _official_flags(args, world_size=2)
    assert args.task == "i2v-14B-480P" and args.dit_zero3 and args.t5_zero3
    assert args.offload_model is False  # the official default under torchrun
    assert any("--dit_fsdp runs as DeepSpeed ZeRO-3" in line for line in said)
    args = build_parser().parse_args(["--task", "i2v-14B"])  # the official default size, 1280*720
    _official_flags(args, world_size=1)
    assert args.task == "i2v-14B-720P" and args.offload_model is True  # one process: offload, as officially
    assert main(["--task", "i2v-14B", "--size", "480*832", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--task i2v-14B at 480*832: i2v-14B-480P" in err
    assert "--ckpt_dir is required for i2v-14B-480P" in err


def test_a_run_without_a_prompt_uses_the_tasks_example(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    argv = [a for a in TINY if a not in ("--prompt", "a fox")]
    assert main([*argv, "--frame_num", "5", "--save_file", str(out)]) == 0
    assert "no --prompt: using the example prompt" in capsys.readouterr().err and out.is_file()


def test_fast_mode_flags_lora_cache_and_recipe(tmp_path, capsys):
    from safetensors.torch import save_file

    from wan.configs import RANDOM_WEIGHTS_SEED
    from wan.lora import random_lora_state_dict
    from wan.pipeline import WanPipeline

    dit = WanPipeline.from_config("tiny-t2v", seed=RANDOM_WEIGHTS_SEED, device="cpu").dit
    lora = tmp_path / "style.safetensors"
    save_file(random_lora_state_dict(dit, seed=1), str(lora))
    out = tmp_path / "fast.mp4"
    flags = ["--lora", f"{lora}:0.8", "--cache", "fbcache:0.5", "--recipe", "few-step", "--frame_num", "5"]
    base = ["--task", "tiny-t2v", "--size", "64*48", "--prompt", "a fox"]  # no --sample_steps: the recipe's
    assert main([*base, *flags, "--save_file", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"LoRAs merged: {lora}:0.8" in err
    assert "4 euler steps, fbcache:0.5: " in err and "of 4 forwards skipped" in err  # the recipe's 4 steps
    assert out.is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cache", "teacache"], "cache kind 'teacache': expected one of fbcache, magcache"),
        (["--lora", "/nonexistent/x.safetensors"], "--lora /nonexistent/x.safetensors: no such file"),
        (["--lora", "x.safetensors:50"], "LoRA strength 50: expected a number from -10 to 10"),
    ],
)
def test_bad_fast_mode_flags_exit_2(tmp_path, capsys, flags, message):
    assert main([*TINY, *flags, "--save_file", str(tmp_path / "x.mp4")]) == 2
    assert message in capsys.readouterr().err
