"""Input images: where a manifest's image reference points, its sha256 at planning, its bytes at run time.

A job's identity holds the sha256 of each of its images (`image_sha256`, at planning: an edited image makes a
new job); the job reads the image once when it runs (`read_image`) and refuses it if its bytes changed since.
Both read through `storage.faults.filesystem` (connect and read timeouts) with the storage options of the
image's own URL.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from flows.settings import Settings
from storage.faults import filesystem
from storage.urls import redact

__all__ = [
    "IMAGE_FIELDS", "BadImage", "hash_images", "image_sha256", "read_image", "read_input",
    "resolve_image_uri",
]  # fmt: skip

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("image", "last_image")
IMAGE_HASH_THREADS = 16


class HasStorageOptions(Protocol):
    """Whatever knows the fsspec options for a URL (a job's context, the settings)."""

    def storage_options_for(self, url: str) -> dict[str, Any]: ...


def resolve_image_uri(image: str, manifest_url: str) -> str:
    """An image reference as written in a manifest -> an absolute URL or path: URLs and absolute paths
    stay; relative paths are taken from the manifest's directory (local: made absolute, so the job does
    not depend on where the run started; remote: normalised, without the manifest URL's query)."""
    if "://" in image or image.startswith("/"):
        return image
    if "://" in manifest_url:
        scheme, _, rest = manifest_url.partition("://")
        path = rest.split("?", 1)[0].split("#", 1)[0]
        base = posixpath.dirname(path)
        return f"{scheme}://{posixpath.normpath(posixpath.join(base, image))}"
    return str((Path(manifest_url).expanduser().resolve().parent / image).resolve())


def hash_images(uris: list[str], settings: Settings | None) -> dict[str, str | None]:
    """{uri: sha256 or None} of each image, read in parallel (`IMAGE_HASH_THREADS`)."""
    if not uris:
        return {}
    with ThreadPoolExecutor(max_workers=min(IMAGE_HASH_THREADS, len(uris))) as pool:
        return dict(zip(uris, pool.map(lambda uri: image_sha256(uri, settings), uris), strict=True))


def image_sha256(uri: str, settings: Settings | None, attempts: int = 3) -> str | None:
    """sha256 of an image's bytes; None if it cannot be read (the job then fails with the reason).
    A missing file is not retried; other errors (a throttled object store) are, twice."""
    options = settings.storage_options_for(uri) if settings else {}
    for attempt in range(1, attempts + 1):
        digest = hashlib.sha256()
        try:
            fs, path = filesystem(uri, options)  # connect and read timeouts
            with fs.open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            log.warning("image %s cannot be read: %s", redact(uri), redact(str(exc)))
            return None
        except Exception as exc:
            if attempt == attempts:
                log.warning("image %s cannot be read: %s", redact(uri), redact(str(exc)))
                return None
            time.sleep(0.5 * attempt)
    return None


MAX_IMAGE_BYTES = 64 << 20


class BadImage(ValueError):
    """An image a job cannot use (missing, unreadable, not an image, changed since planning): not retried."""


def read_input(
    uri: str, options: dict[str, Any], where: str, limit: int, kind: str, bad: type[ValueError]
) -> bytes:
    """An input's bytes, read once through `storage.faults.filesystem` (connect and read timeouts). A file
    that is missing, unreadable or over `limit` bytes raises `bad` (a permanent error, naming `where`);
    other errors (a throttled or unreachable object store) propagate as they are: transient, retried."""
    try:
        fs, path = filesystem(uri, options)
        size = fs.size(path)
        if size is not None and size > limit:
            raise bad(f"{where} is {size} bytes; {kind} over {limit} bytes are refused")
        return fs.cat_file(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise bad(f"{where} cannot be read: {type(exc).__name__}: {redact(str(exc))}") from None


def read_image(params: dict[str, Any], name: str, ctx: HasStorageOptions) -> Any:
    """The job's `name` image ("image" or "last_image") as an RGB PIL image, read once, its bytes checked
    against the sha256 recorded when the job was planned."""
    from PIL import Image, UnidentifiedImageError

    uri = params[name]
    where = f"{name} {redact(uri)}"
    data = read_input(uri, ctx.storage_options_for(uri), where, MAX_IMAGE_BYTES, "images", BadImage)
    expected = params.get(f"{name}_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise BadImage(f"{where} changed since the job was planned (sha256 differs); plan it again")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:  # (its message names the in-memory buffer, not the file)
        raise BadImage(f"{where} is not a readable image: no format knows its {len(data)} bytes") from None
    except (Image.DecompressionBombError, OSError, ValueError) as exc:
        raise BadImage(f"{where} is not a readable image: {exc}") from None
