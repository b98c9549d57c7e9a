"""Storage faults: which ones retrying cannot fix, bounded network waits, a pre-flight probe, and cleanup
of multipart uploads that a killed process left open.

    options = with_timeouts(options, root)            # connect/read timeouts and a bounded retry count
    probe_storage_root(root, options)                 # once, before any model loads: PermanentStorageError?
    abort_open_uploads(root, options)                 # when a run is planned again: orphaned S3 uploads

Errors come in two kinds. `StorageError` (an OSError) is worth retrying: a throttled, unreachable or hung
object store. `PermanentStorageError` is not: a read-only or unwritable root, permission denied, a
missing bucket, a full disk or an exhausted quota. It is also a ValueError, so a job runner that treats
ValueError as "the request cannot succeed" fails the job at once instead of retrying it with backoff.
`is_permanent_storage_error` tells the two apart for any exception (its causes included), and
`storage_error` builds the right one with a one-line message naming the redacted URL.

Every URL in an error or a log line goes through `storage.urls.redact`.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.urls import join_url, protocol, redact

__all__ = [
    "CONNECT_TIMEOUT_S",
    "READ_TIMEOUT_S",
    "REQUEST_ATTEMPTS",
    "BucketNotFoundError",
    "PermanentStorageError",
    "StorageError",
    "abort_open_uploads",
    "describe_exception",
    "filesystem",
    "is_permanent_storage_error",
    "is_s3",
    "probe_storage_root",
    "storage_error",
    "with_timeouts",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # to open a connection to the storage endpoint
READ_TIMEOUT_S = 60.0  # without a byte from an open connection
REQUEST_ATTEMPTS = 3  # per S3 request, the first one included
PROBE_PREFIX = ".wanflow-probe-"
_PROBE_DATA = b"wanflow storage probe\n"
_CHAIN_LIMIT = 16  # causes and contexts looked at when classifying an error


class StorageError(OSError):
    """The destination cannot be written or read (missing bucket, permission denied, failed upload)."""


class PermanentStorageError(StorageError, ValueError):
    """A storage failure that retrying cannot fix: read-only or unwritable root, permission denied, missing
    bucket, disk full, quota exceeded.

    Both an OSError (a StorageError, as callers already expect from storage) and a ValueError (what job
    runners treat as permanent). `kind` is one of "read-only", "disk-full", "quota", "permission",
    "no-bucket", "not-a-directory", "is-a-directory"; `code` the errno name or S3 error code behind it.
    """

    def __init__(self, message: str, *, kind: str = "", code: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


class BucketNotFoundError(FileNotFoundError):
    """The bucket of an S3 URL does not exist (HeadBucket answered 404, which carries no error code)."""

    def __init__(self, bucket: str) -> None:
        super().__init__(errno.ENOENT, f"bucket {bucket} does not exist")
        self.bucket = bucket


# ------------------------------------------------------------------------------------------ classification

_ERRNO_KINDS: dict[int, str] = {
    errno.EROFS: "read-only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.ENOSPC: "disk-full",
    errno.ENOTDIR: "not-a-directory",
    errno.EISDIR: "is-a-directory",
}
if hasattr(errno, "EDQUOT"):
    _ERRNO_KINDS[errno.EDQUOT] = "quota"

_S3_KINDS: dict[str, str] = {
    "NoSuchBucket": "no-bucket",
    "AccessDenied": "permission",
    "AllAccessDisabled": "permission",
    "InvalidAccessKeyId": "permission",
    "SignatureDoesNotMatch": "permission",
    "403": "permission",  # HEAD requests: the status code is all there is
    "EntityTooSmall": "part-size",  # a WANFLOW_S3_PART_SIZE below what the server takes: every upload fails
}

_PHRASES: dict[str, str] = {
    "read-only": "read-only file system",
    "disk-full": "disk full",
    "quota": "disk quota exceeded",
    "permission": "permission denied",
    "not-a-directory": "not a directory",
    "is-a-directory": "the destination is a directory",
    "part-size": "the server refused a part under its minimum size (set WANFLOW_S3_PART_SIZE to 5 MiB)",
}


@dataclass(frozen=True)
class _Fault:
    """What made an error permanent: its kind, the errno name or S3 code, and the bucket if known."""

    kind: str
    code: str
    bucket: str = ""
    filename: str = ""

    def phrase(self) -> str:
        if self.kind == "no-bucket":
            return f"bucket {self.bucket} does not exist" if self.bucket else "the bucket does not exist"
        phrase = _PHRASES.get(self.kind, "permanent storage failure")
        return f"{phrase} ({self.code})" if self.code else phrase


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its explicit causes and implicit contexts, each once, at most `_CHAIN_LIMIT`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _CHAIN_LIMIT:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None


def _s3_code(exc: BaseException) -> tuple[str, str]:
    """(error code, bucket name) of a botocore ClientError, ('', '') for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or not isinstance(response.get("Error"), dict):
        return "", ""
    error = response["Error"]
    return str(error.get("Code") or ""), str(error.get("BucketName") or "")


