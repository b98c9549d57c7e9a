"""storage.faults: permanent versus transient storage errors, timeouts against a hung endpoint, the
pre-flight probe of a storage root, and the cleanup of multipart uploads a killed process left open.

Real faults only: a read-only and a full filesystem are tiny tmpfs mounts (skipped where this process
cannot mount one), a hung endpoint is a socket on 127.0.0.1 that accepts connections and never answers,
S3 is the moto server of tests/s3_server.py, and a killed writer is a subprocess that SIGKILLs itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import fsspec
import numpy as np
import pytest
import s3fs
from botocore.exceptions import ClientError
from s3_server import BUCKET, SECRET, Target, target_objects

from storage.faults import (
    BucketNotFoundError,
    PermanentStorageError,
    StorageError,
    abort_open_uploads,
    is_permanent_storage_error,
    probe_storage_root,
    storage_error,
    with_timeouts,
)
from storage.video import PART_SIZE, VideoWriter, object_info, write_bytes

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

W, H = 64, 48
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "1m", *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (created) for the block: a real full or read-only filesystem.
    Skips the test where this process may not mount one (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "wanflow-test", str(path)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> None:
    """Write a file in `directory` until its filesystem is full (ENOSPC)."""
    block = b"\0" * 65536
    with open(directory / "filler", "wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(block)
    with pytest.raises(OSError) as err, open(directory / "filler", "ab", buffering=0) as file:
        file.write(b"\0" * 4096)
    assert err.value.errno == errno.ENOSPC


def everything_in(directory: Path) -> list[str]:
    """Every file under `directory`, hidden ones included, relative to it."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir())


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts connections and never answers (a hung endpoint)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def _client_error(code: str, bucket: str = "") -> ClientError:
    error = {"Code": code, "Message": f"{code} says the server"}
    if bucket:
        error["BucketName"] = bucket
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")


# ------------------------------------------------------------------------------------ classification


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EROFS, "Read-only file system", "/x"),
        PermissionError(errno.EACCES, "Permission denied", "/x"),
        PermissionError(errno.EPERM, "Operation not permitted", "/x"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/y"),
        PermissionError("Access Denied"),  # s3fs's translation of AccessDenied, errno-less
        BucketNotFoundError("foo"),
        _client_error("NoSuchBucket", "foo"),
        _client_error("AccessDenied"),
        _client_error("InvalidAccessKeyId"),
        _client_error("SignatureDoesNotMatch"),
        _client_error("EntityTooSmall"),  # WANFLOW_S3_PART_SIZE under the server's minimum: never retried
        PermanentStorageError("cannot write x: disk full", kind="disk-full", code="ENOSPC"),
    ],
    ids=repr,
)
def test_permanent_errors(exc: BaseException):
    assert is_permanent_storage_error(exc)
    wrapped = storage_error("s3://foo/run/x.mp4", "write", exc)
    assert isinstance(wrapped, PermanentStorageError) and isinstance(wrapped, ValueError)
    assert isinstance(wrapped, StorageError) and isinstance(wrapped, OSError)
    assert str(wrapped).startswith("cannot write s3://foo/run/x.mp4: ") and "\n" not in str(wrapped)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "Input/output error"),
        TimeoutError("timed out"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"),  # a missing object
        StorageError("cannot write x: upload failed"),
        _client_error("SlowDown"),
        _client_error("InternalError"),
        RuntimeError("decoder exploded"),
    ],
    ids=repr,
)
def test_transient_errors(exc: BaseException):
    assert not is_permanent_storage_error(exc)
    wrapped = storage_error("/data/x.mp4", "write", exc)
    assert type(wrapped) is StorageError and not isinstance(wrapped, ValueError)


def test_classification_follows_causes_and_real_kernel_errors():
    with pytest.raises(OSError) as full, open("/dev/full", "wb", buffering=0) as device:
        device.write(b"x")  # the kernel's own ENOSPC
    assert is_permanent_storage_error(full.value)
    try:
        try:
            raise full.value
        except OSError as exc:
            raise RuntimeError("the upload thread gave up") from exc
    except RuntimeError as outer:
        assert is_permanent_storage_error(outer)
    message = str(storage_error("/data/x.mp4", "write", full.value, doing="upload failed"))
    assert message.startswith("cannot write /data/x.mp4: upload failed: disk full (ENOSPC): OSError: ")

    error = PermanentStorageError("cannot write x: disk full (ENOSPC)", kind="disk-full", code="ENOSPC")
    again = pickle.loads(pickle.dumps(error))  # Prefect and worker groups pickle exceptions
    assert (type(again), str(again), again.kind, again.code) == (
        PermanentStorageError, str(error), "disk-full", "ENOSPC",
    )  # fmt: skip


