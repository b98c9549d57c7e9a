"""Quality signals of a video, measured on its frames as they stream to the encoder (no second decode).

`SignalMeter.update` takes each uint8 chunk [n, H, W, 3] that goes to ffmpeg; `SignalMeter.result` gives a
`VideoSignals`:

- `motion`: the mean absolute change of luma (in [0, 1]) from one frame to the next, averaged over the frame
  pairs: 0 for a still video, about 0.01-0.05 for ordinary camera or subject motion, more for cuts and noise;
- `black_frames`, `flat_frames`, `frozen_frames`: frames whose mean luma is under `BLACK_LUMA`, whose luma
  standard deviation is under `FLAT_STD` (one colour, black included), or whose change from the previous
  frame is under `FROZEN_CHANGE`; and `black`, `flat`, `frozen`: whether such frames make a stretch of at
  least `STRETCH_S` seconds (or the whole video, when it is shorter);
- `phash`: a perceptual hash of up to `HASH_FRAMES` frames spread evenly over the video (frame 0, then every
  k-th frame, k doubling as the video grows), 64 bits each (the signs of the 8 x 8 lowest DCT frequencies of
  a 32 x 32 luma thumbnail against their median), as hex: videos whose hashes differ by at most
  `DUPLICATE_BITS` bits per frame on average (`phash_distance`) are near-duplicates (a re-encode, a resize).

Every measure works on frames subsampled to at most `SIGNAL_WIDTH` pixels wide (a stride, no filtering), so
its cost does not grow with the resolution: about a millisecond per 480P frame.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = [
    "BLACK_LUMA", "DUPLICATE_BITS", "FLAT_STD", "FROZEN_CHANGE", "HASH_FRAMES", "STRETCH_S", "DuplicateIndex",
    "SignalMeter", "Spread", "VideoSignals", "is_duplicate", "phash_distance",
]  # fmt: skip

SIGNAL_WIDTH = 128  # frames are subsampled (by a stride) to at most this many pixels wide
BLACK_LUMA = 0.06  # mean luma under this: a black frame (video black is 16/255 = 0.063)
FLAT_STD = 0.02  # luma standard deviation under this: a flat (one-colour) frame
FROZEN_CHANGE = 0.002  # mean absolute luma change under this: the frame repeats the previous one
STRETCH_S = 1.0  # a flag needs a stretch of flagged frames this long
HASH_FRAMES = 8
DUPLICATE_BITS = 10  # of 64, per hashed frame on average
_HASH_SIDE, _HASH_LOW = 32, 8
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0  # BT.601 weights, uint8 -> [0, 1]


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix [n, n] (row k: frequency k)."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(math.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.astype(np.float32)


_DCT = _dct_matrix(_HASH_SIDE)


@dataclasses.dataclass(frozen=True)
class VideoSignals:
    """What `SignalMeter` measured (see the module docstring). `frames`: how many it saw."""

    frames: int
    motion: float
    black_frames: int
    flat_frames: int
    frozen_frames: int
    black: bool
    flat: bool
    frozen: bool
    phash: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Spread:
    """Up to `limit` items of a stream, spread evenly over it without knowing its length: item 0, then every
    `stride`-th, the stride doubling (and every other kept item dropped) whenever more than `limit` would be
    kept. `wants(index)` says whether item `index` would be kept, so it is made only then (`add`)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.stride = limit, 1
        self.items: list[tuple[int, Any]] = []  # (index in the stream, value), in order

    def wants(self, index: int) -> bool:
        return self.limit > 0 and index % self.stride == 0

    def add(self, index: int, value: Any) -> None:
        self.items.append((index, value))
        if len(self.items) > self.limit:
            self.stride *= 2
            self.items = [(i, v) for i, v in self.items if i % self.stride == 0]


class _Run:
    """The longest run of consecutive flagged frames, and the flagged count."""

    def __init__(self) -> None:
        self.count = self.current = self.longest = 0

    def add(self, flagged: bool) -> None:
        if flagged:
            self.count += 1
            self.current += 1
            self.longest = max(self.longest, self.current)
        else:
            self.current = 0


class SignalMeter:
    """Measures `VideoSignals` over uint8 frame chunks [n, H, W, 3] fed in order (`update`), at `fps`."""

    def __init__(self, fps: float = 16.0) -> None:
        self.fps = fps
        self.frames = 0
        self._previous: np.ndarray | None = None  # the last frame's subsampled luma [h, w]
        self._change_sum = 0.0
        self._black, self._flat, self._frozen = _Run(), _Run(), _Run()
        self._hashes = Spread(HASH_FRAMES)  # (frame index, its 64 bits)

    def update(self, frames: np.ndarray) -> None:
        """frames: uint8 [n, H, W, 3] (the chunk the encoder gets)."""
        if len(frames) == 0:
            return
        step = max(1, math.ceil(frames.shape[2] / SIGNAL_WIDTH))
        luma = frames[:, ::step, ::step].astype(np.float32) @ _LUMA  # [n, h, w] in [0, 1]
        means = luma.mean(axis=(1, 2))
        stds = luma.std(axis=(1, 2))
        for i in range(len(luma)):
            self._black.add(bool(means[i] < BLACK_LUMA))
            self._flat.add(bool(stds[i] < FLAT_STD))
            if self._previous is not None:
                change = float(np.abs(luma[i] - self._previous).mean())
                self._change_sum += change
                self._frozen.add(change < FROZEN_CHANGE)
            self._previous = luma[i]
            if self._hashes.wants(self.frames):
                self._hashes.add(self.frames, frame_hash(luma[i]))
            self.frames += 1

    def result(self) -> VideoSignals:
        """The signals of every frame fed so far."""
        stretch = max(1, min(self.frames, math.ceil(STRETCH_S * self.fps)))
        pairs = max(self.frames - 1, 0)
        hashes = [h for _, h in self._hashes.items]
        bits = np.concatenate(hashes) if hashes else np.zeros(0, dtype=bool)
        return VideoSignals(
            frames=self.frames,
            motion=round(self._change_sum / pairs, 6) if pairs else 0.0,
            black_frames=self._black.count,
            flat_frames=self._flat.count,
            frozen_frames=self._frozen.count,
            black=self.frames > 0 and self._black.longest >= stretch,
            flat=self.frames > 0 and self._flat.longest >= stretch,
            # A frozen stretch of k frames is k - 1 repeats after its first frame.
            frozen=pairs > 0 and self._frozen.longest >= max(1, min(pairs, stretch - 1)),
            phash=np.packbits(bits).tobytes().hex(),
        )