def _fault_of(exc: BaseException) -> _Fault | None:
    """The permanent fault `exc` itself reports, or None (causes not looked at)."""
    if isinstance(exc, PermanentStorageError):
        return _Fault(exc.kind or "permanent", exc.code)
    if isinstance(exc, BucketNotFoundError):
        return _Fault("no-bucket", "NoSuchBucket", exc.bucket)
    code, bucket = _s3_code(exc)
    if code in _S3_KINDS:
        return _Fault(_S3_KINDS[code], code, bucket)
    if isinstance(exc, OSError) and exc.errno in _ERRNO_KINDS:
        filename = exc.filename if isinstance(exc.filename, str) else ""
        return _Fault(_ERRNO_KINDS[exc.errno], errno.errorcode[exc.errno], filename=filename)
    return None


def _find_fault(exc: BaseException) -> _Fault | None:
    links = list(_chain(exc))
    for link in links:
        if (fault := _fault_of(link)) is not None:
            return fault
    # s3fs turns AccessDenied into a PermissionError without an errno; without its ClientError cause it
    # is still a permission problem.
    if any(isinstance(link, PermissionError) for link in links):
        return _Fault("permission", "EACCES")
    return None


def is_permanent_storage_error(exc: BaseException) -> bool:
    """Whether retrying cannot fix `exc` or any of its causes: errno EROFS, EACCES, EPERM, ENOSPC, EDQUOT,
    ENOTDIR, EISDIR; S3 NoSuchBucket, AccessDenied, AllAccessDisabled, InvalidAccessKeyId,
    SignatureDoesNotMatch (or a bare 403), EntityTooSmall (a part size the server refuses); a
    PermanentStorageError or BucketNotFoundError.

    Timeouts, refused connections, throttling, server errors and a plain StorageError are transient.
    """
    return _find_fault(exc) is not None


