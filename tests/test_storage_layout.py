"""Object naming: ids become safe key segments; nothing can escape the storage root."""

from __future__ import annotations

import json

import pytest

from storage.layout import OutputLayout, safe_name, sidecar_bytes
from storage.urls import join_url, protocol, redact, redact_options


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("fox-01", "fox-01"),
        ("a b", "a%20b"),
        ("../../etc/passwd", "%2E.%2F..%2Fetc%2Fpasswd"),
        ("..", "%2E."),
        (".hidden", "%2Ehidden"),
        ("/abs/path", "%2Fabs%2Fpath"),
        ("C:\\x", "C%3A%5Cx"),
        ("100%", "100%25"),
        ("狐狸", "%E7%8B%90%E7%8B%B8"),
    ],
)
def test_safe_name_encodes_what_could_escape(raw, safe):
    assert safe_name(raw) == safe
    assert "/" not in safe and "\\" not in safe and not safe.startswith(".")


def test_distinct_ids_get_distinct_keys():
    ids = ["a/b", "a%2Fb", "a b", "a_b", "a.b", ".a", "%2Ea"]
    assert len({safe_name(i) for i in ids}) == len(ids)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "must be a non-empty string"),
        ("  ", "must be a non-empty string"),
        ("x" * 129, "longer than 128"),
        ("狐" * 100, "900 characters once encoded"),
        ("a\nb", "control characters"),
    ],
)
def test_bad_ids_are_rejected_with_the_id(raw, message):
    with pytest.raises(ValueError, match=message):
        safe_name(raw)


def test_keys_stay_under_the_root():
    layout = OutputLayout("s3://bucket/videos/")
    keys = layout.keys("nightly 2026-11-24", "../../escape", 42)
    prefix = "s3://bucket/videos/nightly%202026-11-24/%2E.%2F..%2Fescape/"
    assert keys.video == prefix + "%2E.%2F..%2Fescape-s42.mp4"
    assert keys.sidecar.endswith("-s42.json") and keys.thumbnail.endswith("-s42.thumb.webp")
    assert all(k.startswith(prefix) for k in (keys.video, keys.sidecar, keys.thumbnail, keys.poster))
    with pytest.raises(ValueError, match="seed -1"):
        layout.keys("run", "item", -1)


def test_sidecar_is_json_with_versions():
    doc = json.loads(sidecar_bytes({"seed": 3, "sha256": "ab", "request": {"prompt": "狐狸"}}))
    assert doc["seed"] == 3 and doc["request"]["prompt"] == "狐狸"
    assert {"python", "torch"} <= doc["software"].keys()


def test_url_helpers():
    assert join_url("s3://b/x/", "/run/", "item") == "s3://b/x/run/item"
    assert protocol("s3://b/x") == "s3" and protocol("/tmp/x") == "file" and protocol("file:///x") == "file"
    assert (
        redact("postgresql+psycopg://wan:hunter2@db:5432/catalog")
        == "postgresql+psycopg://wan:***@db:5432/catalog"
    )
    assert "abc" not in redact("https://h/k?X-Amz-Signature=abc&x=1")
    opts = redact_options({"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://h"}})
    assert opts == {"key": "***", "secret": "***", "client_kwargs": {"endpoint_url": "http://h"}}
