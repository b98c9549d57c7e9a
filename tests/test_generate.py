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