@pytest.mark.integration
def test_real_s3_errors_are_classified(s3_target: Target):
    fs = s3fs.S3FileSystem(**s3_target.options)
    with pytest.raises(OSError) as missing:
        fs.pipe_file("no-such-bucket/x.json", b"{}")  # NoSuchBucket, as s3fs raises it
    assert is_permanent_storage_error(missing.value)
    with pytest.raises(OSError) as absent_key:
        fs.info(f"{BUCKET}/no/such/key")
    assert not is_permanent_storage_error(absent_key.value)


# -------------------------------------------------------------------------------------------- timeouts


def test_with_timeouts_adds_defaults_and_keeps_what_the_user_set():
    mine = {"read_timeout": 5, "retries": {"max_attempts": 1}}
    user = {"key": "k", "config_kwargs": mine}
    out = with_timeouts(user, "s3://bucket/run")
    assert out["config_kwargs"] == {**mine, "connect_timeout": 10.0} and out["key"] == "k"
    assert user == {"key": "k", "config_kwargs": {"read_timeout": 5, "retries": {"max_attempts": 1}}}
    out = with_timeouts(None, "s3://bucket/run", connect=2, read=3, attempts=4)
    assert out == {"config_kwargs": {"connect_timeout": 2, "read_timeout": 3,
                                     "retries": {"total_max_attempts": 4, "mode": "standard"}}}  # fmt: skip

    timeout = with_timeouts({}, "https://example.org/a.png", connect=1, read=2)["client_kwargs"]["timeout"]
    assert isinstance(timeout, aiohttp.ClientTimeout)
    assert (timeout.sock_connect, timeout.sock_read, timeout.total) == (1, 2, None)
    own = aiohttp.ClientTimeout(total=9)
    assert with_timeouts({"client_kwargs": {"timeout": own}}, "http://x/y")["client_kwargs"]["timeout"] is own

    assert with_timeouts({"auto_mkdir": True}, "/data/out") == {"auto_mkdir": True}
    assert with_timeouts(None, "memory://x") == {}
    with pytest.raises(ValueError, match="attempts=0"):
        with_timeouts(None, "s3://b", attempts=0)


def _hung_s3(port: int) -> dict:
    return {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "key": "testing", "secret": SECRET}


@pytest.mark.integration
def test_hung_s3_endpoint_fails_fast_with_a_clear_error(hung_port: int, aws_env: None):
    url = "s3://bucket/run/fox.json"
    options = with_timeouts(_hung_s3(hung_port), url, connect=1, read=1, attempts=1)
    for call in (
        lambda: write_bytes(url, b"{}", storage_options=options),
        lambda: object_info(url, options),
        lambda: VideoWriter("s3://bucket/run/fox.mp4", width=W, height=H, storage_options=options),
    ):
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"s3://bucket/run/fox\.(json|mp4): .*[Tt]imeout") as err:
            call()
        assert time.monotonic() - start < 8
        assert not is_permanent_storage_error(err.value) and SECRET not in str(err.value)


@pytest.mark.integration
def test_hung_s3_endpoint_default_retries_are_bounded(hung_port: int, aws_env: None):
    """Only the read timeout set: botocore's three attempts are all there is (s3fs's own loop would make
    that fifteen)."""
    url = "s3://bucket/run/fox.json"
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"[Tt]imeout"):
        write_bytes(url, b"{}", storage_options=with_timeouts(_hung_s3(hung_port), url, read=1))
    assert time.monotonic() - start < 12


def test_hung_http_endpoint_fails_fast(hung_port: int):
    url = f"http://127.0.0.1:{hung_port}/image.png"
    fs, path = fsspec.core.url_to_fs(url, **with_timeouts(None, url, connect=1, read=1))
    start = time.monotonic()
    with pytest.raises(Exception) as err:  # aiohttp's or fsspec's error, either is fine
        fs.cat_file(path)
    assert time.monotonic() - start < 8
    assert "timeout" in repr(err.value).lower() or "timeout" in repr(err.value.__cause__).lower()


# ----------------------------------------------------------------------------------------------- probe


