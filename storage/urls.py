"""Small URL helpers shared by storage and the catalog: joining keys and keeping secrets out of text.

Storage locations are fsspec URLs (`/data/out`, `file:///data/out`, `s3://bucket/prefix`); database
locations are SQLAlchemy URLs (`sqlite:///...`, `postgresql+psycopg://user:secret@host/db`).
Anything shown to a person (errors, logs, the catalog, sidecars) goes through `redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SECRET_OPTION_KEYS", "absolute_url", "has_secret", "is_under", "join_url", "protocol", "redact",
    "redact_options",
]  # fmt: skip

# Userinfo in a URL: scheme://user:password@host -> scheme://user:***@host. The password runs to the first
# '@' (it may hold spaces and '/', as SQLAlchemy reads it; '@' is percent-encoded), never past a line end.
_USERINFO = re.compile(
    r"(?<![a-zA-Z0-9+.\-])(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\n]*)@"
)
# Query parameters that carry secrets (presigned URLs, DSNs: password=, sslpassword=, ...). The value runs
# to the next '&' or quote, or the line's end: a space inside a password does not end the masking.
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>(?:password|passwd|pwd|secret|token|signature|x-amz-signature|x-amz-credential"
    r"|x-amz-security-token|aws_secret_access_key|aws_session_token|sig|sslkey)=)[^&\n'\"]+"
)
SECRET_OPTION_KEYS = frozenset(
    {"secret", "key", "token", "password", "aws_secret_access_key", "aws_session_token", "session_token",
     "secret_access_key", "access_key_id", "aws_access_key_id"}
)  # fmt: skip


def redact(text: str) -> str:
    """Mask passwords in URLs and secret query parameters anywhere in `text`."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


def has_secret(text: str) -> bool:
    """Whether `text` (a URL) carries a credential `redact` would mask: a password in its userinfo, or a
    secret query parameter."""
    return redact(text) != text


def absolute_url(url: str) -> str:
    """A storage location stated once and for all: local paths (and file:// URLs) become absolute,
    normalised paths (`~` expanded); other URLs lose trailing slashes."""
    if url.startswith("file://"):
        url = url.removeprefix("file://")
    if "://" not in url:
        return str(Path(url).expanduser().resolve())
    return url.rstrip("/")


def is_under(url: str, root: str) -> bool:
    """Whether `url` is `root` itself or an object under it (both as stored: absolute)."""
    url, root = absolute_url(url), absolute_url(root)
    return url == root or url.startswith(root.rstrip("/") + "/")


def redact_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of fsspec storage options with credential values masked (nested dicts too)."""
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if isinstance(value, Mapping):
            out[key] = redact_options(value)
        elif key.lower() in SECRET_OPTION_KEYS:
            out[key] = "***"
        else:
            out[key] = redact(value) if isinstance(value, str) else value
    return out


def protocol(url: str) -> str:
    """'s3' for s3://..., 'file' for plain paths and file://..."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else "file"


def join_url(root: str, *parts: str) -> str:
    """Join key parts onto a storage root with single slashes (parts are already sanitised names)."""
    out = root.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out