def frame_hash(luma: np.ndarray) -> np.ndarray:
    """luma: [h, w] in [0, 1] -> 64 bools: the 8 x 8 lowest DCT frequencies of its 32 x 32 block-mean
    thumbnail, each above (True) or below the median of those 64 coefficients."""
    h, w = luma.shape
    rows = np.linspace(0, h, _HASH_SIDE + 1).astype(int)[:-1]
    cols = np.linspace(0, w, _HASH_SIDE + 1).astype(int)[:-1]
    thumb = np.add.reduceat(np.add.reduceat(luma, rows, axis=0), cols, axis=1)
    sizes = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w)))
    thumb = thumb / np.maximum(sizes, 1)
    low = (_DCT @ thumb @ _DCT.T)[:_HASH_LOW, :_HASH_LOW].ravel()
    return low > np.median(low)


def phash_distance(a: str, b: str) -> float | None:
    """The mean number of differing bits per hashed frame (0-64) of two `VideoSignals.phash` values; the
    shorter hash's frames are compared with the longer's at evenly spread positions. None when either
    is empty."""
    bits_a = np.unpackbits(np.frombuffer(bytes.fromhex(a), dtype=np.uint8)).reshape(-1, 64)
    bits_b = np.unpackbits(np.frombuffer(bytes.fromhex(b), dtype=np.uint8)).reshape(-1, 64)
    if not len(bits_a) or not len(bits_b):
        return None
    if len(bits_a) > len(bits_b):
        bits_a, bits_b = bits_b, bits_a
    picks = np.round(np.linspace(0, len(bits_b) - 1, len(bits_a))).astype(int)
    return float((bits_a != bits_b[picks]).sum(axis=1).mean())


def is_duplicate(a: str, b: str, max_bits: float = DUPLICATE_BITS) -> bool:
    """Whether two videos' perceptual hashes make them near-duplicates (`phash_distance` <= max_bits)."""
    distance = phash_distance(a, b)
    return distance is not None and distance <= max_bits


def _frame_words(phash: str) -> np.ndarray:
    """A `VideoSignals.phash` as one 64-bit word per hashed frame: uint64 [F]."""
    return np.frombuffer(bytes.fromhex(phash), dtype=np.uint64)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy 2's `bitwise_count`, else a byte table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    as_bytes = table[words.view(np.uint8)].reshape(*words.shape, 8)
    return as_bytes.sum(axis=-1)


class DuplicateIndex:
    """The perceptual hashes seen so far, for near-duplicate search over many videos: `near(phash)` is
    whether any added hash `is_duplicate` of it (the same test, `phash_distance` <= `max_bits`), asked of all
    of them at once. Hashes are kept by frame count, each count one uint64 matrix [n, F] that grows by
    doubling; a query is an XOR and a popcount over each matrix. `benchmarks/duplicates.py` (2 CPU cores):
    100,000 videos searched in 119 s, where comparing pairs one by one (about 12 us a pair) would take
    some 15 hours; on 2,000 videos both keep the same ones, 114 times faster."""

    def __init__(self, max_bits: float = DUPLICATE_BITS) -> None:
        self.max_bits = max_bits
        self._groups: dict[int, tuple[np.ndarray, int]] = {}  # frames -> (matrix [capacity, F], rows used)

    def __len__(self) -> int:
        return sum(used for _, used in self._groups.values())

    def near(self, phash: str) -> bool:
        """Whether a near-duplicate of `phash` was added (False for an empty hash, as `is_duplicate`)."""
        frames = _frame_words(phash)
        if not len(frames):
            return False
        for count, (matrix, used) in self._groups.items():
            if not used:
                continue
            stored = matrix[:used]
            if count == len(frames):
                pairs = (stored, frames[None, :])
            elif len(frames) < count:  # the shorter's frames against the longer's at evenly spread positions
                picks = np.round(np.linspace(0, count - 1, len(frames))).astype(int)
                pairs = (stored[:, picks], frames[None, :])
            else:
                picks = np.round(np.linspace(0, len(frames) - 1, count)).astype(int)
                pairs = (stored, frames[picks][None, :])
            distance = _popcount(pairs[0] ^ pairs[1]).mean(axis=1)
            if bool((distance <= self.max_bits).any()):
                return True
        return False

    def add(self, phash: str) -> None:
        """Remember `phash` (an empty one is not kept: it is nobody's duplicate)."""
        frames = _frame_words(phash)
        if not len(frames):
            return
        matrix, used = self._groups.get(len(frames), (np.zeros((0, len(frames)), np.uint64), 0))
        if used == len(matrix):
            grown = np.zeros((max(16, 2 * len(matrix)), len(frames)), np.uint64)
            grown[:used] = matrix[:used]
            matrix = grown
        matrix[used] = frames
        self._groups[len(frames)] = (matrix, used + 1)
