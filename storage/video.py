"""Frames in, an mp4 out at any fsspec URL, published atomically, with its sha256 taken on the way.

    with VideoWriter("s3://bucket/run/fox/fox-s0.mp4", width=832, height=480, fps=16) as w:
        for chunk in chunks:              # uint8 [n, H, W, 3]: 1 frame, then 4 at a time from the VAE
            w.write(chunk)
    w.sha256, w.nbytes, w.frames, w.seconds

Data path: `write` pipes raw rgb24 frames into ffmpeg (libx264, yuv420p, fragmented mp4 on stdout so
the output never needs seeking); a reader thread hashes and counts what ffmpeg writes and hands it
through a bounded queue to an upload thread, which feeds the sink; a third thread keeps the tail of
ffmpeg's stderr for error messages. Memory stays flat whatever the length of the video: the queue
holds at most `_QUEUE_BLOCKS` x `_READ_BLOCK` bytes, plus one multipart part on S3.

Sinks publish nothing at the final URL before commit:
- local paths and file:// URLs: a hidden `.{name}.{uuid}.partial` file in the same directory, fsynced,
  then `os.replace`d onto the final name (atomic on POSIX); unlinked on abort;
- S3: bytes are buffered in memory until they exceed one part (5 MiB, or `WANFLOW_S3_PART_SIZE` bytes:
  `part_size()`). An object that never does (a short video), and any object written whole from memory
  (`write_bytes`: sidecars, thumbnails, posters, contact sheets), is written on commit with one PUT,
  atomic by itself, so a killed process leaves nothing behind. A bigger video becomes a multipart upload,
  started only then, completed on commit and aborted on failure: no object, temporary or final, ever
  appears for a failed write. A process killed mid-upload leaves the upload open (billed): the job, redone,
  aborts it, and planning ends any older than a job may run (`storage.faults.abort_open_uploads`);
- any other fsspec filesystem: a hidden temporary key next to the final one, moved onto it on commit.
  Not atomic on filesystems without rename (the move may be a copy and a delete there).

Failures raise StorageError, or PermanentStorageError (also a ValueError) when retrying cannot help: a
read-only or unwritable root, permission denied, a missing bucket, a full disk (see storage.faults). On
every failure path the temporary file, key or upload is removed before the error propagates. Network
calls get connect and read timeouts and a bounded retry count (`storage.faults.with_timeouts`) unless the
storage options set their own.

Every URL in an error or a log line goes through `storage.urls.redact`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import math
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import ffmpeg
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageDraw, ImageFont

from storage.faults import (
    PermanentStorageError,
    StorageError,
    describe_exception,
    filesystem,
    head_bucket,
    is_s3,
    storage_error,
    storage_errors,
)
from storage.signals import SignalMeter, Spread
from storage.urls import redact

__all__ = [
    "LABEL_HEIGHT",
    "PART_SIZE",
    "PermanentStorageError",
    "StorageError",
    "VideoWriteError",
    "VideoWriter",
    "abort_quietly",
    "contact_sheet",
    "encoder_stream",
    "ffmpeg_executable",
    "object_info",
    "open_sink",
    "part_size",
    "verify_object",
    "write_bytes",
    "write_image",
]

logger = logging.getLogger(__name__)

PART_SIZE = 5 * 2**20  # S3 multipart part size by default (the smallest S3 allows)
PART_SIZE_ENV = "WANFLOW_S3_PART_SIZE"
MIN_PART_SIZE = 1024  # S3 itself refuses parts under 5 MiB but the last; test servers can be set lower
MAX_PART_SIZE = 5 * 2**30  # the largest part S3 takes
MAX_PUT_SIZE = 5 * 2**30  # the largest object one PUT takes
POSTER_WIDTH = 256  # kept frames are shrunk to at most this width
_READ_BLOCK = 256 * 1024  # one read of ffmpeg's stdout
_QUEUE_BLOCKS = 32  # encoded blocks waiting for the sink: at most 8 MiB
_VERIFY_BLOCK = 8 * 2**20  # one ranged read while verifying
_STDERR_KEEP = 64 * 1024  # tail of ffmpeg's stderr that is kept
_STDERR_SHOWN = 4000  # tail of it quoted in an exception message


class VideoWriteError(RuntimeError):
    """ffmpeg failed; the message carries its exit status and its own error text."""

    def __init__(self, message: str, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


# ----------------------------------------------------------------------------------------------- sinks


def _hidden_temp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.partial"


def _check_local_parent(path: str) -> None:
    """Create the parent directories of `path`, with a clear reason when an ancestor is a file."""
    parent = os.path.dirname(path) or "."
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise NotADirectoryError(errno.ENOTDIR, "an ancestor is a file, not a directory", probe)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "the destination is a directory", path)
    os.makedirs(parent, exist_ok=True)


class _LocalSink:
    """A hidden temporary file beside the destination, renamed onto it on commit."""

    def __init__(self, path: str) -> None:
        _check_local_parent(path)
        self.path = path
        self.temp = os.path.join(os.path.dirname(path), _hidden_temp_name(os.path.basename(path)))
        self.file = open(self.temp, "xb")  # noqa: SIM115 - closed by commit or abort
        self._published = False

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.path)
        self._published = True
        directory = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def abort(self) -> None:
        """Close and unlink the temporary file. Closing flushes what is buffered, which fails on a full
        disk: the file is closed and unlinked all the same, and that error is not raised over the cause.
        A commit that failed after its rename (syncing the directory) takes the published file away too."""
        try:
            with contextlib.suppress(OSError):
                self.file.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path if self._published else self.temp)


def part_size() -> int:
    """The S3 multipart part size in bytes: `WANFLOW_S3_PART_SIZE` if set, else `PART_SIZE` (5 MiB).

    A larger part means fewer requests per big video (S3 allows 10,000 parts). Below 5 MiB only S3-compatible
    servers configured for it accept the parts (moto's `S3_UPLOAD_PART_MIN_SIZE`): the chaos tests use it to
    make small videos multipart uploads. ValueError naming the variable when it is not a whole number of
    bytes from `MIN_PART_SIZE` to `MAX_PART_SIZE`.
    """
    text = os.environ.get(PART_SIZE_ENV, "").strip()
    if not text:
        return PART_SIZE
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"{PART_SIZE_ENV}={text!r}: expected a whole number of bytes") from None
    if not MIN_PART_SIZE <= size <= MAX_PART_SIZE:
        raise ValueError(f"{PART_SIZE_ENV}={size}: must be from {MIN_PART_SIZE} to {MAX_PART_SIZE} bytes")
    return size


class _S3Sink:
    """One PUT on commit for an object of at most `part_size` bytes; above that a multipart upload, started
    once the buffer exceeds one part and visible only when `commit` completes it.

    Memory: at most one part plus one write is buffered. Every part but the last is exactly `part_size`
    bytes and the last is never empty.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, part_size: int = PART_SIZE) -> None:
        bucket, key, _ = fs.split_path(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "the URL names a bucket, not an object key", path)
        # A missing bucket fails now, before any encoding (BucketNotFoundError: permanent). Access denied
        # does not: HeadBucket needs s3:ListBucket, which a write-only policy may not grant.
        head_bucket(fs, bucket)
        self.fs, self.path, self.bucket, self.key = fs, path, bucket, key
        self.part_size = part_size
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def write(self, data: bytes | memoryview) -> None:
        self.buffer += data
        while len(self.buffer) > self.part_size:
            self._upload_part(bytes(memoryview(self.buffer)[: self.part_size]))
            del self.buffer[: self.part_size]

    def _upload_part(self, body: bytes) -> None:
        if self.upload_id is None:
            started = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self.upload_id = started["UploadId"]
        number = len(self.parts) + 1
        out = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                              PartNumber=number, Body=body)  # fmt: skip
        self.parts.append({"PartNumber": number, "ETag": out["ETag"]})

    def commit(self) -> None:
        if self.upload_id is None:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
        else:
            self._upload_part(bytes(self.buffer))
            self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                            UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})  # fmt: skip
            self.upload_id = None
        self.buffer = bytearray()
        self.fs.invalidate_cache(self.path)

    def abort(self) -> None:
        """Drop the buffer and abort the multipart upload, if one was started (safe to call twice)."""
        self.buffer = bytearray()
        upload, self.upload_id = self.upload_id, None
        if upload is None:
            return
        try:
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload)
        except FileNotFoundError:  # NoSuchUpload: already gone
            pass
        except Exception as exc:
            raise OSError(f"could not abort multipart upload {upload}: {describe_exception(exc)}") from exc


