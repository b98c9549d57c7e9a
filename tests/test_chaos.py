"""Chaos: `wanflow generate` SIGKILLed at random moments and run again, on PostgreSQL and the S3 server.

The trials are `benchmarks/chaos.py`'s (see its docstring: anchors, kill moments, what is checked); here 10
of them, seeded, on the session's PostgreSQL database and the module's moto server (its minimum part size
lowered to the trials' 2 KiB, so that tiny videos are multipart uploads, and its uploads dated as S3 dates
them, so that the planner's age-based clean-up does not end them all). After every re-run: each
(row, seed) done exactly once with a verified output, no object under the root without a catalog row (each
run's contact sheet aside), no open multipart upload, the killed run marked crashed in the catalog and its
flow runs in Prefect. A re-run overlaps the next trial's killed run: about 4 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.request
from pathlib import Path

import pytest
from databases import reset_postgres

from storage.catalog import Catalog

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRIALS = 10
SEED = 12


def _load_chaos():
    path = Path(__file__).parents[1] / "benchmarks" / "chaos.py"
    spec = importlib.util.spec_from_file_location("wanflow_chaos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


def test_sigkilled_generate_resumes_with_a_whole_record(
    postgres_database: str, moto_port: int, aws_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for target, name, value in chaos.moto_patches():  # 2 KiB parts; upload start times as S3 gives them
        monkeypatch.setattr(target, name, value)
    urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset", method="POST")
    )
    with Catalog(postgres_database) as catalog:
        catalog.upgrade()
    setup = chaos.Setup(postgres_database, moto_port, tmp_path / "prefect", tmp_path)
    setup.s3().create_bucket(Bucket=setup.bucket)
    try:
        trials = chaos.run_trials(setup, TRIALS, SEED)  # a line per trial on stderr (pytest -s shows it)
        left_open = chaos.bucket_uploads(setup)
    finally:
        reset_postgres(postgres_database)
    summary = chaos.summarise(trials, uploads_in_bucket=left_open)
    report = "\n".join(chaos.describe(t) for t in trials)
    problems = [problem for t in trials for problem in t.problems()]
    assert not problems, "\n".join([report, *problems])
    assert left_open == [], report
    assert summary["killed"] >= TRIALS - 1, report  # the kill found the command at work
    assert summary["kills_during_upload"] >= 1, report
    assert summary["runs_marked_crashed"] == summary["runs_to_mark_crashed"] >= 5, report
    assert summary["duplicated_jobs"] == summary["orphan_objects"] == summary["open_uploads_after_rerun"] == 0
    assert summary["prefect_flow_runs_left_running"] == 0, report
    assert summary["prefect_orphan_flow_runs_left_running"] == summary["prefect_task_runs_left_running"] == 0