def describe_exception(exc: BaseException) -> str:
    """A short, redacted one-line description of why a storage call failed: 'Type: text[: filename]'."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    else:
        text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {' '.join(text.split())}")


def storage_error(url: str, action: str, exc: BaseException, *, doing: str = "") -> StorageError:
    """The error to raise for `exc` while trying to `action` ('write', 'read', ...) `url`.

    A PermanentStorageError when `is_permanent_storage_error(exc)`, with the fault first
    ('cannot write /x/a.mp4: disk full (ENOSPC): OSError: No space left on device'); else a StorageError.
    `doing` ('upload failed') goes between the URL and the reason. Raise it `from exc`.
    """
    head = f"cannot {action} {redact(url)}: " + (f"{doing}: " if doing else "")
    fault = _find_fault(exc)
    if fault is None:
        return StorageError(head + describe_exception(exc))
    if fault.kind == "no-bucket" and not fault.bucket and protocol(url) in ("s3", "s3a"):
        fault = _Fault(fault.kind, fault.code, url.partition("://")[2].partition("/")[0])
    # A BucketNotFoundError says what the phrase already says: show what the server answered instead.
    shown = exc.__cause__ if isinstance(exc, BucketNotFoundError) and exc.__cause__ is not None else exc
    return PermanentStorageError(
        f"{head}{fault.phrase()}: {describe_exception(shown)}", kind=fault.kind, code=fault.code
    )


@contextlib.contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Turn any failure inside the block into a StorageError (or PermanentStorageError) naming the redacted
    URL and the reason; StorageErrors pass through unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        raise storage_error(url, action, exc) from exc


# ---------------------------------------------------------------------------------------- timeouts


def with_timeouts(
    storage_options: dict | None,
    url: str,
    *,
    connect: float = CONNECT_TIMEOUT_S,
    read: float = READ_TIMEOUT_S,
    attempts: int = REQUEST_ATTEMPTS,
) -> dict:
    """A copy of `storage_options` for `url` with connect and read timeouts and a bounded retry count
    added, never overriding a value the caller set.

    - s3:// (s3fs): `config_kwargs` gains `connect_timeout`, `read_timeout` and, when it has no `retries`
      at all, `retries={"total_max_attempts": attempts, "mode": "standard"}` (botocore retries timeouts,
      refused connections, throttling and 5xx with jittered backoff). s3fs runs a retry loop of its own
      around botocore's (`S3FileSystem.retries`, 5 tries of a read timeout, not an option): storage's
      own calls (`filesystem`) use an s3fs subclass without it, so one request waits at most about
      attempts x (connect + read) seconds against a hung endpoint; an S3FileSystem built elsewhere from
      these options may wait up to 5 times that.
    - http(s):// (aiohttp): `client_kwargs["timeout"]` becomes
      `aiohttp.ClientTimeout(sock_connect=connect, sock_read=read)` (no limit on the whole transfer).
    - anything else (local paths, memory://, chained URLs): returned unchanged (a copy).
    """
    if connect <= 0 or read <= 0 or attempts < 1:
        raise ValueError(f"connect={connect}, read={read}, attempts={attempts}: need > 0, > 0, >= 1")
    options = copy.copy(dict(storage_options or {}))
    scheme = protocol(url)
    if scheme in ("s3", "s3a"):
        # A deep copy: botocore rewrites the `retries` dict it is given (max_attempts -> total_max_attempts).
        config = copy.deepcopy(dict(options.get("config_kwargs") or {}))
        config.setdefault("connect_timeout", connect)
        config.setdefault("read_timeout", read)
        config.setdefault("retries", {"total_max_attempts": attempts, "mode": "standard"})
        options["config_kwargs"] = config
    elif scheme in ("http", "https"):
        client = dict(options.get("client_kwargs") or {})
        if "timeout" not in client:
            import aiohttp

            client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)
        options["client_kwargs"] = client
    return options


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for `url`, with `with_timeouts` defaults added to the options; for s3:// an
    S3FileSystem whose own retry loop makes one try, botocore's being the bounded one."""
    options = with_timeouts(storage_options, url)
    if protocol(url) in ("s3", "s3a"):
        cls = _bounded_s3_class()
        return cls(**options), cls._strip_protocol(url)
    return fsspec.core.url_to_fs(url, **options)


_DEFINE_LOCK = threading.Lock()


def _bounded_s3_class() -> type:
    """The S3FileSystem subclass `filesystem` uses, defined on first use (importing s3fs takes half a
    second) as the module global `_BoundedS3FileSystem`."""
    with _DEFINE_LOCK:
        cls = globals().get("_BoundedS3FileSystem")
        if cls is None:
            import s3fs

            class Bounded(s3fs.S3FileSystem):
                """s3fs with one try per request in its own retry loop (see `with_timeouts`); its instances
                are cached apart from plain S3FileSystem ones."""

                retries = 1

            Bounded.__name__ = Bounded.__qualname__ = "_BoundedS3FileSystem"
            Bounded.__module__ = __name__
            globals()["_BoundedS3FileSystem"] = cls = Bounded
        return cls


def __getattr__(name: str) -> Any:
    """Defines `_BoundedS3FileSystem` when something (unpickling a filesystem) asks for it first."""
    if name == "_BoundedS3FileSystem":
        return _bounded_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is an S3 filesystem (s3fs)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "s3" in protocols


def head_bucket(fs: fsspec.AbstractFileSystem, bucket: str) -> None:
    """Check that `bucket` exists: BucketNotFoundError if not. Access denied passes: HeadBucket needs
    s3:ListBucket, which a write-only policy may not grant."""
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except PermissionError:
        pass
    except FileNotFoundError as exc:
        raise BucketNotFoundError(bucket) from exc


# ------------------------------------------------------------------------------------------- the probe


def _probe_message(root: str, probe_url: str, fault: _Fault) -> str:
    where = redact(root)
    if fault.kind == "read-only":
        return f"storage root {where} is read-only ({fault.code})"
    if fault.kind == "no-bucket":
        return fault.phrase()
    if fault.kind == "permission":
        return f"permission denied writing {redact(probe_url)} ({fault.code})"
    if fault.kind == "not-a-directory":
        blocker = f": {redact(fault.filename)} is a file" if fault.filename else ""
        return f"storage root {where} is not a directory{blocker} ({fault.code})"
    return f"storage root {where}: {fault.phrase()}"


def _probe_local(root: str, path: str) -> None:
    if os.path.exists(root) and not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
    os.makedirs(root, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(_PROBE_DATA)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _probe_s3(fs: fsspec.AbstractFileSystem, path: str, probe_url: str) -> None:
    bucket, key, _ = fs.split_path(path)
    head_bucket(fs, bucket)
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=_PROBE_DATA)
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=key)
    except Exception as exc:  # a write-only policy: the root is writable, which is what was asked
        logger.warning(
            "could not delete the storage probe %s: %s", redact(probe_url), describe_exception(exc)
        )


