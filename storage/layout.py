"""Where every object goes: one place that names videos, sidecars and thumbnails.

    {root}/{run}/{item}/{item}-s{seed}.mp4          the video
    {root}/{run}/{item}/{item}-s{seed}.json         provenance sidecar
    {root}/{run}/{item}/{item}-s{seed}.thumb.webp   first frame
    {root}/{run}/{item}/{item}-s{seed}.poster.webp  contact sheet of a few frames
    {root}/{run}/{item}/{item}-s{seed}.latents.safetensors  the final latents (runs that keep them)

Run names and item ids come from users and manifests, so they are made safe before they become
keys: letters, digits, `.`, `_` and `-` pass; every other character is percent-encoded (so two
different ids never share a key and nothing can contain a `/`); a leading dot is encoded too, so
`.` and `..` cannot climb out of the root. Ids that are empty, too long, or hold control characters
are rejected with a message naming the id.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from storage.urls import join_url

__all__ = ["MAX_ID_LENGTH", "ObjectKeys", "OutputLayout", "safe_name", "sidecar_bytes", "software_versions"]

MAX_ID_LENGTH = 128
MAX_SEGMENT_BYTES = 200  # an encoded id must fit a file name (255 bytes) with its suffix
_SAFE = re.compile(r"[A-Za-z0-9._-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_name(value: str, *, what: str = "item id") -> str:
    """A key segment for `value`: safe characters kept, the rest percent-encoded (UTF-8).

    Raises ValueError naming the value when it is empty, longer than MAX_ID_LENGTH characters (or
    MAX_SEGMENT_BYTES once encoded), or holds control characters.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} {value!r}: must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{what} {value[:40]!r}...: longer than {MAX_ID_LENGTH} characters")
    if _CONTROL.search(value):
        raise ValueError(f"{what} {value!r}: control characters are not allowed")
    out = "".join(ch if _SAFE.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode()) for ch in value)
    out = "%2E" + out[1:] if out.startswith(".") else out
    if len(out) > MAX_SEGMENT_BYTES:
        raise ValueError(
            f"{what} {value[:40]!r}...: {len(out)} characters once encoded for storage, more than "
            f"{MAX_SEGMENT_BYTES} (ids with many non-ASCII characters grow 3 to 9 times)"
        )
    return out


@dataclass(frozen=True)
class ObjectKeys:
    """The URLs of one video's objects."""

    video: str
    sidecar: str
    thumbnail: str
    poster: str
    latents: str


@dataclass(frozen=True)
class OutputLayout:
    """Names objects under a storage root (a local directory or any fsspec URL such as s3://bucket/x)."""

    root: str

    def item_prefix(self, run: str, item: str) -> str:
        return join_url(self.root, safe_name(run, what="run name"), safe_name(item))

    def keys(self, run: str, item: str, seed: int) -> ObjectKeys:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed {seed!r}: must be a non-negative integer")
        base = join_url(self.item_prefix(run, item), f"{safe_name(item)}-s{seed}")
        return ObjectKeys(f"{base}.mp4", f"{base}.json", f"{base}.thumb.webp", f"{base}.poster.webp",
                          f"{base}.latents.safetensors")  # fmt: skip


def software_versions() -> dict[str, str]:
    """Versions of what made a video (distributions that are not installed are left out)."""
    versions = {"python": platform.python_version()}
    for dist in ("wanflow", "torch", "diffusers", "transformers", "imageio-ffmpeg"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def sidecar_bytes(provenance: dict[str, Any]) -> bytes:
    """The JSON sidecar: the given provenance (request, model, sampler settings, seed, noise device,
    timings, sha256, ...) plus software versions and a timestamp; stable key order, UTF-8."""
    doc = {
        "schema": "wanflow.sidecar/1",
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "software": software_versions(),
        **provenance,
    }
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, default=str).encode()
