"""Quality signals (storage/signals.py) on synthetic frame streams: black, flat and frozen stretches flagged,
motion ordered as expected, a re-encoded video found as a near-duplicate and a different one not."""

from __future__ import annotations

import re

import imageio_ffmpeg
import numpy as np
import pytest

from storage.signals import SignalMeter, VideoSignals, is_duplicate, phash_distance
from storage.video import VideoWriter

H, W, FPS = 96, 128, 16


def _measure(frames: np.ndarray, chunk: int = 5) -> VideoSignals:
    meter = SignalMeter(FPS)
    for start in range(0, len(frames), chunk):  # as the decoder hands them over: chunks
        meter.update(frames[start : start + chunk])
    return meter.result()


def _pattern(n: int, speed: float, seed: int = 0) -> np.ndarray:
    """A textured scene panning `speed` pixels per frame: uint8 [n, H, W, 3]."""
    g = np.random.default_rng(seed)
    world = g.integers(0, 256, size=(H, W * 4, 3), dtype=np.uint8)
    world = np.repeat(np.repeat(world[::8, ::8], 8, axis=0), 8, axis=1)[:H]  # 8-pixel blocks
    return np.stack([np.roll(world, -round(i * speed), axis=1)[:, :W] for i in range(n)])


def test_black_flat_and_frozen_stretches_are_flagged():
    black = _measure(np.zeros((33, H, W, 3), np.uint8))
    assert black.black and black.flat and black.frozen and black.motion == 0.0
    assert (black.black_frames, black.flat_frames, black.frozen_frames) == (33, 33, 32)
    grey = _measure(np.full((33, H, W, 3), 128, np.uint8))
    assert grey.flat and grey.frozen and not grey.black
    still = _measure(np.repeat(_pattern(1, 0), 33, axis=0))
    assert still.frozen and not still.flat and not still.black and still.motion == 0.0
    moving = _measure(_pattern(33, 2.0))
    assert not (moving.frozen or moving.flat or moving.black) and moving.frozen_frames == 0
    # Half a second of black inside two seconds of motion: counted, but too short to flag (1 s).
    cut = np.concatenate([_pattern(12, 2.0), np.zeros((8, H, W, 3), np.uint8), _pattern(13, 2.0, seed=1)])
    brief = _measure(cut)
    assert brief.black_frames == 8 and not brief.black
    assert _measure(np.concatenate([cut, np.zeros((20, H, W, 3), np.uint8)])).black


def test_motion_grows_with_speed():
    speeds = [0.0, 0.5, 2.0, 4.0]  # pixels per frame, over 8-pixel blocks
    motion = [_measure(_pattern(17, s)).motion for s in speeds]
    assert motion == sorted(motion) and motion[0] == 0.0 and motion[1] > 0
    noise = np.random.default_rng(3).integers(0, 256, size=(17, H, W, 3), dtype=np.uint8)
    assert _measure(noise).motion > motion[-1]


def _encode_and_decode(tmp_path, frames: np.ndarray, crf: int, name: str) -> np.ndarray:
    url = str(tmp_path / f"{name}.mp4")
    with VideoWriter(url, width=W, height=H, fps=FPS, crf=crf) as video:
        video.write(frames)
    reader = imageio_ffmpeg.read_frames(url)
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def test_a_re_encode_is_a_near_duplicate_and_another_video_is_not(tmp_path):
    source = _pattern(41, 1.5, seed=4)
    good = _measure(_encode_and_decode(tmp_path, source, 18, "good"))
    poor = _measure(_encode_and_decode(tmp_path, source, 40, "poor"))
    other = _measure(_encode_and_decode(tmp_path, _pattern(41, 1.5, seed=5), 18, "other"))
    assert len(good.phash) == 2 * 8 * 6  # frames 0, 8, ..., 40 (the stride doubles past 8): 64 bits each
    assert is_duplicate(good.phash, poor.phash), phash_distance(good.phash, poor.phash)
    assert not is_duplicate(good.phash, other.phash), phash_distance(good.phash, other.phash)
    assert phash_distance(good.phash, poor.phash) < phash_distance(good.phash, other.phash) / 2
    # A shorter cut of the same video hashes fewer frames; they are compared at matching positions.
    assert phash_distance(good.phash, good.phash) == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunking_does_not_change_the_signals(chunk):
    frames = _pattern(21, 3.0)
    assert _measure(frames, chunk) == _measure(frames, 21)


def test_empty_and_single_frame_videos():
    empty = SignalMeter().result()
    assert empty.frames == 0 and empty.phash == "" and not (empty.black or empty.frozen)
    one = _measure(np.zeros((1, H, W, 3), np.uint8))
    assert one.black and one.flat and not one.frozen and one.motion == 0.0
    assert phash_distance("", one.phash) is None


# ------------------------------------------------------------------------------------ in the catalog


