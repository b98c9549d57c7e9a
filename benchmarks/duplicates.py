"""Near-duplicate search over a catalog's perceptual hashes (`wanflow dataset export --drop-duplicates`).

    python benchmarks/duplicates.py                    # 2,000 videos one by one, 100,000 with the index
    python benchmarks/duplicates.py --pairwise 500 --indexed 20000

Hashes are random 8-frame phashes (`storage.signals`), every fifth a near copy of an earlier one (about 5
bits flipped per frame) and every seventh of 1 to 7 frames, in job order. Both methods keep the first of
each group: `pairwise` asks `is_duplicate` of each hash against every kept one (what the export did before
`DuplicateIndex`), `indexed` asks `DuplicateIndex.near`; on the videos both ran over they keep the same
ones (checked). Prints a summary, then one JSON object.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import emit

from storage.signals import DuplicateIndex, is_duplicate


def hashes(count: int, seed: int = 0) -> list[str]:
    """`count` phashes in job order, with near copies and short videos among them."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(count, 64), dtype=np.uint8)
    out = []
    for i in range(count):
        row = base[i]
        if i and i % 5 == 0:
            bits = np.unpackbits(base[i // 2])
            bits[rng.integers(0, 512, size=40)] ^= 1
            row = np.packbits(bits)
        frames = 8 if i % 7 else int(rng.integers(1, 8))
        out.append(row[: frames * 8].tobytes().hex())
    return out


def pairwise(values: list[str]) -> list[str]:
    kept: list[str] = []
    for phash in values:
        if not any(is_duplicate(phash, other) for other in kept):
            kept.append(phash)
    return kept


def indexed(values: list[str]) -> list[str]:
    index, kept = DuplicateIndex(), []
    for phash in values:
        if not index.near(phash):
            index.add(phash)
            kept.append(phash)
    return kept


def timed(fn, values: list[str]) -> tuple[list[str], float]:
    start = time.perf_counter()
    kept = fn(values)
    return kept, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairwise", type=int, default=2000, help="videos searched one pair at a time")
    parser.add_argument("--indexed", type=int, default=100_000, help="videos searched with the index")
    args = parser.parse_args()
    small = hashes(args.pairwise)
    kept_pairwise, pairwise_s = timed(pairwise, small)
    kept_small, indexed_small_s = timed(indexed, small)
    assert kept_small == kept_pairwise, "the index kept other videos than pairwise comparison"
    kept_large, indexed_s = timed(indexed, hashes(args.indexed))
    result = {
        "benchmark": "duplicates", "pairwise_videos": args.pairwise, "pairwise_s": round(pairwise_s, 3),
        "indexed_same_videos_s": round(indexed_small_s, 4), "same_decisions": True,
        "speedup_same_videos": round(pairwise_s / indexed_small_s, 1), "indexed_videos": args.indexed,
        "indexed_s": round(indexed_s, 3), "kept_of_indexed": len(kept_large),
    }  # fmt: skip
    print(f"{args.pairwise} videos: pairwise {pairwise_s:.2f} s, indexed {indexed_small_s:.3f} s "
          f"(x{result['speedup_same_videos']}), same {len(kept_pairwise)} kept")  # fmt: skip
    print(f"{args.indexed} videos indexed: {indexed_s:.2f} s, {len(kept_large)} kept")
    emit(result)


if __name__ == "__main__":
    main()