class _TempKeySink:
    """Any other fsspec filesystem: a hidden temporary key moved onto the final one on commit."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        parent, _, name = path.rpartition("/")
        self.fs, self.path = fs, path
        self.temp = f"{parent}/{_hidden_temp_name(name)}" if parent else _hidden_temp_name(name)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        self.file = fs.open(self.temp, "wb")

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)

    def commit(self) -> None:
        self.file.close()
        self.fs.mv(self.temp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.temp)


_Sink = _LocalSink | _S3Sink | _TempKeySink


def open_sink(url: str, storage_options: dict | None, *, whole: int | None = None) -> _Sink:
    """A sink for `url`, checked for writability now (StorageError naming the URL and the reason).

    `whole`: the size of an object that is in memory already; on S3 it goes in one PUT whatever the part
    size (up to the 5 GiB one PUT takes), so that a process killed while writing it leaves no upload open.
    """
    with storage_errors(url, "write"):
        fs, path = filesystem(url, storage_options)
        if isinstance(fs, LocalFileSystem):
            return _LocalSink(path)
        if not is_s3(fs):
            return _TempKeySink(fs, path)
    size = part_size()  # a bad setting is a ValueError, never retried
    if whole is not None and whole <= MAX_PUT_SIZE:
        size = max(size, whole)
    with storage_errors(url, "write"):
        return _S3Sink(fs, path, size)


def abort_quietly(sink: _Sink, url: str) -> None:
    """Abort a sink during error handling: a failure to clean up is logged, never raised over the cause."""
    try:
        sink.abort()
    except Exception as exc:
        logger.warning("could not clean up the partial write of %s: %s", redact(url), describe_exception(exc))


# ---------------------------------------------------------------------------------------------- frames


def as_frames(chunk: Any, height: int, width: int) -> np.ndarray:
    """`chunk` as a C-contiguous uint8 array [n, height, width, 3] (a single [H, W, 3] frame becomes n=1).

    Takes numpy arrays, torch tensors (on any device) and anything with `__array__`, without importing
    torch. Raises ValueError naming the expected and the actual dtype and shape.
    """
    expected = f"uint8 frames [n, {height}, {width}, 3]"
    got = f"{getattr(chunk, 'dtype', type(chunk).__name__)} {list(getattr(chunk, 'shape', []))}"
    try:
        if not isinstance(chunk, np.ndarray) and hasattr(chunk, "detach"):
            chunk = chunk.detach().cpu()
        if not isinstance(chunk, np.ndarray) and hasattr(chunk, "numpy"):
            chunk = chunk.numpy()
        array = np.asarray(chunk)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"expected {expected}, got {got}") from exc
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.shape[1:] != (height, width, 3) or array.shape[0] == 0:
        raise ValueError(f"expected {expected}, got {array.dtype} {list(array.shape)}")
    return np.ascontiguousarray(array)


def _as_image(image: Any) -> np.ndarray:
    """`image` as a uint8 array [H, W, 3]; ValueError naming what it is otherwise."""
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {array.dtype} {list(array.shape)}")
    return array


def _shrink(frame: np.ndarray, max_width: int) -> np.ndarray:
    """A copy of frame [H, W, 3] at most `max_width` wide, aspect kept: [h, w <= max_width, 3]."""
    height, width = frame.shape[:2]
    if width <= max_width:
        return frame.copy()
    size = (max_width, max(1, round(height * max_width / width)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))


LABEL_HEIGHT = 14  # the dark strip under each tile of a labelled contact sheet: an 11-pixel font and a margin
_LABEL_PAD = 3


def contact_sheet(
    frames: Sequence[Any], columns: int = 4, tile_width: int = 256, labels: Sequence[str] | None = None
) -> np.ndarray:
    """Frames [H, W, 3] uint8 resized to `tile_width` wide tiles (aspect of the first frame) laid out row by
    row, at most `columns` per row, on black: [rows * tile_height, min(columns, n) * tile_width, 3] uint8.

    With `labels` (one per frame), each tile gets a dark strip of `LABEL_HEIGHT` pixels under it with its
    label in PIL's default bitmap font, cut with '...' where it is wider than the tile: rows are then
    `tile_height + LABEL_HEIGHT` high and the tiles themselves are the same as without labels."""
    tiles = [_as_image(frame) for frame in frames]
    if not tiles or columns < 1 or tile_width < 1:
        raise ValueError("contact_sheet needs at least one frame, columns >= 1 and tile_width >= 1")
    if labels is not None and len(labels) != len(tiles):
        raise ValueError(f"contact_sheet got {len(labels)} labels for {len(tiles)} frames: expected one each")
    tile_height = max(1, round(tiles[0].shape[0] * tile_width / tiles[0].shape[1]))
    row_height = tile_height + (LABEL_HEIGHT if labels is not None else 0)
    cols = min(columns, len(tiles))
    sheet = np.zeros((math.ceil(len(tiles) / cols) * row_height, cols * tile_width, 3), np.uint8)
    for i, tile in enumerate(tiles):
        if tile.shape[:2] != (tile_height, tile_width):
            tile = np.asarray(
                Image.fromarray(tile).resize((tile_width, tile_height), Image.Resampling.BILINEAR)
            )
        row, col = divmod(i, cols)
        top, left = row * row_height, col * tile_width
        sheet[top : top + tile_height, left : left + tile_width] = tile
        if labels is not None:
            sheet[top + tile_height : top + row_height, left : left + tile_width] = _label_strip(
                labels[i], tile_width
            )
    return sheet


def _label_strip(label: str, width: int) -> np.ndarray:
    """`label` in light grey on a dark strip [LABEL_HEIGHT, width, 3]; one too wide loses characters in its
    middle, for '...', so that both ends show (an item's start, its seed). PIL's default bitmap font covers
    Latin-1 only: other characters show as '?'."""
    font = ImageFont.load_default_imagefont()
    text = " ".join(str(label).split()).encode("latin-1", "replace").decode("latin-1")
    room = width - 2 * _LABEL_PAD
    keep = len(text)
    while keep and font.getlength(_middle_cut(text, keep)) > room:
        keep -= 1
    text = _middle_cut(text, keep) if font.getlength(_middle_cut(text, keep)) <= room else ""
    strip = Image.new("RGB", (width, LABEL_HEIGHT), (24, 24, 24))
    ImageDraw.Draw(strip).text((_LABEL_PAD, (LABEL_HEIGHT - 11) // 2), text, font=font, fill=(235, 235, 235))
    return np.asarray(strip)


def _middle_cut(text: str, keep: int) -> str:
    """`text` with only `keep` of its characters, the first half and the last, joined by '...'."""
    if keep >= len(text):
        return text
    return text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2 :]


# ---------------------------------------------------------------------------------------- small objects


def write_bytes(url: str, data: bytes, *, storage_options: dict | None = None) -> tuple[str, int]:
    """Write `data` to `url` atomically (nothing visible until complete); returns (sha256 hex, bytes).

    On S3 that is one PUT (up to 5 GiB), never a multipart upload: a process killed meanwhile leaves nothing
    behind, not even an open upload. (Sidecars, thumbnails, posters and contact sheets come this way; only
    streamed videos need multipart uploads, and a job redone aborts those left under its own keys.)
    """
    sink = open_sink(url, storage_options, whole=len(data))
    try:
        with storage_errors(url, "write"):
            sink.write(data)
            sink.commit()
    except BaseException:
        abort_quietly(sink, url)
        raise
    return hashlib.sha256(data).hexdigest(), len(data)


def write_image(
    url: str,
    image: Any,
    *,
    format: str = "png",
    storage_options: dict | None = None,
    max_width: int | None = None,
) -> tuple[str, int]:
    """Encode image [H, W, 3] uint8 as png or webp (shrunk to `max_width` if wider) and write it to `url`
    atomically; returns (sha256 hex, bytes)."""
    if format not in ("png", "webp"):
        raise ValueError(f"image format {format!r}: expected 'png' or 'webp'")
    array = _as_image(image)
    if max_width is not None:
        array = _shrink(array, max_width)
    buffer = io.BytesIO()
    options = {"quality": 90} if format == "webp" else {}
    Image.fromarray(array).save(buffer, format=format.upper(), **options)
    return write_bytes(url, buffer.getvalue(), storage_options=storage_options)


def object_info(url: str, storage_options: dict | None = None) -> int | None:
    """Size in bytes of the object at `url`, or None when there is none (other failures: StorageError)."""
    with storage_errors(url, "look up"):
        fs, path = filesystem(url, storage_options)
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
    return int(info["size"]) if info.get("type", "file") == "file" else None


def verify_object(url: str, sha256: str, nbytes: int, storage_options: dict | None = None) -> bool:
    """Whether the object at `url` exists with exactly `nbytes` bytes hashing to `sha256` (streamed, not
    loaded whole). False for a missing object or any mismatch."""
    if object_info(url, storage_options) != nbytes:
        return False
    digest = hashlib.sha256()
    with storage_errors(url, "read"):
        fs, path = filesystem(url, storage_options)
        try:
            with fs.open(path, "rb", block_size=_VERIFY_BLOCK, cache_type="none") as file:
                while block := file.read(_VERIFY_BLOCK):
                    digest.update(block)
        except FileNotFoundError:
            return False
    return digest.hexdigest() == sha256.lower()


# ---------------------------------------------------------------------------------------------- videos


def ffmpeg_executable(explicit: str | None = None) -> str:
    """The ffmpeg to run: the argument, else $WANFLOW_FFMPEG, else the static build of imageio-ffmpeg."""
    if explicit or os.environ.get("WANFLOW_FFMPEG"):
        return explicit or os.environ["WANFLOW_FFMPEG"]
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {returncode} (killed by {signal.Signals(-returncode).name})"
    return f"exit code {returncode}"


def encoder_stream(
    width: int, height: int, fps: int, *, crf: int = 18, preset: str = "medium", output: str = "pipe:"
) -> ffmpeg.nodes.OutputStream:
    """The ffmpeg-python graph VideoWriter runs: rgb24 frames [H, W, 3] on stdin -> libx264 (yuv420p) ->
    fragmented mp4 at `output` (stdout by default; benchmarks point it at /dev/null)."""
    raw = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    # A fragment per keyframe alone would keep up to 250 frames (x264's default GOP), often the whole
    # video, inside ffmpeg before any byte comes out; frag_duration also cuts one every second.
    mp4 = {"format": "mp4", "movflags": "frag_keyframe+empty_moov", "frag_duration": 1_000_000}
    h264 = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": crf, "preset": preset}
    return raw.output(output, **h264, **mp4).global_args("-hide_banner", "-loglevel", "warning")


class VideoWriter:
    """Streams uint8 frames [n, H, W, 3] through ffmpeg (H.264 in a fragmented mp4) into `url`.

    Opening checks the destination (StorageError naming the redacted URL at once, before any encoding)
    and starts ffmpeg, like `open()` does: use it in a `with` block, or call `commit()` or `abort()`.
    A clean exit of the block commits; an exception inside it kills ffmpeg, aborts the upload and
    propagates unchanged. Either way nothing appears at `url` unless the whole video was stored.

    After commit: `sha256` (hex) and `nbytes` of the stored object, `frames`, `seconds` (wall time since
    opening). After abort, `sha256` and `nbytes` are None. `first_frame` is frame 0 at full size
    [H, W, 3]; with `keep_frames=k`, `kept_frames` holds up to k evenly spaced frames (indices in
    `kept_indices`), shrunk to at most `kept_width` px wide (default 256, for a poster; None: full size,
    for a model that scores them). `signals` measures the frames' quality
    signals as they go to the encoder (`storage.signals`; `signals.result()` once every frame is in; None
    with `measure=False`).
    """

    codec = "h264"

    def __init__(
        self,
        url: str,
        *,
        width: int,
        height: int,
        fps: int = 16,
        storage_options: dict | None = None,
        ffmpeg_binary: str | None = None,
        crf: int = 18,
        preset: str = "medium",
        keep_frames: int = 0,
        measure: bool = True,
        kept_width: int | None = POSTER_WIDTH,
    ) -> None:
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise ValueError(f"video size {width}x{height}: H.264 in yuv420p needs even width and height")
        if fps < 1 or not 0 <= crf <= 51 or keep_frames < 0:
            raise ValueError(
                f"fps={fps}, crf={crf}, keep_frames={keep_frames}: need fps >= 1, 0 <= crf <= 51"
            )
        self.url, self.width, self.height, self.fps = url, width, height, fps
        self.kept_width = kept_width
        self.frames = 0
        self.sha256: str | None = None
        self.nbytes: int | None = None
        self.seconds: float | None = None
        self.first_frame: np.ndarray | None = None
        self._kept = Spread(keep_frames)  # (frame index, the frame as kept)
        self.signals = SignalMeter(fps) if measure else None
        self._digest, self._count, self._sent = hashlib.sha256(), 0, 0
        self._stderr = bytearray()
        self._upload_error: BaseException | None = None
        self._state = "open"
        self._started = time.perf_counter()
        self._sink = open_sink(url, storage_options)
        try:
            self.process = self._spawn(ffmpeg_executable(ffmpeg_binary), crf, preset)
        except BaseException:
            abort_quietly(self._sink, url)
            raise
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_BLOCKS)
        self._threads = [
            threading.Thread(target=target, name=f"video-{name}", daemon=True)
            for name, target in (("stdout", self._read_stdout), ("stderr", self._read_stderr),
                                 ("upload", self._upload))
        ]  # fmt: skip
        for thread in self._threads:
            thread.start()

    # -- the ffmpeg process and the threads around it

    def _spawn(self, binary: str, crf: int, preset: str) -> subprocess.Popen:
        stream = encoder_stream(self.width, self.height, self.fps, crf=crf, preset=preset)
        try:
            return ffmpeg.run_async(stream, cmd=binary, pipe_stdin=True, pipe_stdout=True, pipe_stderr=True)
        except OSError as exc:
            raise VideoWriteError(f"cannot start ffmpeg {binary!r} for {redact(self.url)}: {exc}") from exc

    def _read_stdout(self) -> None:
        """Thread: hash and count ffmpeg's output and queue it for the upload (blocks when it lags)."""
        try:
            while block := self.process.stdout.read1(_READ_BLOCK):
                self._digest.update(block)
                self._count += len(block)
                self._queue.put(block)
        finally:
            self._queue.put(None)

    def _read_stderr(self) -> None:
        """Thread: keep the last `_STDERR_KEEP` bytes of ffmpeg's messages."""
        while block := self.process.stderr.read1(4096):
            self._stderr += block
            if len(self._stderr) > 2 * _STDERR_KEEP:
                del self._stderr[:-_STDERR_KEEP]

    def _upload(self) -> None:
        """Thread: feed queued blocks to the sink; on failure stop ffmpeg but keep draining the queue."""
        while (block := self._queue.get()) is not None:
            if self._upload_error is not None:
                continue
            try:
                self._sink.write(block)
                self._sent += len(block)
            except Exception as exc:
                self._upload_error = exc
                self._kill()

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.poll() is None:
                self.process.kill()

    def _join(self) -> None:
        self.process.wait()
        for thread in self._threads:
            thread.join()
        for pipe in (self.process.stdout, self.process.stderr):
            pipe.close()

    @property
    def stderr(self) -> str:
        """The last 64 KiB of ffmpeg's messages."""
        return self._stderr[-_STDERR_KEEP:].decode(errors="replace")

    @property
    def bytes_sent(self) -> int:
        """Encoded bytes handed to the destination so far (a live count, for progress and tests)."""
        return self._sent

    def _failure(self, doing: str) -> Exception:
        """The error to raise once ffmpeg or the upload has failed (waits for the threads to finish)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._kill()
        self._join()
        if self._upload_error is not None:
            return storage_error(self.url, "write", self._upload_error, doing="upload failed")
        rc, text = self.process.returncode, self.stderr.strip()
        detail = redact(text[-_STDERR_SHOWN:]) if text else "(ffmpeg printed no error message)"
        message = f"ffmpeg failed while {doing} for {redact(self.url)}: {_describe_exit(rc)}\n{detail}"
        return VideoWriteError(message, rc, text)

    # -- frames in

    def write(self, chunk: Any) -> None:
        """Encode uint8 frames `chunk` [n, H, W, 3] (numpy, torch, or anything with `__array__`)."""
        if self._state != "open":
            raise RuntimeError(f"VideoWriter for {redact(self.url)} is already {self._state}")
        frames = as_frames(chunk, self.height, self.width)
        try:
            self.process.stdin.write(memoryview(frames).cast("B"))
        except OSError as exc:
            raise self._failure("receiving frames") from exc
        self._keep(frames)
        if self.signals is not None:
            self.signals.update(frames)
        self.frames += len(frames)

    @property
    def kept_frames(self) -> list[np.ndarray]:
        return [frame for _, frame in self._kept.items]

    @property
    def kept_indices(self) -> list[int]:
        return [index for index, _ in self._kept.items]

    def _keep(self, frames: np.ndarray) -> None:
        """Remember frame 0, and up to `keep_frames` frames spread evenly over the video (`Spread`)."""
        if self.first_frame is None:
            self.first_frame = frames[0].copy()
        width = self.kept_width
        for index in range(self.frames, self.frames + len(frames)):
            if self._kept.wants(index):
                frame = frames[index - self.frames]
                self._kept.add(index, frame.copy() if width is None else _shrink(frame, width))

    # -- the end: commit or abort

    def commit(self) -> None:
        """Finish encoding, complete the upload and publish the video at `url` (abort on any failure)."""
        if self._state != "open":
            raise RuntimeError(f"VideoWriter for {redact(self.url)} is already {self._state}")
        try:
            self._finish_encoding()
            with storage_errors(self.url, "write"):
                self._sink.commit()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self.sha256, self.nbytes = self._digest.hexdigest(), self._count
        self.seconds = time.perf_counter() - self._started

    def _finish_encoding(self) -> None:
        if self.frames == 0:
            raise VideoWriteError(f"no frames were written to {redact(self.url)}")
        try:
            self.process.stdin.close()
        except OSError as exc:
            raise self._failure("flushing the last frames") from exc
        self.process.wait()
        if self.process.returncode != 0 or self._upload_error is not None:
            raise self._failure("finishing the video")
        self._join()
        if self._upload_error is not None:
            raise self._failure("finishing the upload")

    def abort(self) -> None:
        """Stop ffmpeg and throw the partial upload away; nothing appears at `url`. Safe to call twice."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._kill()
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()
        self._join()
        abort_quietly(self._sink, self.url)
        self.sha256 = self.nbytes = None
        self.seconds = time.perf_counter() - self._started

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
