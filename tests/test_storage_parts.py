"""The S3 multipart part size: 5 MiB unless `WANFLOW_S3_PART_SIZE` says otherwise (the chaos trials make
small videos multipart uploads with it)."""

from __future__ import annotations

import hashlib

import moto.s3.models
import numpy as np
import pytest
from s3_server import BUCKET, Target

from storage.video import PART_SIZE, PART_SIZE_ENV, VideoWriter, part_size

W, H = 64, 48


def test_part_size_defaults_to_5_mib_and_reads_the_setting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(PART_SIZE_ENV, raising=False)
    assert part_size() == PART_SIZE == 5 * 2**20
    monkeypatch.setenv(PART_SIZE_ENV, " 65536 ")
    assert part_size() == 65536


@pytest.mark.parametrize("value", ["abc", "1.5", "12", str(6 * 2**30)])
def test_bad_part_size_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv(PART_SIZE_ENV, value)
    with pytest.raises(ValueError, match=PART_SIZE_ENV):
        part_size()


@pytest.mark.integration
def test_small_part_size_makes_a_small_video_multipart(s3_target: Target, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 2048)
    monkeypatch.setenv(PART_SIZE_ENV, "2048")
    rng = np.random.default_rng(0)
    with VideoWriter(s3_target.url("fox.mp4"), width=W, height=H, storage_options=s3_target.options) as video:
        video.write(rng.integers(0, 256, (5, H, W, 3), dtype=np.uint8))  # noise: several KB once encoded
    parts = -(-video.nbytes // 2048)
    assert parts > 1
    etag = s3_target.fs.info(f"{BUCKET}/videos/fox.mp4")["ETag"].strip('"')
    assert etag.endswith(f"-{parts}")
    assert hashlib.sha256(s3_target.read("fox.mp4")).hexdigest() == video.sha256
    assert s3_target.listing() == ["fox.mp4"]  # no upload left open


@pytest.mark.integration
def test_bad_part_size_fails_before_anything_is_written(s3_target: Target, monkeypatch: pytest.MonkeyPatch):
    """A ValueError, not a StorageError: a job fails once with it instead of being retried."""
    monkeypatch.setenv(PART_SIZE_ENV, "tiny")
    with pytest.raises(ValueError, match=PART_SIZE_ENV) as failure:
        VideoWriter(s3_target.url("fox.mp4"), width=W, height=H, storage_options=s3_target.options)
    assert not isinstance(failure.value, OSError)
    assert s3_target.listing() == []