def test_probe_local_root_creates_it_and_leaves_nothing(tmp_path: Path):
    root = tmp_path / "new" / "root"
    probe_storage_root(str(root))
    probe_storage_root(f"file://{root}")
    assert root.is_dir() and everything_in(root) == []
    probe_storage_root("memory://wanflow-probe/root")
    assert fsspec.filesystem("memory").find("/wanflow-probe") == []


def test_probe_root_under_a_regular_file(tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    for root in (blocker, blocker / "run"):
        with pytest.raises(PermanentStorageError, match=f"storage root {root} is not a directory") as err:
            probe_storage_root(str(root))
        assert isinstance(err.value, ValueError) and err.value.code == "ENOTDIR"


def test_probe_unwritable_root(tmp_path: Path):
    """As root, who may write anywhere on a normal filesystem, a sysfs directory (EACCES for everyone)."""
    if os.geteuid() == 0:
        root = Path("/sys/kernel")
    else:
        root = tmp_path / "locked"
        root.mkdir(mode=0o555)
    with pytest.raises(PermanentStorageError, match=rf"permission denied writing {root}/\.wanflow-probe-\w+ "
                                                    r"\((EACCES|EPERM)\)$") as err:  # fmt: skip
        probe_storage_root(str(root))
    assert err.value.kind == "permission"


def test_probe_read_only_root(tmp_path: Path):
    with mounted_tmpfs(tmp_path / "ro", "64k", read_only=True) as root:
        with pytest.raises(PermanentStorageError, match=rf"^storage root {root} is read-only \(EROFS\)$"):
            probe_storage_root(str(root))
        with pytest.raises(PermanentStorageError, match=r"read-only file system \(EROFS\)") as err:
            VideoWriter(str(root / "x.mp4"), width=W, height=H)
        assert isinstance(err.value, ValueError)


def test_probe_full_root(tmp_path: Path):
    with mounted_tmpfs(tmp_path / "full", "256k") as root:
        fill(root)
        with pytest.raises(PermanentStorageError, match=rf"^storage root {root}: disk full \(ENOSPC\)$"):
            probe_storage_root(str(root))
        assert everything_in(root) == ["filler"]


@pytest.mark.integration
def test_probe_s3(s3_target: Target):
    probe_storage_root(s3_target.root, s3_target.options)
    assert s3_target.listing() == []
    with pytest.raises(PermanentStorageError, match=r"^bucket no-such-bucket does not exist$") as err:
        probe_storage_root("s3://no-such-bucket/videos", s3_target.options)
    assert err.value.kind == "no-bucket" and isinstance(err.value, ValueError)


@pytest.mark.integration
def test_probe_hung_s3_is_transient(hung_port: int, aws_env: None):
    root = "s3://bucket/videos"
    with pytest.raises(StorageError, match=r"storage root s3://bucket/videos cannot be written") as err:
        probe_storage_root(root, with_timeouts(_hung_s3(hung_port), root, connect=1, read=1, attempts=1))
    assert not isinstance(err.value, PermanentStorageError)


# ------------------------------------------------------------------------- writes that hit a full disk


def _noise(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    return rng.integers(0, 256, (n, 480, 832, 3), dtype=np.uint8)


def test_disk_full_while_streaming_leaves_no_partial_file(tmp_path: Path):
    with mounted_tmpfs(tmp_path / "full", "2m") as root:
        rng = np.random.default_rng(0)
        writer = VideoWriter(str(root / "run/fox.mp4"), width=832, height=480, crf=0, preset="ultrafast")
        with (
            pytest.raises(PermanentStorageError, match=r"upload failed: disk full \(ENOSPC\)") as err,
            writer,
        ):
            for _ in range(64):  # ~45 MB of encoded noise for a 2 MB filesystem
                writer.write(_noise(rng))
        assert isinstance(err.value, ValueError) and str(root) in str(err.value)
        assert everything_in(root) == []


def test_disk_full_at_commit_leaves_no_partial_file(tmp_path: Path):
    """Small objects stay in the file's buffer until commit flushes them: the disk is found full there,
    and the abort's close fails the same way; the temporary file must go all the same."""
    with mounted_tmpfs(tmp_path / "full", "256k") as root:
        fill(root)
        with pytest.raises(PermanentStorageError, match=r"disk full \(ENOSPC\)"):
            write_bytes(str(root / "run/fox.json"), b"{}")
        with (
            pytest.raises(PermanentStorageError, match=r"disk full \(ENOSPC\)"),
            VideoWriter(str(root / "run/fox.mp4"), width=W, height=H) as writer,
        ):
            writer.write(np.full((3, H, W, 3), 90, np.uint8))  # a few hundred bytes once encoded
        assert everything_in(root) == ["filler"]


# ---------------------------------------------------------------------------------- open S3 uploads

_KILLED_WRITER = """
import os, signal, sys
from storage.video import PART_SIZE, open_sink
from s3_server import s3_options
sink = open_sink(sys.argv[1], s3_options(int(sys.argv[2])))
sink.write(b"x" * (PART_SIZE + 1))  # more than a part: the multipart upload starts, part 1 is sent
assert sink.upload_id and len(sink.parts) == 1
os.kill(os.getpid(), signal.SIGKILL)  # killed before commit or abort
"""


@pytest.mark.integration
def test_abort_open_uploads_after_a_killed_writer(s3_target: Target, moto_port: int):
    url = s3_target.url("run/fox.mp4")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, url, str(moto_port)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    s3 = s3fs.S3FileSystem(**s3_target.options)
    assert [u["Key"] for u in s3.list_multipart_uploads(BUCKET)] == ["videos/run/fox.mp4"]

    # another prefix that merely starts the same ("videos2/") keeps its upload; so do recent ones
    s3.call_s3("create_multipart_upload", Bucket=BUCKET, Key="videos2/keep.mp4")
    assert abort_open_uploads(s3_target.root, s3_target.options, older_than_s=100 * 365 * 86400) == 0
    assert abort_open_uploads(s3_target.root, s3_target.options) == 1
    assert [u["Key"] for u in s3.list_multipart_uploads(BUCKET)] == ["videos2/keep.mp4"]
    assert target_objects(s3_target) == []  # nothing was ever visible
    assert abort_open_uploads(s3_target.root, s3_target.options) == 0
    assert abort_open_uploads(f"s3://{BUCKET}", s3_target.options) == 1  # the bucket root covers all
    assert s3.list_multipart_uploads(BUCKET) == [] and s3_target.listing() == []


def test_abort_open_uploads_elsewhere_is_a_no_op(tmp_path: Path):
    assert abort_open_uploads(str(tmp_path)) == 0
    assert abort_open_uploads("memory://wanflow/x") == 0


@pytest.mark.integration
def test_abort_open_uploads_missing_bucket_is_permanent(s3_target: Target):
    with pytest.raises(PermanentStorageError, match="s3://no-such-bucket/videos"):
        abort_open_uploads("s3://no-such-bucket/videos", s3_target.options)


@pytest.mark.integration
def test_small_objects_are_one_put_and_big_ones_multipart(s3_target: Target):
    """A multipart object's ETag ends with '-<parts>': objects of at most one part never are multipart, nor
    objects written whole from memory (`write_bytes`: a process killed meanwhile leaves no upload open); a
    bigger stream is."""
    from storage.video import open_sink

    s3 = s3_target.fs

    def etag(name: str) -> str:
        return s3.info(f"{BUCKET}/videos/{name}")["ETag"].strip('"')

    write_bytes(s3_target.url("fox.json"), b'{"seed": 1}', storage_options=s3_target.options)
    write_bytes(s3_target.url("exact.bin"), b"a" * PART_SIZE, storage_options=s3_target.options)
    write_bytes(s3_target.url("whole.bin"), b"c" * (PART_SIZE + 1), storage_options=s3_target.options)
    sink = open_sink(s3_target.url("over.bin"), s3_target.options)
    sink.write(b"b" * (PART_SIZE + 1))
    sink.commit()
    with VideoWriter(s3_target.url("fox.mp4"), width=W, height=H, storage_options=s3_target.options) as video:
        video.write(np.zeros((3, H, W, 3), np.uint8))
    assert "-" not in etag("fox.json") and "-" not in etag("exact.bin") and "-" not in etag("fox.mp4")
    assert "-" not in etag("whole.bin") and etag("over.bin").endswith("-2")
    assert s3_target.read("over.bin") == b"b" * (PART_SIZE + 1)
    assert s3_target.read("whole.bin") == b"c" * (PART_SIZE + 1)
    assert s3_target.listing() == ["exact.bin", "fox.json", "fox.mp4", "over.bin", "whole.bin"]
