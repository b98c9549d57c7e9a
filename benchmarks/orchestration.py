"""What the platform adds per job: `generate_batch` against a bare loop doing the same generation.

    python benchmarks/orchestration.py              # 50 tiny jobs (25 prompts x 2 seeds)
    python benchmarks/orchestration.py --jobs 20

Both variants run in this process on the embedded defaults (Prefect's local server, a SQLite catalog,
a local storage directory) with the tiny random-weight model, so the model work is small and the
platform's own cost shows:
- bare: for each job, `WanPipeline.generate_stream` into `VideoWriter` (no Prefect, no catalog, no
  thumbnails or sidecars);
- platform: `generate_batch` over a manifest of the same jobs: validation, catalog planning, shards as
  subflows, one task per job with claim and output rows, thumbnail, poster, sidecar, artifacts.

Prefect's local server is started (and the pipeline loaded) by a one-job warm-up batch first: that cost
is paid once per process, not per job. Each round runs both on fresh item ids (nothing to skip),
alternating; the medians are compared. Target: (platform - bare) / jobs <= 0.2 s. Prints one JSON
object last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

from common import emit

PARAMS = {"size": "64*48", "frame_num": 5, "steps": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs (an even number: prompts x 2 seeds)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each; medians are used")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wanflow-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))

    from flows.batch import generate_batch
    from flows.manifest import load_manifest
    from flows.models import load_pipeline, model_source
    from storage.catalog import Catalog
    from storage.video import VideoWriter

    catalog_url = f"sqlite:///{work / 'catalog.db'}"
    Catalog(catalog_url).upgrade()

    def manifest(name: str, items: int) -> Path:
        """A fresh manifest (new item ids: nothing to skip) of `items` rows."""
        path = work / f"{name}.jsonl"
        rows = [
            {"item_id": f"{name}-{i}", "prompt": f"benchmark clip {name} {i}", **PARAMS} for i in range(items)
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    def platform(path: Path) -> int:
        summary = generate_batch(str(path), model="tiny-t2v", out=str(work / "platform"),
                                 catalog_url=catalog_url, seeds=2, shard_size=25)  # fmt: skip
        return summary["by_status"]["succeeded"]

    pipe = load_pipeline(model_source("tiny-t2v"))

    def bare(path: Path) -> int:
        n = 0
        for request in load_manifest(str(path), None).requests:
            for seed in (request.seeds[0], request.seeds[0] + 1):
                width, height = request.size
                frames = pipe.generate_stream(
                    request.prompt, seed=seed, progress=False, size=request.size,
                    frame_num=request.frame_num, steps=request.steps,
                )  # fmt: skip
                url = str(work / "bare" / f"{request.item_id}-s{seed}.mp4")
                with VideoWriter(url, width=width, height=height, fps=16) as video:
                    for chunk in frames:
                        video.write(chunk)
                n += 1
        return n

    start = time.perf_counter()
    platform(manifest("warmup", 1))
    warm_seconds = time.perf_counter() - start

    samples: dict[str, list[float]] = {"bare": [], "platform": []}
    for r in range(args.rounds):  # alternated, so drift in machine load hits both alike
        for name, fn in (("bare", bare), ("platform", platform)):
            path = manifest(f"{name}{r}", args.jobs // 2)
            start = time.perf_counter()
            jobs = fn(path)
            samples[name].append(time.perf_counter() - start)
            assert jobs == args.jobs // 2 * 2, (name, jobs)
    bare_seconds, platform_seconds = (statistics.median(samples[k]) for k in ("bare", "platform"))
    jobs = args.jobs // 2 * 2
    added = (platform_seconds - bare_seconds) / jobs
    print(
        f"{jobs} jobs, median of {args.rounds} rounds: bare loop {bare_seconds:.2f} s, generate_batch "
        f"{platform_seconds:.2f} s (warm-up batch incl. Prefect server start {warm_seconds:.1f} s); "
        f"added {added:.3f} s per job"
    )
    emit({
        "jobs": jobs, "rounds": args.rounds, "seconds_bare": round(bare_seconds, 3),
        "seconds_platform": round(platform_seconds, 3), "added_seconds_per_job": round(added, 4),
        "time_ratio": round(platform_seconds / bare_seconds, 3), "warmup_seconds": round(warm_seconds, 2),
        "target_added_seconds_per_job": 0.2,
    })  # fmt: skip


if __name__ == "__main__":
    main()