def test_filters_parse_and_say_what_is_wrong():
    from storage.catalog.filters import Condition, parse_filter

    assert parse_filter("motion > 0.02 and not frozen AND width >= 832") == [
        Condition("motion", ">", 0.02), Condition("frozen", "=", False), Condition("width", ">=", 832),
    ]  # fmt: skip
    assert parse_filter("black") == [Condition("black", "=", True)] and parse_filter("  ") == []
    assert str(parse_filter("flat != true")[0]) == "flat != true"
    for text, message in [
        ("speed > 1", "unknown field 'speed'; fields: motion"),
        ("motion >> 1", "expected FIELD OP VALUE"),
        ("motion > fast", "motion takes a number, got 'fast'"),
        ("frozen > 1", "frozen is true or false; use = or !="),
        ("width", "width is a number; compare it"),
        ("black = maybe", "black is true or false, got 'maybe'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_filter(text)


def test_outputs_are_filtered_by_their_signals_in_sql(catalog_url):
    from catalog_helpers import claim

    from storage.catalog import LATENTS_CODEC, Catalog, JobSpec, OutputRecord
    from storage.catalog.filters import parse_filter

    catalog = Catalog(catalog_url)
    catalog.upgrade()
    run = catalog.create_run("signals", "/m.jsonl", "ab" * 32, {})
    catalog.plan_jobs(run.id, [JobSpec(f"v{i}", i, "tiny-t2v", "fp", {"prompt": "p"}) for i in range(5)])
    signals = [
        dict(motion=0.0, black=True, flat=True, frozen=True, black_frames=9),
        dict(motion=0.01, black=False, flat=False, frozen=True, black_frames=0),
        dict(motion=0.05, black=False, flat=False, frozen=False, black_frames=0),
        {},  # stored before signals were measured: every condition on them is false
        # Latents only: nothing decoded, nothing measured.
        dict(uri=(z := "/out/v4.latents.safetensors"), codec=LATENTS_CODEC, latents_uri=z, latents_bytes=10),
    ]
    for job, values in zip(claim(catalog, 5, run_id=run.id, worker="w"), signals, strict=True):
        facts = {"uri": f"/out/{job.item_id}.mp4", "sha256": "cd" * 32, "bytes": 10, "width": 64,
                 "height": 48, "frames": 9, "fps": 16.0, "codec": "h264"}  # fmt: skip
        record = OutputRecord(**{**facts, **values})
        catalog.mark_succeeded(job.id, record, worker="w")

    def items(text: str) -> list[str]:
        jobs = {j.id: j.item_id for j in catalog.jobs(run.id)}
        return sorted(jobs[o.job_id] for o in catalog.outputs(run.id, where=parse_filter(text)))

    assert items("motion > 0.02") == ["v2"]
    assert items("motion >= 0.01 and frozen") == ["v1"]
    assert items("not frozen") == ["v2"]
    assert items("black_frames = 0") == ["v1", "v2"]
    assert items("width = 64") == ["v0", "v1", "v2", "v3", "v4"]
    assert items("video") == ["v0", "v1", "v2", "v3"] and items("not video") == ["v4"]
    assert items("latents") == ["v4"] and items("video and not latents and not black") == ["v1", "v2"]
    assert [o.has_video for o in catalog.outputs(run.id, where=parse_filter("latents"))] == [False]
    stored = catalog.outputs(run.id, where=parse_filter("black"))
    assert len(stored) == 1 and stored[0].black_frames == 9 and stored[0].motion == 0.0
    catalog.close()


def test_the_duplicate_index_decides_as_pairwise_comparison():
    """`DuplicateIndex` (all kept hashes at once) keeps exactly what one-by-one `is_duplicate` keeps: near
    copies of earlier hashes, mixed frame counts (shorter against longer at spread positions), empties."""
    from storage.signals import DuplicateIndex

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(300, 64), dtype=np.uint8)
    hashes = [""]
    for i, row in enumerate(base):
        if i % 4 == 1:  # a near copy of an earlier video: 3 to 14 bits flipped per frame on average
            bits = np.unpackbits(base[i // 2])
            bits[rng.integers(0, 512, size=int(rng.integers(24, 112)))] ^= 1
            row = np.packbits(bits)
        frames = 8 if i % 6 else int(rng.integers(1, 9))
        hashes.append(row[: frames * 8].tobytes().hex())
    pairwise: list[str] = []
    index, kept = DuplicateIndex(), []
    for phash in hashes:
        if phash and not any(is_duplicate(phash, other) for other in pairwise):
            pairwise.append(phash)
        if not index.near(phash):
            index.add(phash)
            kept.append(phash)
    assert [h for h in kept if h] == pairwise and len(index) == len(pairwise)
    assert 200 < len(pairwise) < 280  # some near copies were found, not all
