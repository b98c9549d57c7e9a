"""Records a team can trust (issue 12): the catalog never claims what is not there, summaries count only
what the run made, no secret reaches Prefect, and bad input ends in one line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from catalog_helpers import rejections
from databases import reset_postgres
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from flows.batch import BatchFailed, generate_batch
from flows.cli import app
from flows.recovery import process_owner, reap_crashed_runs
from storage.catalog import Catalog, JobSpec, OutputRecord, RunStatus
from storage.export import dataset_rows
from storage.urls import redact

runner = CliRunner()
FAST = {"size": "64*48", "frame_num": 5, "steps": 2}
TINY = ("--model", "tiny-t2v")


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def write_manifest(path: Path, items=("alpha", "beta")) -> str:
    rows = [{"item_id": item, "prompt": f"a short clip of {item}", **FAST} for item in items]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def batch(manifest: str, out: str, catalog_url: str, **kwargs):
    with Catalog(catalog_url) as catalog:
        catalog.upgrade()
    try:
        return generate_batch(manifest, model="tiny-t2v", out=out, catalog_url=catalog_url, **kwargs)
    except BatchFailed as failed:
        return failed.summary


# ------------------------------------------------------------------------------------ 1, 2: where videos are


@pytest.mark.slow
def test_a_run_into_another_root_makes_its_own_videos_and_uris_are_absolute(harness, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    manifest = write_manifest(tmp_path / "m.jsonl")
    first = batch(manifest, "A", catalog_url)  # relative: stored as an absolute path, resolved once
    assert first["status"] == "succeeded" and first["by_status"]["succeeded"] == 2
    second = batch(manifest, "B", catalog_url)
    assert second["by_status"]["succeeded"] == 2 and second["by_status"]["skipped"] == 0
    assert second["storage_root"] == str(tmp_path / "B")
    assert len(list((tmp_path / "B").rglob("*.mp4"))) == 2
    again = batch(manifest, "B", catalog_url)
    assert again["nothing_to_do"] and again["by_status"]["skipped"] == 2 and again["seconds"] == 0
    with Catalog(catalog_url) as catalog:
        uris = [o.uri for o in catalog.outputs()]
        run = catalog.get_run(first["run_id"])
    assert len(uris) == 4 and all(uri.startswith(str(tmp_path)) for uri in uris)
    assert run.manifest_uri == str(tmp_path / "m.jsonl")


def test_the_default_catalog_is_found_from_a_subdirectory_and_never_created_by_a_query(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(project)
    monkeypatch.delenv("WANFLOW_CATALOG_URL", raising=False)
    assert runner.invoke(app, ["catalog", "upgrade"]).exit_code == 0
    assert (project / ".wanflow" / "catalog.db").is_file()
    monkeypatch.chdir(project / "deep" / "er")
    found = runner.invoke(app, ["catalog", "runs", "--json"])
    assert found.exit_code == 0 and json.loads(found.stdout) == []
    assert f"catalog: sqlite:///{project / '.wanflow' / 'catalog.db'}" in found.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    missing = runner.invoke(app, ["catalog", "runs"])
    assert missing.exit_code == 1 and "no catalog at" in missing.stderr
    assert not (elsewhere / ".wanflow").exists()


# -------------------------------------------------------------------------------- 3: a model that won't load


def test_validate_and_dry_run_catch_a_checkpoint_without_weights(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl")
    empty = tmp_path / "Wan2.1-T2V-1.3B"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    for command in (["validate"], ["generate", "--dry-run", "--catalog-url", f"sqlite:///{tmp_path}/c.db"]):
        result = runner.invoke(app, [*command, manifest, "--model", "t2v-1.3B", "--ckpt-dir", str(empty)])
        assert result.exit_code == 1, result.output
        assert "line 1" in result.output and "diffusion_pytorch_model" in result.output
    assert not (tmp_path / "c.db").exists()


# ---------------------------------------------------------------------------------------- 4: killed runs


def _dead_owner() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = process_owner(child.pid)
    child.wait()
    return owner


def test_a_run_whose_process_died_is_marked_crashed(catalog_url):
    catalog = Catalog(catalog_url)
    catalog.upgrade()
    dead = catalog.create_run("killed", "/m.jsonl", "ab" * 32, {}, owner=_dead_owner())
    catalog.start_run(dead.id)
    alive = catalog.create_run("alive", "/m.jsonl", "ab" * 32, {}, owner=process_owner())
    catalog.start_run(alive.id)
    assert [r.name for r in reap_crashed_runs(catalog, ask_prefect=False)] == ["killed"]
    assert catalog.get_run("killed").status == RunStatus.crashed
    assert catalog.get_run("alive").status == RunStatus.running
    catalog.close()


def test_catalog_runs_shows_a_killed_run_as_crashed(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with Catalog(url) as catalog:
        catalog.upgrade()
        run = catalog.create_run("killed", "/m.jsonl", "ab" * 32, {}, owner=_dead_owner())
        catalog.start_run(run.id)
    rows = json.loads(runner.invoke(app, ["catalog", "runs", "--json", "--catalog-url", url]).stdout)
    assert [(r["name"], r["status"]) for r in rows] == [("killed", "crashed")]


# ------------------------------------------------------------------------------ 5: each run counts its own


def test_two_runs_of_one_manifest_count_only_the_jobs_each_made(catalog_url):
    catalog = Catalog(catalog_url)
    catalog.upgrade()
    specs = [JobSpec(item, 1, "tiny-t2v", "fp", {"prompt": item}, "/videos") for item in ("a", "b", "c")]
    one = catalog.create_run("one", "/m.jsonl", "ab" * 32, {})
    two = catalog.create_run("two", "/m.jsonl", "ab" * 32, {})
    catalog.plan_jobs(one.id, specs)
    catalog.plan_jobs(two.id, specs)  # started together: both see every job pending
    jobs = {j.item_id: j for j in catalog.jobs(one.id)}
    for item, run, seconds in (("a", one, 5.0), ("b", one, 7.0), ("c", two, 11.0)):
        catalog.claim_job(jobs[item].id, worker="w", start=True, run_id=run.id)
        output = OutputRecord(uri=f"/videos/{item}.mp4", sha256="cd" * 32, bytes=10, width=64, height=48,
                              frames=5, fps=16.0, codec="h264")  # fmt: skip
        catalog.mark_succeeded(jobs[item].id, output, seconds=seconds)
    first, second = catalog.stats(one.id), catalog.stats(two.id)
    assert (first["by_status"]["succeeded"], first["by_status"]["skipped"], first["seconds"]) == (2, 1, 12.0)
    assert (second["by_status"]["succeeded"], second["by_status"]["skipped"]) == (1, 2)
    assert second["seconds"] == 11.0
    rows = {r["item_id"]: r for r in dataset_rows(catalog, None)}
    assert (rows["a"]["run"], rows["c"]["run"]) == ("one", "two")
    catalog.close()


def test_a_job_under_another_root_is_another_job(catalog_url):
    catalog = Catalog(catalog_url)
    catalog.upgrade()
    run = catalog.create_run("r", "/m.jsonl", "ab" * 32, {})
    specs = [JobSpec("a", 1, "tiny-t2v", "fp", {"prompt": "a"}, root) for root in ("/A", "/B", "/A")]
    assert catalog.plan_jobs(run.id, specs).created == 2
    assert sorted(j.storage_root for j in catalog.jobs(run.id)) == ["/A", "/B"]
    catalog.close()


# ---------------------------------------------------------------------------- 6: export under manifest names


@pytest.mark.slow
def test_export_has_every_setting_and_input_under_the_manifest_names(harness, tmp_path):
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    manifest = write_manifest(tmp_path / "m.jsonl", items=("alpha",))
    summary = batch(manifest, str(tmp_path / "out"), catalog_url)
    target = tmp_path / "export.jsonl"
    result = runner.invoke(app, ["catalog", "export", "--run", summary["run_name"], "--format", "jsonl",
                                 "--to", str(target), "--catalog-url", catalog_url])  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(target.read_text().splitlines()[0])
    assert (row["steps"], row["size"], row["frame_num"], row["solver"]) == (2, "64*48", 5, "unipc")
    assert row["run"] == summary["run_name"] and row["poster_uri"].endswith(".poster.webp")
    assert {"image", "image_sha256", "last_image", "thumbnail_uri", "guide_scale", "shift"} <= set(row)
    assert Path(row["poster_uri"]).is_file() and Path(row["thumbnail_uri"]).is_file()


# ------------------------------------------------------------------------------------------------ 7: secrets


@pytest.mark.slow
@pytest.mark.integration
def test_a_password_in_the_catalog_url_works_and_reaches_no_parameter(
    harness, postgres_database, tmp_path, request
):
    """The documented production URL (user:password@host) runs locally; the password (here with a space,
    percent-encoded, and again as sslpassword=) is in no Prefect parameter, catalog row, object or output."""
    from prefect import get_client
    from sqlalchemy.engine import make_url

    base = make_url(postgres_database)
    url = base.set(password="s3cr3t pw").render_as_string(hide_password=False)
    url += "?sslpassword=0therS3cret"
    Catalog(postgres_database).upgrade()
    request.addfinalizer(lambda: reset_postgres(postgres_database))  # the session's database, left empty
    manifest = write_manifest(tmp_path / "m.jsonl", items=("alpha",))
    args = ["generate", manifest, *TINY, "--catalog-url", url, "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    secrets = ("s3cr3t", "0therS3cret")
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        logs = client.read_logs()
    assert len(runs) >= 2  # the batch and its shard
    texts = [json.dumps(r.parameters, default=str) + r.name for r in runs] + [log.message for log in logs]
    texts.append(result.output)
    engine = sa.create_engine(postgres_database.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        for table in ("runs", "jobs", "outputs", "models", "rejections"):
            texts += [str(tuple(row)) for row in conn.execute(sa.text(f"SELECT * FROM {table}"))]
    engine.dispose()
    texts += [p.read_bytes().decode(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for secret in secrets:
        assert not [t for t in texts if secret in t], secret


def test_credentials_are_masked_wherever_they_hide():
    for url, secret in (
        ("postgresql+psycopg://u:pa ss word@db/x", "pa ss"),
        ("postgresql+psycopg://u:Pw/0123@db/x", "Pw/0123"),
        ("postgresql+psycopg://u@db/x?password=hunter2&sslmode=require", "hunter2"),
        ("postgresql+psycopg://u@db/x?sslpassword=k3y", "k3y"),
        ("http://user:pass@127.0.0.1:9/img.png", "pass@"),
    ):
        assert secret not in redact(url) and secret not in redact(f"error: cannot open {url}: refused")


# ----------------------------------------------------------------------------- 14: a root no one can write to


def test_an_unwritable_root_fails_the_run_at_once_in_one_line(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", items=("alpha",))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with prefect_test_harness(server_startup_timeout=90):
        args = ["generate", manifest, *TINY, "--catalog-url", f"sqlite:///{tmp_path}/c.db"]
        result = runner.invoke(app, [*args, "--out", str(blocker / "videos")])
    assert result.exit_code == 1
    assert "not a directory" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.rglob("*.partial"))


# --------------------------------------------------------------------------------- 17, 19: one line, no noise


@pytest.mark.parametrize(
    "args",
    [
        ["catalog", "runs", "--limit", "-1"],
        ["catalog", "runs", "--limit", "99999999999999999999"],
        ["catalog", "jobs", "--run", "99999999999999999999"],
        ["catalog", "show", "9223372036854775808"],
        ["catalog", "stats", "--run", "0"],
    ],
)
def test_bad_numbers_end_in_one_line(args, tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert runner.invoke(app, ["catalog", "upgrade", "--catalog-url", url]).exit_code == 0
    result = runner.invoke(app, [*args, "--catalog-url", url])
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output


def test_a_bad_setting_is_named_in_one_line(tmp_path):
    env = {**os.environ, "WANFLOW_CHECKPOINTS": "{bad", "WANFLOW_CATALOG_URL": f"sqlite:///{tmp_path}/c.db"}
    command = [sys.executable, "-m", "flows.cli", "catalog", "runs"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "WANFLOW_CHECKPOINTS: expected JSON" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_no_model_no_random_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("WANFLOW_MODEL", raising=False)
    manifest = write_manifest(tmp_path / "m.jsonl")
    result = runner.invoke(app, ["generate", manifest, "--catalog-url", f"sqlite:///{tmp_path}/c.db"])
    assert result.exit_code == 1 and "no model given" in result.output and "tiny" in result.output
    assert not (tmp_path / "c.db").exists()
    with pytest.raises(ValueError, match="no model given"):
        generate_batch.fn(manifest, catalog_url=f"sqlite:///{tmp_path}/c.db")
    deployment = Path(__file__).resolve().parent.parent / "prefect.yaml"
    assert "model: tiny" not in deployment.read_text()


# ------------------------------------------------------------------------------------------ 10: input policy


def _image_manifest(folder: Path, images: list[str]) -> str:
    rows = [{"item_id": f"i{n}", "prompt": "p", "model": "tiny-i2v", "image": image, **FAST}
            for n, image in enumerate(images)]  # fmt: skip
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_images_are_read_only_under_the_input_roots(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.delenv("WANFLOW_INPUT_ROOTS", raising=False)
    data, secret = tmp_path / "data", tmp_path / "secret"
    (data / "images").mkdir(parents=True)
    secret.mkdir()
    Image.new("RGB", (8, 8)).save(data / "images" / "ok.png")
    Image.new("RGB", (8, 8)).save(secret / "x.png")
    (data / "link.png").symlink_to(secret / "x.png")
    outside = ["../secret/x.png", str(secret / "x.png"), f"file://{secret}/x.png", "../secret/missing.png",
               "link.png", "s3://other-bucket/x.png", "http://127.0.0.1:9/x.png"]  # fmt: skip
    manifest = _image_manifest(data, ["images/ok.png", "images/missing.png", *outside])
    out = ["--out", str(tmp_path / "videos")]
    result = runner.invoke(app, ["validate", manifest, *TINY, "--json"], env={"WANFLOW_STORAGE_ROOT": out[1]})
    doc = json.loads(result.stdout)
    reasons = {p["line"]: p["reason"] for p in doc["problems"]}
    assert doc["valid"] == 1 and doc["invalid"] == 8 and 1 not in reasons
    assert "does not exist" in reasons[2]
    for line in range(3, 10):  # the same words whether or not the file exists
        assert "outside the input roots" in reasons[line], reasons[line]
    plan = runner.invoke(app, ["generate", manifest, *TINY, *out, "--skip-invalid", "--dry-run", "--json",
                               "--catalog-url", f"sqlite:///{tmp_path}/c.db"])  # fmt: skip
    assert plan.exit_code == 0, plan.output
    doc = json.loads(plan.stdout)
    assert (doc["rows"], doc["invalid"], doc["jobs"], doc["inputs_unread"]) == (9, 8, 1, 1)
    monkeypatch.setenv("WANFLOW_INPUT_ROOTS", json.dumps([str(data), str(secret)]))
    allowed = runner.invoke(app, ["validate", _image_manifest(data, ["../secret/x.png"]), *TINY])
    assert allowed.exit_code == 0, allowed.output


# --------------------------------------------------------------------------------- 13: a hung storage server


@pytest.mark.slow
def test_a_hung_storage_endpoint_fails_the_run_in_seconds_not_minutes(tmp_path, monkeypatch, aws_env):
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    monkeypatch.setenv("WANFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANFLOW_STORAGE_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setenv("WANFLOW_STORAGE_READ_TIMEOUT_S", "1")
    manifest = write_manifest(tmp_path / "m.jsonl", items=("alpha",))
    try:
        with prefect_test_harness(server_startup_timeout=90):
            start = time.monotonic()
            result = runner.invoke(app, ["generate", manifest, *TINY, "--out", "s3://hung/videos",
                                         "--catalog-url", f"sqlite:///{tmp_path}/c.db"])  # fmt: skip
            took = time.monotonic() - start
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "s3://hung/videos" in result.output and "timeout" in result.output.lower(), result.output
    assert took < 30, took  # with 1 s timeouts: a few bounded attempts, not minutes


# ---------------------------------------------------------------------------------- 8: what a row may hold


def test_rows_with_nul_are_rejected_per_row_and_stored_the_same_on_both_databases(catalog_url, tmp_path):
    """NUL in a prompt, an id or a field name is a per-row problem; the rejection, and text that reaches
    the catalog by any other way, is stored with the character written out, alike on SQLite and PostgreSQL."""
    lines = [
        json.dumps({"item_id": "ok", "prompt": "fine", **FAST}),
        json.dumps({"item_id": "nul-prompt", "prompt": "a\u0000b", **FAST}),
        json.dumps({"item_id": "nul\u0000id", "prompt": "p", **FAST}),
        json.dumps({"item_id": "nul-key", "pro\u0000mpt": "p", **FAST}),
        json.dumps({"item_id": "bidi\u202etxt.exe", "prompt": "p", **FAST}),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    catalog = Catalog(catalog_url)
    catalog.upgrade()
    assert runner.invoke(app, ["validate", str(manifest), *TINY]).exit_code == 1
    plan = runner.invoke(app, ["generate", str(manifest), *TINY, "--skip-invalid", "--dry-run", "--json",
                               "--catalog-url", catalog_url])  # fmt: skip
    assert plan.exit_code == 0, plan.output
    assert (json.loads(plan.stdout)["rows"], json.loads(plan.stdout)["invalid"]) == (5, 4)
    from flows.manifest import RunDefaults, load_manifest

    loaded = load_manifest(str(manifest), RunDefaults(model="tiny-t2v"))
    assert sorted({p.line for p in loaded.problems}) == [2, 3, 4, 5]
    run = catalog.create_run("r", str(manifest), "ab" * 32, {})
    catalog.record_rejections(run.id, [p._asdict() for p in loaded.problems])
    catalog.record_rejections(run.id, [{"line": 9, "item_id": "raw\u0000id", "field": "f\u0000",
                                        "reason": "r\u0000", "raw": "x\ud800"}])  # fmt: skip
    stored = rejections(catalog, run.id)
    assert len(stored) == len(loaded.problems) + 1
    texts = [str(r.to_dict()) for r in stored]
    assert not any("\x00" in t for t in texts) and any("\\x00" in t for t in texts)
    assert stored[-1].item_id == "raw\\x00id" and stored[-1].raw == "x\\ud800"
    catalog.close()


# ------------------------------------------------------------------------- 11: validate says what runs reject


def test_validate_and_skip_invalid_reject_rows_of_a_model_without_weights_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("WANFLOW_CHECKPOINTS", raising=False)
    rows = [{"item_id": "a", "prompt": "p", **FAST}, {"item_id": "b", "prompt": "p", **FAST},
            {"item_id": "real", "prompt": "p", "model": "t2v-1.3B"}]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checked = runner.invoke(app, ["validate", str(manifest), *TINY, "--json"])
    doc = json.loads(checked.stdout)
    assert checked.exit_code == 1 and (doc["rows"], doc["valid"], doc["invalid"]) == (3, 2, 1)
    assert doc["problems"][0]["line"] == 3 and doc["problems"][0]["field"] == "model"
    assert "--ckpt-dir" in doc["problems"][0]["reason"]
    plan = runner.invoke(app, ["generate", str(manifest), *TINY, "--skip-invalid", "--dry-run", "--json",
                               "--catalog-url", f"sqlite:///{tmp_path}/c.db"])  # fmt: skip
    assert plan.exit_code == 0, plan.output
    assert {k: json.loads(plan.stdout)[k] for k in ("rows", "invalid", "jobs")} == {"rows": 3, "invalid": 1,
                                                                                    "jobs": 2}  # fmt: skip
