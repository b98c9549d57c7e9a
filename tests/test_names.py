"""One name per setting: a manifest's field names are the platform's names, everywhere.

Each setting with a run default goes through the `wanflow generate` flag, the `WanPipeline` keyword, the
catalog's job parameters, the export and the sidecar under its manifest name; the official `generate.py`
spellings (`--sample_steps`, `sampling_steps=`, `--ckpt_dir`, ...) are accepted as aliases and give the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from flows.cli import app
from storage.catalog import Catalog
from wan.generate import build_parser
from wan.pipeline import WanPipeline

# (manifest name, wanflow flag, official spelling (flag and keyword), value, as the sidecar and export say it)
SETTINGS = [
    ("size", "--size", None, (64, 48), "64*48"),
    ("frame_num", "--frame-num", "frame_num", 5, 5),
    ("steps", "--steps", "sample_steps", 2, 2),
    ("shift", "--shift", "sample_shift", 3.5, 3.5),
    ("guide_scale", "--guide-scale", "sample_guide_scale", 4.0, 4.0),
    ("solver", "--solver", "sample_solver", "euler", "euler"),
    ("negative_prompt", "--negative-prompt", "negative_prompt", "blurry", "blurry"),
]
NAMES = [setting[0] for setting in SETTINGS]
runner = CliRunner()


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")


@pytest.mark.parametrize(("name", "flag", "official", "value", "shown"), SETTINGS, ids=NAMES)
def test_the_pipeline_takes_the_manifest_name_and_the_official_one(pipe, name, flag, official, value, shown):
    assert getattr(pipe.settings(**{name: value}), name) == value
    if official is not None and official != name:
        assert pipe.settings(**{official: value}) == pipe.settings(**{name: value})


def test_the_pipeline_says_which_names_contradict_or_are_unknown(pipe):
    assert pipe.settings(sampling_steps=3).steps == 3  # `WanT2V.generate`'s own keyword
    assert pipe.settings(steps=3, sampling_steps=3).steps == 3
    with pytest.raises(ValueError, match="sample_steps=4 contradicts steps=3"):
        pipe.settings(steps=3, sample_steps=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'frames'"):
        pipe.settings(frames=9)
    with pytest.raises(ValueError, match="solver 'ddim'"):
        pipe.settings(solver="ddim")


def test_wan_generate_takes_both_spellings_of_every_flag():
    parser = build_parser()
    official = ["--sample_steps", "7", "--sample_solver", "euler", "--sample_shift", "2",
                "--sample_guide_scale", "3", "--ckpt_dir", "/c", "--frame_num", "9"]  # fmt: skip
    ours = ["--steps", "7", "--solver", "euler", "--shift", "2", "--guide-scale", "3", "--ckpt-dir", "/c",
            "--frame-num", "9"]  # fmt: skip
    assert vars(parser.parse_args(official)) == vars(parser.parse_args(ours))
    help_text = parser.format_help()
    assert "(default: None)" not in help_text and "(default: the task's) (default" not in help_text


@pytest.mark.slow
def test_every_setting_keeps_its_name_from_the_flag_to_the_sidecar(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"item_id": "fox", "prompt": "a fox"}) + "\n")
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    ours = [part for _, flag, _, _, shown in SETTINGS for part in (flag, str(shown))]
    official = [part for name, flag, spelled, _, shown in SETTINGS
                for part in (f"--{spelled}" if spelled else flag, str(shown))]  # fmt: skip
    params = {}
    with prefect_test_harness(server_startup_timeout=90):
        for label, flags in (("ours", ours), ("official", official)):
            out = tmp_path / label
            args = ["generate", str(manifest), "--model", "tiny-t2v", "--out", str(out), "--catalog_url", url]
            result = runner.invoke(app, [*args, *flags, "--json"])
            assert result.exit_code == 0, result.output
            summary = json.loads(result.stdout)
            with Catalog(url) as catalog:
                (job,) = catalog.jobs(summary["run_id"])
                (output,) = catalog.outputs(summary["run_id"])
            params[label] = job.params
            exported = tmp_path / f"{label}.jsonl"
            done = runner.invoke(app, ["catalog", "export", "--run", summary["run_name"], "--format", "jsonl",
                                       "--to", str(exported), "--catalog-url", url])  # fmt: skip
            assert done.exit_code == 0, done.output
            (row,) = [json.loads(line) for line in exported.read_text().splitlines()]
            with fsspec.open(output.sidecar_uri, "r") as f:
                sidecar = json.load(f)
            for name, _, _, _, shown in SETTINGS:
                assert job.params[name] == shown, (label, name, job.params)
                assert row[name] == shown, (label, name, row)
                assert sidecar["settings"][name] == shown, (label, name, sidecar["settings"])
    assert params["ours"] == params["official"]
    assert Path(tmp_path / "ours").is_dir() and Path(tmp_path / "official").is_dir()


def test_validate_takes_the_runs_flags_and_judges_rows_by_them(tmp_path):
    """`validate` with the flags `generate` gets rejects what that run would: a default a row inherits."""
    manifest = tmp_path / "m.jsonl"
    rows = [{"item_id": "fox", "prompt": "a fox"}, {"item_id": "owl", "prompt": "an owl", "frame_num": 9}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    validate = ["validate", str(manifest), "--model", "tiny-t2v", "--json"]
    ok = runner.invoke(app, [*validate, "--frame_num", "13"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, [*validate, "--frame-num", "12"])
    assert bad.exit_code == 1, bad.output
    problems = json.loads(bad.stdout)["problems"]
    assert [(p["line"], p["field"]) for p in problems] == [(1, "frame_num")], problems  # owl sets its own
    flags = ["--size", "64*48", "--steps", "3", "--shift", "2", "--guide_scale", "4", "--solver", "euler",
             "--negative_prompt", "blur", "--base_seed", "5", "--seeds", "2"]  # fmt: skip
    done = runner.invoke(app, [*validate, *flags])
    assert done.exit_code == 0 and json.loads(done.stdout)["jobs"] == 4, done.output


@pytest.mark.parametrize("flag", ["--skip_invalid", "--dry_run", "--read_inputs", "--no_offload_model",
                                  "--t5_cpu", "--vae_tiling=on"])  # fmt: skip
def test_every_flag_of_wanflow_generate_takes_the_underscore_spelling(tmp_path, flag):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"item_id": "fox", "prompt": "a fox"}) + "\n")
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    result = runner.invoke(app, ["generate", str(manifest), "--model", "tiny-t2v", "--catalog-url", url,
                                 "--dry-run", flag, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["to_generate"] == 1
