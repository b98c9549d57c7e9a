"""The run's artifacts, without Prefect: the outputs artifact shows each output's thumbnail as an image (a
data URI: Prefect's UI cannot fetch file:// or s3:// URLs, and shows table cells as plain text) and each
failed job with its reason, within bounds that it says; the summary's contact sheet labels each tile."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from flows import reporting
from flows.reporting import _markdown, _outputs_markdown, _sheet, summarise
from flows.settings import get_settings
from storage.catalog import Catalog, JobSpec
from storage.layout import OutputLayout
from storage.outputs import store_job_output
from storage.video import LABEL_HEIGHT

W, H = 64, 48
DATA_URI = re.compile(r"data:image/webp;base64,([A-Za-z0-9+/=]+)")


def _decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@pytest.fixture
def run(tmp_path, target):
    """A run of five jobs: three made (each its own grey), two failed (one with a two-line error)."""
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.upgrade()
    record = catalog.create_run("nightly", "m.jsonl", "ab" * 32, {})
    items = [("fox", 1), ("owl", 2), ("cat|dog", 3), ("bad_size", 4), ("gone", 5)]
    specs = [
        JobSpec(item, seed, "tiny-t2v", "fp0", {"prompt": f"a {item}", "frame_num": 5})
        for item, seed in items
    ]
    catalog.plan_jobs(record.id, specs)
    layout = OutputLayout(target.root)
    jobs = catalog.jobs(record.id)
    for n, job in enumerate(jobs[:3]):
        job = catalog.claim_job(job.id, worker="test", start=True, run_id=record.id)
        store_job_output(catalog, job, [np.full((1, H, W, 3), 60 * (n + 1), np.uint8)], layout=layout,
                         run_name=record.name, width=W, height=H, storage_options=target.options)  # fmt: skip
    errors = ["ValueError: size 7*7 is not one of 832*480, 480*832\nTraceback: details", "OSError: | disk"]
    for job, error in zip(jobs[3:], errors, strict=True):
        catalog.claim_job(job.id, worker="test", start=True, run_id=record.id)
        catalog.mark_failed(job.id, error, retry=False, worker="test")
    settings = get_settings(catalog_url=catalog.url, storage_root=target.root,
                            storage_options=target.options or {})  # fmt: skip
    yield catalog, record, settings
    catalog.close()


def test_the_outputs_artifact_shows_thumbnails_as_images_and_failed_jobs_with_reasons(run):
    catalog, record, settings = run
    summary = summarise(catalog, record.id, settings)
    markdown = _outputs_markdown(catalog, summary, settings)
    lines = markdown.splitlines()
    rows = [line for line in lines if line.startswith("| ![")]
    assert len(rows) == 3
    for n, (row, label) in enumerate(zip(rows, ["fox-s1", "owl-s2", "cat\\|dog-s3"], strict=True)):
        assert row.startswith(f"| ![{label}](data:image/webp;base64,")
        thumbnail = _decode(DATA_URI.search(row)[1])
        assert thumbnail.shape == (H, W, 3) and abs(int(np.median(thumbnail)) - 60 * (n + 1)) <= 8
        assert "| succeeded |" in row and ".mp4` |" in row
    assert "| cat\\|dog | 3 |" in rows[2]  # a pipe in an item does not end its cell
    failed = lines[lines.index("## Failed jobs") :]
    assert failed[3:] == [
        "|---|---|---|",
        "| bad\\_size | 4 | ValueError: size 7\\*7 is not one of 832\\*480, 480\\*832 |",  # the first line
        "| gone | 5 | OSError: \\| disk |",
    ]
    assert "not shown" not in markdown and "Traceback" not in markdown
    assert len(markdown) < 3 * 2000 + 2000  # small thumbnails: the artifact stays small


def test_the_outputs_artifact_says_what_it_leaves_out(run, monkeypatch):
    catalog, record, settings = run
    monkeypatch.setattr(reporting, "MAX_TABLE_ROWS", 2)
    monkeypatch.setattr(reporting, "MAX_FAILED_ROWS", 1)
    markdown = _outputs_markdown(catalog, summarise(catalog, record.id, settings), settings)
    assert (
        markdown.count("| ![") == 2 and markdown.count("| bad\\_size |") == 1 and "| gone |" not in markdown
    )
    assert "1 more outputs not shown: `wanflow catalog outputs --run nightly`." in markdown
    assert "1 more failed jobs not shown: `wanflow catalog jobs --run nightly --status failed`." in markdown


def test_the_summary_has_a_labelled_contact_sheet_and_leaves_the_job_lists_to_the_outputs_artifact(run):
    catalog, record, settings = run
    data_uri, url = _sheet(catalog, record.id, record.name, settings, store=False)
    assert url is None and data_uri is not None
    sheet = _decode(data_uri.removeprefix("data:image/webp;base64,"))
    tile_h = round(H * 160 / W)
    assert sheet.shape == (tile_h + LABEL_HEIGHT, 3 * 160, 3)  # three tiles in a row, each labelled
    strip = sheet[tile_h:].astype(int)
    assert np.median(strip) < 60 and strip.max() > 180  # light text on the dark strip
    summary = summarise(catalog, record.id, settings)

    class Plan:  # the fields of a BatchPlan that the summary reads
        manifest, rows, invalid, shards = "m.jsonl", 5, 0, [1]

    markdown = _markdown(summary, Plan(), (data_uri, url))  # type: ignore[arg-type]
    assert "> **1 failed:** ValueError: size 7*7" in markdown and "## Failed jobs" not in markdown
    assert "the `batch-outputs` artifact" in markdown and markdown.count("data:image/webp") == 1
