"""Small URL helpers shared by storage and the catalog: joining keys and keeping secrets out of text.

Storage locations are fsspec URLs (`/data/out`, `file:///data/out`, `s3://bucket/prefix`); database
locations are SQLAlchemy URLs (`sqlite:///...`, `postgresql+psycopg://user:secret@host/db`).
Anything shown to a person (errors, logs, the catalog, sidecars) goes through `redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["SECRET_OPTION_KEYS", "join_url", "protocol", "redact", "redact_options"]

# Userinfo in a URL: scheme://user:password@host -> scheme://user:***@host
_USERINFO = re.compile(
    r"(?<![a-zA-Z0-9+.\-])(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@"
)
# Query parameters that carry secrets (presigned URLs, DSNs).
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>(?:password|secret|token|signature|x-amz-signature|x-amz-credential|x-amz-security-token"
    r"|aws_secret_access_key|aws_session_token|sig)=)[^&\s]+"
)
SECRET_OPTION_KEYS = frozenset(
    {"secret", "key", "token", "password", "aws_secret_access_key", "aws_session_token", "session_token",
     "secret_access_key", "access_key_id", "aws_access_key_id"}
)  # fmt: skip


def redact(text: str) -> str:
    """Mask passwords in URLs and secret query parameters anywhere in `text`."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


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
