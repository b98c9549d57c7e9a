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
is paid once per process, not per job. Target: (platform - bare) / jobs <= 0.2 s. Prints one JSON
object last.
"""

from __future__ import annotations

import argparse
import json
import os
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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wanflow-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))

    from flows.batch import generate_batch
    from flows.models import load_pipeline, model_source
    from storage.catalog import Catalog
    from storage.video import VideoWriter

    prompts = [f"benchmark clip number {i}" for i in range(args.jobs // 2)]
    manifest = work / "bench.jsonl"
    manifest.write_text("".join(json.dumps({"item_id": f"clip-{i}", "prompt": p, **PARAMS}) + "\n"
                                for i, p in enumerate(prompts)))  # fmt: skip
    warmup = work / "warmup.jsonl"
    warmup.write_text(json.dumps({"item_id": "warmup", "prompt": "warm up", **PARAMS}) + "\n")
    catalog_url = f"sqlite:///{work / 'catalog.db'}"
    Catalog(catalog_url).upgrade()

    def batch(path: Path, out: str) -> dict:
        return generate_batch(str(path), out=out, catalog_url=catalog_url, seeds=2, shard_size=25)

    start = time.perf_counter()
    batch(warmup, str(work / "warmup-out"))
    warm_seconds = time.perf_counter() - start

    pipe = load_pipeline(model_source("tiny-t2v"))
    from flows.manifest import load_manifest

    requests = load_manifest(str(manifest), None).requests

    def bare() -> int:
        n = 0
        for request in requests:
            for seed in (request.seeds[0], request.seeds[0] + 1):
                width, height = request.size
                frames = pipe.generate_stream(
                    request.prompt, seed=seed, progress=False, size=request.size,
                    frame_num=request.frame_num, sampling_steps=request.steps,
                )  # fmt: skip
                url = str(work / "bare" / f"{request.item_id}-s{seed}.mp4")
                with VideoWriter(url, width=width, height=height, fps=16) as video:
                    for chunk in frames:
                        video.write(chunk)
                n += 1
        return n

    start = time.perf_counter()
    jobs = bare()
    bare_seconds = time.perf_counter() - start
    start = time.perf_counter()
    summary = batch(manifest, str(work / "platform-out"))
    platform_seconds = time.perf_counter() - start
    assert summary["by_status"]["succeeded"] == jobs, summary["by_status"]
    added = (platform_seconds - bare_seconds) / jobs
    print(
        f"{jobs} jobs: bare loop {bare_seconds:.2f} s, generate_batch {platform_seconds:.2f} s "
        f"(warm-up batch incl. Prefect server start {warm_seconds:.1f} s); added {added:.3f} s per job"
    )
    emit({
        "jobs": jobs, "seconds_bare": round(bare_seconds, 3), "seconds_platform": round(platform_seconds, 3),
        "added_seconds_per_job": round(added, 4), "time_ratio": round(platform_seconds / bare_seconds, 3),
        "warmup_seconds": round(warm_seconds, 2), "target_added_seconds_per_job": 0.2,
    })  # fmt: skip


if __name__ == "__main__":
    main()
