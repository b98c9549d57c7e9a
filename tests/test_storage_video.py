"""storage.video: frames -> ffmpeg -> objects published atomically, on a local disk and on S3.

S3 is moto's threaded server on 127.0.0.1 (one per module, reset before each test; the outage test
starts its own). Every fault must leave nothing at the final key, no temporary object beside it and no
open multipart upload, and a retry must then succeed.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import imageio_ffmpeg
import numpy as np
import pytest
import s3fs
import torch
from moto.server import ThreadedMotoServer
from PIL import Image

from storage.video import (
    PART_SIZE,
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
BUCKET = "wanflow-test"
SECRET = "testing-secret-xyz"


# ------------------------------------------------------------------------------------------- S3 server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server() -> tuple[ThreadedMotoServer, int]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


def _stop_server(server: ThreadedMotoServer) -> None:
    """Stop serving and close the listening socket (`stop()` alone leaves it open, so clients would hang
    in the backlog instead of being refused)."""
    server.stop()
    server._server.server_close()


def _s3_options(port: int, secret: str = SECRET) -> dict:
    """s3fs options for moto: no region (moto rejects the location constraint) and one attempt per call,
    so an outage fails in about a second. (`aws_env` clears s3fs's instance cache between tests.)"""
    return {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "key": "testing",
        "secret": secret,
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    server, port = _start_server()
    yield port
    _stop_server(server)


@dataclass
class Target:
    """A storage root under test and the helpers to look at what is stored there."""

    root: str
    options: dict | None = None

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs = fsspec.core.url_to_fs(self.root, **(self.options or {}))[0]
        fs.invalidate_cache()
        return fs

    def _path(self, name: str) -> str:
        return fsspec.core.url_to_fs(self.url(name), **(self.options or {}))[1]

    def listing(self) -> list[str]:
        """Every object under the root, hidden ones included, relative to it; plus open S3 uploads."""
        fs, base = fsspec.core.url_to_fs(self.root, **(self.options or {}))
        fs.invalidate_cache()
        names = sorted(path[len(base) + 1 :] for path in fs.find(base)) if fs.exists(base) else []
        if isinstance(fs, s3fs.S3FileSystem):
            names += [f"upload:{u['Key']}" for u in fs.list_multipart_uploads(BUCKET)]
        return names

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def put(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)


@pytest.fixture
def s3_target(moto_port: int, aws_env: None) -> Target:
    urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset", method="POST")
    )
    options = _s3_options(moto_port)
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    return Target(f"s3://{BUCKET}/videos", options)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "s3":
        return request.getfixturevalue("s3_target")
    return Target(str(tmp_path / "videos"))


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
    server, port = _start_server()
    options = _s3_options(port)
    s3fs.S3FileSystem(**options).mkdir("outage")
    url = "s3://outage/run/fox.mp4"
    rng = np.random.default_rng(3)
    big = dict(width=BIG_W, height=BIG_H, crf=0, preset="ultrafast")
    with pytest.raises(StorageError, match="upload failed") as err, VideoWriter(url, storage_options=options,
                                                                                **big) as writer:  # fmt: skip
        _write_until_a_part_is_sent(writer, rng)
        _stop_server(server)
        for _ in range(64):  # more than another part: the upload must notice the outage
            writer.write(_noise(rng))
    assert url in str(err.value) and SECRET not in str(err.value)
    assert writer.sha256 is None

    server, port = _start_server()  # S3 is back (moto keeps its state in the process)
    try:
        restarted = Target("s3://outage/run", _s3_options(port))
        # The abort could not reach the server: the upload is orphaned, but no object is visible.
        assert target_objects(restarted) == []
        restarted.fs.clear_multipart_uploads("outage")
        retry = _write_small(restarted, "fox.mp4")
        assert verify_object(url, retry.sha256, retry.nbytes, restarted.options)
        assert target_objects(restarted) == ["fox.mp4"]
    finally:
        _stop_server(server)


def target_objects(target: Target) -> list[str]:
    return [name for name in target.listing() if not name.startswith("upload:")]


def test_ffmpeg_error_text_surfaces(tmp_path: Path):
    target = Target(str(tmp_path))
    bad = VideoWriter(target.url("x.mp4"), width=W, height=H, preset="nonsense")
    with pytest.raises(VideoWriteError, match="nonsense") as err, bad as writer:
        writer.write(_smooth(2))
    assert "exit code" in str(err.value) and err.value.returncode not in (0, None)
    assert "nonsense" in err.value.stderr
    assert target.listing() == []


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
    with pytest.raises(StorageError, match="not a directory") as err:
        VideoWriter(url, width=W, height=H)
    assert str(blocker) in str(err.value)
    with pytest.raises(StorageError, match="not-a-dir"):
        write_bytes(str(blocker / "x.json"), b"{}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_local_read_only_root(tmp_path: Path):
    root = tmp_path / "ro"
    root.mkdir(mode=0o555)
    with pytest.raises(StorageError, match="Permission denied") as err:
        VideoWriter(str(root / "x.mp4"), width=W, height=H)
    assert str(root) in str(err.value)


@pytest.mark.integration
def test_s3_missing_bucket(s3_target: Target):
    options = s3_target.options
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x\.mp4") as err:
        VideoWriter("s3://no-such-bucket/x.mp4", width=W, height=H, storage_options=options)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x\.webp") as err_image:
        write_image("s3://no-such-bucket/x.webp", _smooth(1)[0], format="webp", storage_options=options)
    for error in (err.value, err_image.value):
        assert SECRET not in str(error) and "Not Found" in str(error)


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