def _remove_left_probes(fs: fsspec.AbstractFileSystem, path: str, probe_url: str) -> None:
    """Best effort: delete the probes that processes killed between writing and deleting theirs left beside
    `path` (local and S3 roots). A concurrent probe deleted early is harmless: its own delete of a missing
    probe is not an error. Failures (a policy without s3:ListBucket) are logged, never raised."""
    parent, _, _ = path.rpartition("/")
    try:
        if isinstance(fs, LocalFileSystem):
            names = [name for name in os.listdir(parent) if name.startswith(PROBE_PREFIX)]
            left = [os.path.join(parent, name) for name in names]
            for name in left:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
        else:
            bucket, key, _ = fs.split_path(f"{parent}/{PROBE_PREFIX}")
            page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=100)
            left = [item["Key"] for item in page.get("Contents") or []]
            for name in left:
                fs.call_s3("delete_object", Bucket=bucket, Key=name)
    except Exception as exc:
        logger.info("could not look for storage probes left beside %s: %s", redact(probe_url),
                    describe_exception(exc))  # fmt: skip
        return
    if left:
        logger.info("removed %d storage probe(s) that killed processes left beside %s", len(left),
                    redact(probe_url))  # fmt: skip


def probe_storage_root(url: str, storage_options: dict | None = None) -> None:
    """Write a tiny hidden object (`.wanflow-probe-<uuid>`) under the storage root `url` and delete it
    again: call once per run or shard, before any model loads.

    Creates a local root that does not exist yet (as writing outputs would). Raises
    PermanentStorageError with one clear line when retrying cannot help ("storage root /x is read-only
    (EROFS)", "bucket foo does not exist", "permission denied writing s3://...", "storage root /x: disk
    full (ENOSPC)"), StorageError for anything else (unreachable or hung endpoint: worth retrying later).
    A probe that could be written but not deleted (write-only S3 policy) is logged, not raised. Probes that
    killed processes left behind (on local and S3 roots) are deleted too: they belong to no catalog row.
    """
    probe_url = join_url(url, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        fs, path = filesystem(probe_url, storage_options)
        if isinstance(fs, LocalFileSystem):
            _probe_local(fs._strip_protocol(url), path)
            _remove_left_probes(fs, path, probe_url)
        elif is_s3(fs):
            _probe_s3(fs, path, probe_url)
            _remove_left_probes(fs, path, probe_url)
        else:
            root = fs._strip_protocol(url)
            if root:
                fs.makedirs(root, exist_ok=True)
            fs.pipe_file(path, _PROBE_DATA)
            fs.rm_file(path)
    except Exception as exc:
        fault = _find_fault(exc)
        if fault is None:
            raise StorageError(
                f"storage root {redact(url)} cannot be written: {describe_exception(exc)}"
            ) from exc
        raise PermanentStorageError(_probe_message(url, probe_url, fault), kind=fault.kind,
                                    code=fault.code) from exc  # fmt: skip


# ------------------------------------------------------------------------------------ open S3 uploads


def abort_open_uploads(
    prefix_url: str, storage_options: dict | None = None, *, older_than_s: float | None = None,
    folder: bool = True,
) -> int:  # fmt: skip
    """Abort every S3 multipart upload still open under `prefix_url` (a folder: s3://bucket/videos covers
    keys under videos/, not videos2/; with `folder=False`, every key that starts with it, such as one job's
    `.../fox-s1.`); returns how many were aborted. 0 for local and other filesystems.

    Uploads are left open by a process killed between uploading parts and completing or aborting them;
    the provider bills their parts until they are aborted. Call this when a run is planned again, before
    its shards start. An upload being written right now by another live run under the same prefix is
    aborted too (its write then fails and is retried); with `older_than_s`, uploads initiated less than
    that many seconds ago are kept. Errors: StorageError / PermanentStorageError.
    """
    with storage_errors(prefix_url, "list the open uploads under"):
        fs, path = filesystem(prefix_url, storage_options)
        if not is_s3(fs):
            return 0
        bucket, key, _ = fs.split_path(path)
        prefix = (f"{key.rstrip('/')}/" if key else "") if folder else key
        query: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        cutoff = None if older_than_s is None else time.time() - older_than_s
        aborted = 0
        while True:
            page = fs.call_s3("list_multipart_uploads", **query)
            for upload in page.get("Uploads") or []:
                if cutoff is not None and _initiated(upload) > cutoff:
                    continue
                try:
                    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                               UploadId=upload["UploadId"])  # fmt: skip
                except FileNotFoundError:  # completed or aborted meanwhile
                    continue
                aborted += 1
            if not page.get("IsTruncated"):
                break
            query.update(
                KeyMarker=page.get("NextKeyMarker", ""), UploadIdMarker=page.get("NextUploadIdMarker", "")
            )
    if aborted:
        logger.info("aborted %d open multipart upload(s) under %s", aborted, redact(prefix_url))
    return aborted


def _initiated(upload: dict) -> float:
    """When an upload listed by ListMultipartUploads was started (epoch seconds; 0 if not said)."""
    started = upload.get("Initiated")
    if isinstance(started, datetime):
        return (started if started.tzinfo else started.replace(tzinfo=UTC)).timestamp()
    return 0.0
