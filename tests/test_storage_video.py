"""storage.video: frames -> ffmpeg -> objects published atomically, on a local disk and on S3.

S3 is moto's threaded server on 127.0.0.1 (one per module, reset before each test; the outage test
starts its own). Every fault must leave nothing at the final key, no temporary object beside it and no
open multipart upload, and a retry must then succeed.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import imageio_ffmpeg
import numpy as np
import pytest
import s3fs
import torch
from PIL import Image
from s3_server import BUCKET, SECRET, Target, s3_options, start_server, stop_server

from storage.faults import abort_open_uploads
from storage.video import (
    LABEL_HEIGHT,
    PART_SIZE,
    PermanentStorageError,
    StorageError,
    VideoWriteError,
    VideoWriter,
    contact_sheet,
    object_info,
    verify_object,
    write_bytes,
    write_image,
)

# A writer that leaks a half-discarded s3fs file prints a traceback from __del__: make that a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

W, H = 64, 48
BIG_W, BIG_H = 832, 480  # random frames at this size encode to about 0.7 MB each (crf 0, ultrafast)
# ---------------------------------------------------------------------------------------------- frames


def _smooth(n: int, height: int = H, width: int = W, start: int = 0) -> np.ndarray:
    """A moving colour pattern: uint8 [n, height, width, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    t = np.arange(start, start + n)[:, None, None]
    channels = [(x * 3 + 5 * t) % 256, (y * 4 + 3 * t) % 256, (x + y + 7 * t) % 256]
    return np.stack(channels, axis=-1).astype(np.uint8)


def _noise(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """Random frames [n, BIG_H, BIG_W, 3], the encoder's worst case: output grows fast."""
    return rng.integers(0, 256, (n, BIG_H, BIG_W, 3), dtype=np.uint8)


def _write_small(target: Target, name: str = "a/fox.mp4", n: int = 9) -> VideoWriter:
    with VideoWriter(target.url(name), width=W, height=H, storage_options=target.options) as writer:
        writer.write(_smooth(n))
    return writer


def _big_writer(target: Target, name: str = "a/fox.mp4") -> VideoWriter:
    return VideoWriter(target.url(name), width=BIG_W, height=BIG_H, storage_options=target.options, crf=0,
                       preset="ultrafast")  # fmt: skip


def _write_until_a_part_is_sent(writer: VideoWriter, rng: np.random.Generator) -> None:
    """Feed noise until more than one multipart part has left (the S3 upload is then under way)."""
    while writer.bytes_sent <= PART_SIZE:
        writer.write(_noise(rng))


def _frame_count(data: bytes, tmp_path: Path) -> int:
    path = tmp_path / "check.mp4"
    path.write_bytes(data)
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


# ----------------------------------------------------------------------------------------------- tests


def test_small_video_round_trips(target: Target, tmp_path: Path):
    frames = _smooth(9)
    url = target.url("a/fox.mp4")
    with VideoWriter(url, width=W, height=H, storage_options=target.options) as writer:
        writer.write(frames[:1])  # the VAE's first chunk is one frame, then four at a time
        writer.write(torch.from_numpy(frames[1:5]))
        writer.write(frames[5:])
    data = target.read("a/fox.mp4")
    assert (writer.frames, writer.codec, writer.url) == (9, "h264", url)
    assert writer.seconds > 0
    assert (writer.nbytes, writer.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert target.listing() == ["a/fox.mp4"]
    assert _frame_count(data, tmp_path) == 9
    decoded = imageio_ffmpeg.read_frames(str(tmp_path / "check.mp4"))
    next(decoded)  # metadata
    first = np.frombuffer(next(decoded), np.uint8).reshape(H, W, 3)
    assert np.abs(first.astype(int) - frames[0]).mean() < 12  # rgb order and orientation kept
    np.testing.assert_array_equal(writer.first_frame, frames[0])

    assert object_info(url, target.options) == writer.nbytes
    assert verify_object(url, writer.sha256, writer.nbytes, target.options)
    assert not verify_object(url, writer.sha256, writer.nbytes + 1, target.options)
    assert not verify_object(url, "0" * 64, writer.nbytes, target.options)
    target.put("a/fox.mp4", data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert not verify_object(url, writer.sha256, writer.nbytes, target.options)
    missing = target.url("a/none.mp4")
    assert object_info(missing, target.options) is None
    assert not verify_object(missing, writer.sha256, writer.nbytes, target.options)


def test_video_larger_than_one_part_is_complete(target: Target):
    rng = np.random.default_rng(0)
    with _big_writer(target) as writer:
        writer.write(_noise(rng, 4))
        writer.write(_noise(rng, 5))
    assert writer.nbytes > PART_SIZE
    assert object_info(target.url("a/fox.mp4"), target.options) == writer.nbytes
    assert hashlib.sha256(target.read("a/fox.mp4")).hexdigest() == writer.sha256
    assert target.listing() == ["a/fox.mp4"]
    if target.options:  # a multipart object's ETag ends with its part count
        assert target.fs.info(f"{BUCKET}/videos/a/fox.mp4")["ETag"].strip('"').endswith("-2")


def test_ffmpeg_killed_mid_stream(target: Target):
    rng = np.random.default_rng(1)
    with pytest.raises(VideoWriteError, match="SIGKILL") as err, _big_writer(target) as writer:
        _write_until_a_part_is_sent(writer, rng)
        writer.process.kill()
        writer.process.wait()
        writer.write(_noise(rng))
    assert target.url("a/fox.mp4") in str(err.value)
    assert err.value.returncode == -9
    assert (writer.sha256, writer.nbytes) == (None, None)
    assert target.listing() == []
    assert _write_small(target).nbytes == object_info(target.url("a/fox.mp4"), target.options)
    assert target.listing() == ["a/fox.mp4"]


def test_producer_error_propagates_unchanged(target: Target):
    rng = np.random.default_rng(2)
    boom = KeyError("the VAE ran out of memory")

    def chunks() -> Iterator[np.ndarray]:
        sent = 0
        while sent <= PART_SIZE:
            yield _noise(rng)
            sent = writer.bytes_sent
        raise boom

    with pytest.raises(KeyError) as err, _big_writer(target) as writer:
        for chunk in chunks():
            writer.write(chunk)
    assert err.value is boom
    assert writer.process.returncode is not None
    assert (writer.sha256, writer.nbytes) == (None, None)
    assert target.listing() == []
    _write_small(target)
    assert target.listing() == ["a/fox.mp4"]


@pytest.mark.integration
def test_s3_outage_mid_upload_then_retry(aws_env: None):
    server, port = start_server()
    options = s3_options(port)
    s3fs.S3FileSystem(**options).mkdir("outage")
    url = "s3://outage/run/fox.mp4"
    rng = np.random.default_rng(3)
    big = dict(width=BIG_W, height=BIG_H, crf=0, preset="ultrafast")
    with pytest.raises(StorageError, match="upload failed") as err, VideoWriter(url, storage_options=options,
                                                                                **big) as writer:  # fmt: skip
        _write_until_a_part_is_sent(writer, rng)
        stop_server(server)
        for _ in range(64):  # more than another part: the upload must notice the outage
            writer.write(_noise(rng))
    assert url in str(err.value) and SECRET not in str(err.value)
    assert writer.sha256 is None

    server, port = start_server()  # S3 is back (moto keeps its state in the process)
    try:
        restarted = Target("s3://outage/run", s3_options(port))
        # The abort could not reach the server: the upload is orphaned, but no object is visible.
        fs = restarted.fs
        assert fs.find("outage") == [] and len(fs.list_multipart_uploads("outage")) == 1
        assert abort_open_uploads("s3://outage/run", restarted.options) == 1  # as a re-planned run does
        assert fs.list_multipart_uploads("outage") == []
        retry = _write_small(restarted, "fox.mp4")
        assert verify_object(url, retry.sha256, retry.nbytes, restarted.options)
        assert restarted.fs.find("outage") == ["outage/run/fox.mp4"]
    finally:
        stop_server(server)


def test_ffmpeg_error_text_surfaces(tmp_path: Path):
    target = Target(str(tmp_path))
    bad = VideoWriter(target.url("x.mp4"), width=W, height=H, preset="nonsense")
    with pytest.raises(VideoWriteError, match="nonsense") as err, bad as writer:
        writer.write(_smooth(2))
    assert "exit code" in str(err.value) and err.value.returncode not in (0, None)
    assert "nonsense" in err.value.stderr
    assert target.listing() == []


def test_missing_ffmpeg_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = Target(str(tmp_path))
    with pytest.raises(VideoWriteError, match="/no/such/ffmpeg"):
        VideoWriter(target.url("x.mp4"), width=W, height=H, ffmpeg_binary="/no/such/ffmpeg")
    monkeypatch.setenv("WANFLOW_FFMPEG", "/no/such/env-ffmpeg")
    with pytest.raises(VideoWriteError, match="/no/such/env-ffmpeg"):
        VideoWriter(target.url("x.mp4"), width=W, height=H)
    assert target.listing() == []  # the temporary file opened first is gone again


def test_bad_frames_raise_value_error(tmp_path: Path):
    target = Target(str(tmp_path))
    with (
        pytest.raises(
            ValueError, match=r"expected uint8 frames \[n, 48, 64, 3\], got uint8 \[2, 48, 65, 3\]"
        ),
        VideoWriter(target.url("x.mp4"), width=W, height=H) as writer,
    ):
        writer.write(_smooth(1))
        writer.write(np.zeros((2, H, W + 1, 3), np.uint8))
    assert target.listing() == []
    with VideoWriter(target.url("y.mp4"), width=W, height=H) as writer:
        with pytest.raises(ValueError, match=r"got float32 \[1, 48, 64, 3\]"):
            writer.write(np.zeros((1, H, W, 3), np.float32))
        with pytest.raises(ValueError, match=r"got torch.bfloat16 \[1, 48, 64, 3\]"):
            writer.write(torch.zeros(1, H, W, 3, dtype=torch.bfloat16))
        writer.write(_smooth(1)[0])  # one frame [H, W, 3] is a chunk of one
    assert writer.frames == 1
    with pytest.raises(ValueError, match="even width and height"):
        VideoWriter(target.url("z.mp4"), width=65, height=48)
    with (
        pytest.raises(VideoWriteError, match="no frames"),
        VideoWriter(target.url("z.mp4"), width=W, height=H),
    ):
        pass
    assert target.listing() == ["y.mp4"]


def test_commit_and_abort_without_with(tmp_path: Path):
    target = Target(str(tmp_path))
    writer = VideoWriter(target.url("x.mp4"), width=W, height=H)
    writer.write(_smooth(3))
    writer.abort()
    writer.abort()  # a second abort is a no-op
    assert target.listing() == [] and writer.sha256 is None
    with pytest.raises(RuntimeError, match="already aborted"):
        writer.write(_smooth(1))
    writer = VideoWriter(target.url("x.mp4"), width=W, height=H)
    writer.write(_smooth(3))
    writer.commit()
    assert verify_object(target.url("x.mp4"), writer.sha256, writer.nbytes)
    with pytest.raises(RuntimeError, match="already committed"):
        writer.commit()


def test_local_root_under_a_regular_file(tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    url = f"file://{blocker}/run/x.mp4"
    with pytest.raises(PermanentStorageError, match="not a directory") as err:
        VideoWriter(url, width=W, height=H)
    assert str(blocker) in str(err.value) and isinstance(err.value, ValueError)  # a job fails at once
    with pytest.raises(PermanentStorageError, match="not-a-dir"):
        write_bytes(str(blocker / "x.json"), b"{}")
    with pytest.raises(PermanentStorageError, match="the destination is a directory"):
        write_bytes(str(tmp_path), b"{}")


def test_local_unwritable_root(tmp_path: Path):
    """A directory this process may not write to: a read-only one, or (as root, who may write anywhere
    on a normal filesystem) one in sysfs, where nobody can create files."""
    if os.geteuid() == 0:
        root = Path("/sys/kernel")
    else:
        root = tmp_path / "ro"
        root.mkdir(mode=0o555)
    with pytest.raises(PermanentStorageError, match=r"permission denied \((EACCES|EPERM)\)") as err:
        VideoWriter(str(root / "x.mp4"), width=W, height=H)
    assert str(root) in str(err.value) and "Permission denied" in str(err.value)
    assert isinstance(err.value, ValueError) and err.value.kind == "permission"


@pytest.mark.integration
def test_s3_missing_bucket(s3_target: Target):
    options = s3_target.options
    with pytest.raises(PermanentStorageError, match=r"s3://no-such-bucket/x\.mp4") as err:
        VideoWriter("s3://no-such-bucket/x.mp4", width=W, height=H, storage_options=options)
    with pytest.raises(PermanentStorageError, match=r"s3://no-such-bucket/x\.webp") as err_image:
        write_image("s3://no-such-bucket/x.webp", _smooth(1)[0], format="webp", storage_options=options)
    for error in (err.value, err_image.value):
        assert SECRET not in str(error) and "Not Found" in str(error)
        assert "bucket no-such-bucket does not exist" in str(error) and isinstance(error, ValueError)


@pytest.mark.parametrize("image_format", ["png", "webp"])
def test_write_image(target: Target, image_format: str):
    image = _smooth(1, height=96, width=128)[0]
    url = target.url(f"thumb.{image_format}")
    sha, size = write_image(url, image, format=image_format, storage_options=target.options, max_width=64)
    data = target.read(f"thumb.{image_format}")
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    with Image.open(io.BytesIO(data)) as decoded:
        assert (decoded.format, decoded.size, decoded.mode) == (image_format.upper(), (64, 48), "RGB")
    assert verify_object(url, sha, size, target.options)
    assert target.listing() == [f"thumb.{image_format}"]
    with pytest.raises(ValueError, match="uint8 image"):
        write_image(url, image.astype(np.float32), storage_options=target.options)


def test_write_bytes_through_the_generic_fallback():
    url = "memory://wanflow-test/run/fox.json"
    sha, size = write_bytes(url, b'{"seed": 1}')
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/wanflow-test/run/fox.json") == b'{"seed": 1}'
    assert verify_object(url, sha, size) and fs.ls("/wanflow-test/run", detail=False) == [
        "/wanflow-test/run/fox.json"
    ]
    with VideoWriter("memory://wanflow-test/run/fox.mp4", width=W, height=H) as writer:
        writer.write(_smooth(3))
    assert verify_object("memory://wanflow-test/run/fox.mp4", writer.sha256, writer.nbytes)
    assert len(fs.ls("/wanflow-test/run")) == 2
    fs.rm("/wanflow-test", recursive=True)


def test_contact_sheet_layout():
    frames = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(5)]
    sheet = contact_sheet(frames, columns=4, tile_width=32)
    assert sheet.shape == (2 * 24, 4 * 32, 3) and sheet.dtype == np.uint8
    assert sheet[:24, 32:64].mean() == 40 and sheet[24:, :32].mean() == 160
    assert sheet[24:, 32:].max() == 0  # empty slots stay black
    assert contact_sheet(frames[:2], columns=4, tile_width=32).shape == (24, 64, 3)


def test_labelled_contact_sheet_differs_only_in_its_label_strips():
    """The run's sheet labels each tile (item and seed) on a dark strip under it; the tiles stay as they were
    and a missing tile (the last row's gap) gets no strip."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (90, 160, 3), dtype=np.uint8) for _ in range(5)]
    plain = contact_sheet(frames, columns=3, tile_width=160)
    labels = ["fox-s1", "a-very-long-item-name-that-cannot-fit-s123456", "owl-s3", "cat-s4", "狐-s5"]
    labelled = contact_sheet(frames, columns=3, tile_width=160, labels=labels)
    tile_h, row_h = 90, 90 + LABEL_HEIGHT
    assert plain.shape == (2 * tile_h, 3 * 160, 3)
    assert labelled.shape == (2 * row_h, 3 * 160, 3) and labelled.dtype == np.uint8
    for row in range(2):
        assert np.array_equal(
            labelled[row * row_h : row * row_h + tile_h], plain[row * tile_h : (row + 1) * tile_h]
        )
        for col in range(3):
            strip = labelled[row * row_h + tile_h : (row + 1) * row_h, col * 160 : (col + 1) * 160]
            if row * 3 + col == len(frames):
                assert not strip.any()  # no tile, no label: the sheet's black
            else:  # light text on a dark strip, starting at the left margin
                assert np.median(strip) < 40 and strip.max() > 200
                assert np.nonzero(strip.max(axis=(0, 2)) > 128)[0].min() >= 3
    first = labelled[tile_h:row_h, :160]
    assert np.nonzero(first.max(axis=(0, 2)) > 128)[0].max() < 3 + 6 * len("fox-s1")  # 6 pixels a letter
    assert not np.array_equal(labelled, contact_sheet(frames, columns=3, tile_width=160, labels=labels[::-1]))


def test_contact_sheet_labels_are_cut_with_an_ellipsis_and_counted():
    """A label wider than its tile (less a 3-pixel margin each side) loses characters in its middle for
    '...', keeping both ends (the item's start, the seed); characters the bitmap font lacks show as '?'; a
    labels list of another length than the frames is refused."""
    from PIL import ImageDraw, ImageFont

    from storage.video import _label_strip

    def drawn(text: str) -> np.ndarray:
        strip = Image.new("RGB", (160, LABEL_HEIGHT), (24, 24, 24))
        ImageDraw.Draw(strip).text(
            (3, 1), text, font=ImageFont.load_default_imagefont(), fill=(235, 235, 235)
        )
        return np.asarray(strip)

    cut = "a-very-long...fit-s123456"  # 25 characters of 6 pixels: 150 of the 154 there is room for
    assert np.array_equal(_label_strip("a-very-long-item-name-that-cannot-fit-s123456", 160), drawn(cut))
    assert np.array_equal(_label_strip("fox-s1", 160), drawn("fox-s1"))
    assert np.array_equal(_label_strip("狐 fox\n-s5", 160), drawn("? fox -s5"))
    frames = [np.zeros((48, 64, 3), np.uint8)] * 3
    with pytest.raises(ValueError, match="2 labels for 3 frames"):
        contact_sheet(frames, labels=["a", "b"])


def test_keep_frames_keeps_frame_zero_and_even_spacing(tmp_path: Path):
    frames = np.stack([np.full((64, 512, 3), 10 * i, np.uint8) for i in range(21)])
    with VideoWriter(
        str(tmp_path / "x.mp4"), width=512, height=64, keep_frames=4, preset="ultrafast"
    ) as writer:
        writer.write(frames[:1])
        for start in range(1, 21, 4):
            writer.write(frames[start : start + 4])
    assert writer.kept_indices == [0, 8, 16]
    assert [int(f.mean()) for f in writer.kept_frames] == [0, 80, 160]
    assert all(f.shape == (32, 256, 3) for f in writer.kept_frames)  # shrunk to the poster width
    assert writer.first_frame.shape == (64, 512, 3)
    with VideoWriter(str(tmp_path / "y.mp4"), width=W, height=H, keep_frames=3) as writer:
        writer.write(_smooth(3))
    assert writer.kept_indices == [0, 1, 2]
