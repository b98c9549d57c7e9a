"""Manifests: three formats, one schema; every bad row named by line and field; dask splits large ones."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import decimal
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import threading
import time
import tracemalloc
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.manifest import (
    MANIFEST_FORMATS,
    GenerationRequest,
    Manifest,
    ManifestError,
    ResolvedRequest,
    RowProblem,
    RunDefaults,
    derive_seed,
    iter_rows,
    load_manifest,
    manifest_format,
    manifest_sha256,
    read_shard,
    resolve,
    split_manifest,
    validate_manifest,
)
from wan.configs import PRESETS

T2V_NEG = PRESETS["tiny-t2v"].sampling.negative_prompt
I2V_NEG = PRESETS["tiny-i2v"].sampling.negative_prompt
COLUMNS = [
    "id", "item_id", "prompt", "model", "task", "negative_prompt", "image", "last_image", "seed", "num_seeds",
    "size", "frame_num", "steps", "sample_steps", "shift", "guide_scale", "solver",
]  # fmt: skip


# --------------------------------------------------------------------------- writers


def write_jsonl(path: Path, rows: list[Any], compress: bool = False) -> str:
    """Rows as JSON Lines; a str or bytes row is written as it is (garbage lines)."""
    out = bytearray()
    for row in rows:
        if isinstance(row, bytes):
            out += row
        elif isinstance(row, str):
            out += row.encode()
        else:
            out += json.dumps(row).encode()
        out += b"\n"
    path.write_bytes(gzip.compress(bytes(out), mtime=0) if compress else bytes(out))
    return str(path)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns the rows use: known ones in COLUMNS order, then unknown ones as they appear."""
    extra = [c for r in rows for c in r if c not in COLUMNS]
    return [c for c in COLUMNS if any(c in r for r in rows)] + list(dict.fromkeys(extra))


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or _columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else str(row[c]) for c in columns])
    return str(path)


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int | None = None) -> str:
    columns = _columns(rows)
    records = [{c: r.get(c) for c in columns} for r in rows]
    for c in columns:  # one type per Parquet column: a column of mixed types is written as text
        if len({type(r[c]) for r in records if r[c] is not None}) > 1:
            for r in records:
                r[c] = None if r[c] is None else str(r[c])
    table = pa.Table.from_pylist(records)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def write_manifest(tmp_path: Path, fmt: str, rows: list[dict[str, Any]], name: str = "m") -> tuple[str, int]:
    """The manifest in `fmt` and the line of its first data row."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / f"{name}.jsonl", rows), 1
    if fmt == "csv":
        return write_csv(tmp_path / f"{name}.csv", rows), 2
    return write_parquet(tmp_path / f"{name}.parquet", rows), 1


def unlined(requests: list[ResolvedRequest]) -> list[ResolvedRequest]:
    return [dataclasses.replace(r, line=0) for r in requests]


def problem_fields(problems: list[RowProblem]) -> dict[int, set[str | None]]:
    out: dict[int, set[str | None]] = {}
    for p in problems:
        out.setdefault(p.line, set()).add(p.field)
    return out


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("url", "fmt"),
    [
        ("m.jsonl", "jsonl"),
        ("dir/m.NDJSON", "jsonl"),
        ("s3://bucket/a/m.jsonl.gz", "jsonl"),
        ("file:///x/m.csv", "csv"),
        ("m.csv.bz2", "csv"),
        ("m.tsv.csv.xz", "csv"),
        ("gs://b/m.parquet", "parquet"),
        ("m.pq", "parquet"),
    ],
)
def test_manifest_format_from_extension(url, fmt):
    assert manifest_format(url) == fmt
    assert fmt in MANIFEST_FORMATS


@pytest.mark.parametrize("url", ["m.json", "m.txt", "manifest", "m.gz", "m.jsonl.zip", "s3://b/m.xlsx"])
def test_unknown_extension_names_the_url_and_what_is_accepted(url):
    with pytest.raises(ManifestError) as info:
        manifest_format(url)
    message = str(info.value)
    assert url in message and ".jsonl" in message and ".csv" in message and ".parquet" in message
    assert info.value.url == url and info.value.problems[0].line == 0


def test_compressed_parquet_is_refused():
    with pytest.raises(ManifestError, match="compressed inside"):
        manifest_format("m.parquet.gz")


# --------------------------------------------------------------------------- good manifests

GOOD_ROWS: list[dict[str, Any]] = [
    {"id": "fox", "prompt": "a red fox runs through snow", "seed": 7, "num_seeds": 2},
    {"item_id": "owl", "prompt": "  an owl at night  ", "size": "96x64", "sample_steps": 4,
     "negative_prompt": "blurry"},
    {"id": "cat", "prompt": "a cat", "task": "tiny-t2v", "frame_num": 5, "shift": 3.5, "guide_scale": 1.0,
     "solver": "euler"},
    {"id": "pic", "prompt": "animate this", "model": "tiny-flf2v", "image": "images/a.png",
     "last_image": "images/b.png", "size": "64*96"},
    {"id": 17, "prompt": "an integer id"},
]  # fmt: skip


@pytest.mark.parametrize("fmt", MANIFEST_FORMATS)
def test_good_manifest_resolves_every_default(tmp_path, fmt):
    url, first = write_manifest(tmp_path, fmt, GOOD_ROWS)
    manifest = validate_manifest(url)
    assert manifest.format == fmt and manifest.rows == 5 and manifest.problems == []
    assert manifest.sha256 == hashlib.sha256(Path(url).read_bytes()).hexdigest()
    fox, owl, cat, pic, num = manifest.requests
    assert [r.line for r in manifest.requests] == [first + i for i in range(5)]
    assert fox == ResolvedRequest(
        line=first, item_id="fox", model="tiny-t2v", task="t2v", prompt="a red fox runs through snow",
        negative_prompt=T2V_NEG, image=None, last_image=None, seeds=(7, 8), size=(64, 48), frame_num=9,
        steps=10, shift=5.0, guide_scale=5.0, solver="unipc",
    )  # fmt: skip
    assert owl.prompt == "an owl at night" and owl.size == (96, 64) and owl.steps == 4
    assert owl.negative_prompt == "blurry" and owl.seeds == (derive_seed("owl", 0),)
    assert (cat.frame_num, cat.shift, cat.guide_scale, cat.solver) == (5, 3.5, 1.0, "euler")
    assert (pic.task, pic.image, pic.last_image, pic.size) == (
        "flf2v",
        "images/a.png",
        "images/b.png",
        (64, 96),
    )
    flf = PRESETS["tiny-flf2v"].sampling
    assert (pic.negative_prompt, pic.steps, pic.shift) == (flf.negative_prompt, flf.steps, flf.shift)
    assert num.item_id == "17"
    assert manifest.jobs == 6


def test_three_formats_give_the_same_requests(tmp_path):
    results = [load_manifest(write_manifest(tmp_path, fmt, GOOD_ROWS)[0]) for fmt in MANIFEST_FORMATS]
    assert all(not m.problems for m in results)
    assert unlined(results[0].requests) == unlined(results[1].requests) == unlined(results[2].requests)


def test_compressed_text_manifests(tmp_path):
    plain = load_manifest(write_jsonl(tmp_path / "a.jsonl", GOOD_ROWS))
    url = write_jsonl(tmp_path / "a.jsonl.gz", GOOD_ROWS, compress=True)
    packed = load_manifest(url)
    assert packed.requests == plain.requests
    assert packed.sha256 == hashlib.sha256(Path(url).read_bytes()).hexdigest() != plain.sha256
    assert manifest_sha256(url) == packed.sha256 and manifest_sha256(plain.url) == plain.sha256
    with pytest.raises(ManifestError, match="file not found"):
        manifest_sha256(str(tmp_path / "nope.jsonl"))
    csv_url = write_csv(tmp_path / "a.csv", GOOD_ROWS)
    Path(csv_url + ".gz").write_bytes(gzip.compress(Path(csv_url).read_bytes()))
    assert load_manifest(csv_url + ".gz").requests == load_manifest(csv_url).requests


def test_precedence_row_over_run_defaults_over_preset(tmp_path):
    rows = [
        {"id": "row", "prompt": "p", "steps": 3, "size": "96*64", "solver": "euler",
         "negative_prompt": "row neg", "shift": 2.0, "guide_scale": 2.5, "frame_num": 13, "num_seeds": 2},
        {"id": "run", "prompt": "p"},
        {"id": "i2v", "prompt": "p", "model": "tiny-i2v", "image": "s3://b/i.png"},
    ]  # fmt: skip
    url = write_jsonl(tmp_path / "p.jsonl", rows)
    defaults = RunDefaults(
        steps=7, size="64x96", solver="dpm++", negative_prompt="run neg", shift=4.0, guide_scale=6.0,
        frame_num=5, num_seeds=3, base_seed=11,
    )  # fmt: skip
    row, run, i2v = validate_manifest(url, defaults).requests
    assert (row.steps, row.size, row.solver, row.negative_prompt) == (3, (96, 64), "euler", "row neg")
    assert (row.shift, row.guide_scale, row.frame_num, len(row.seeds)) == (2.0, 2.5, 13, 2)
    assert (run.steps, run.size, run.solver, run.negative_prompt) == (7, (64, 96), "dpm++", "run neg")
    assert (run.shift, run.guide_scale, run.frame_num, len(run.seeds)) == (4.0, 6.0, 5, 3)
    assert run.model == "tiny-t2v" and i2v.model == "tiny-i2v" and i2v.task == "i2v"
    bare = validate_manifest(url).requests[1]
    preset = PRESETS["tiny-t2v"].sampling
    assert (bare.steps, bare.size, bare.solver, bare.negative_prompt) == (
        preset.steps, preset.size, preset.solver, preset.negative_prompt,
    )  # fmt: skip
    assert (bare.shift, bare.guide_scale, bare.frame_num, len(bare.seeds)) == (5.0, 5.0, 9, 1)


def test_seeds_explicit_and_derived(tmp_path):
    rows = [{"id": "a", "prompt": "p", "seed": 2**63 - 3, "num_seeds": 3}, {"id": "b", "prompt": "p"}]
    url = write_jsonl(tmp_path / "s.jsonl", rows)
    a, b = validate_manifest(url, RunDefaults(num_seeds=4)).requests
    assert a.seeds == (2**63 - 3, 2**63 - 2, 2**63 - 1)
    first = derive_seed("b", 0)
    assert b.seeds == (first, first + 1, first + 2, first + 3) and 0 <= first < 2**31
    # Stable across reads and processes (blake2b, not hash()), different for another base seed or id.
    assert validate_manifest(url, RunDefaults(num_seeds=4)).requests[1].seeds == b.seeds
    assert (
        derive_seed("b", 0)
        == int.from_bytes(hashlib.blake2b(b"0:b", digest_size=8).digest(), "little") % 2**31
    )
    assert (
        validate_manifest(url, RunDefaults(base_seed=1)).requests[1].seeds[0] == derive_seed("b", 1) != first
    )
    assert derive_seed("c", 0) != first


def test_aliases_and_conflicting_aliases():
    fields = {"id": "x", "prompt": "p", "task": "tiny-t2v", "sample_steps": 3, "sample_shift": 2,
              "sample_guide_scale": 4, "sample_solver": "DPM++"}  # fmt: skip
    r = resolve(fields, 3, RunDefaults())
    assert isinstance(r, ResolvedRequest)
    assert (r.item_id, r.model, r.steps, r.shift, r.guide_scale, r.solver) == (
        "x",
        "tiny-t2v",
        3,
        2.0,
        4.0,
        "dpm++",
    )
    assert GenerationRequest(item_id="x", prompt="p", steps=2).steps == 2  # populate by name
    problems = resolve(
        {"id": "x", "item_id": "y", "prompt": "p", "steps": 2, "sample_steps": 3}, 9, RunDefaults()
    )
    assert isinstance(problems, list)
    assert {(p.line, p.field) for p in problems} == {(9, "id"), (9, "sample_steps")}
    assert all("give only one of" in p.reason for p in problems)


def test_params_group_and_shard_records():
    r = resolve({"id": "a", "prompt": "p", "model": "tiny-i2v", "image": "i.png"}, 1, RunDefaults())
    assert isinstance(r, ResolvedRequest)
    assert r.params() == {
        "task": "i2v", "prompt": "p", "negative_prompt": I2V_NEG, "size": "64*48", "frame_num": 9,
        "steps": 10, "shift": 3.0, "guide_scale": 5.0, "solver": "unipc", "image": "i.png",
    }  # fmt: skip
    json.dumps(r.params())
    assert r.group() == ("tiny-i2v", (64, 48), 9)
    t2v = resolve({"id": "b", "prompt": "p"}, 2, RunDefaults())
    assert (
        isinstance(t2v, ResolvedRequest) and "image" not in t2v.params() and "last_image" not in t2v.params()
    )
    record = json.loads(json.dumps(r.to_record()))
    assert record["size"] == "64*48" and isinstance(record["seeds"], list)
    assert ResolvedRequest.from_record(record) == r


def test_run_defaults_are_checked():
    for bad in ({"model": "nope"}, {"num_seeds": 0}, {"size": "12*x"}, {"solver": "heun"}, {"base_seed": -1},
                {"steps": 0}, {"colour": 1}):  # fmt: skip
        with pytest.raises(ValueError):
            RunDefaults(**bad)
    assert RunDefaults(size="96x64").size == "96*64"


def test_run_default_problems_say_so(tmp_path):
    url = write_jsonl(
        tmp_path / "d.jsonl", [{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "p", "frame_num": 5}]
    )
    manifest = load_manifest(url, RunDefaults(frame_num=6))
    assert [(p.line, p.field) for p in manifest.problems] == [(1, "frame_num")]
    assert "run default" in manifest.problems[0].reason and len(manifest.requests) == 1


# --------------------------------------------------------------------------- bad rows

# (row, fields expected to be reported); each row's problems must all be found at once.
BAD_ROWS: list[tuple[dict[str, Any], set[str | None]]] = [
    ({"id": "a", "prompt": "fine"}, set()),
    ({"id": "b", "prompt": "x", "size": "800*479"}, {"size"}),
    ({"id": "c", "prompt": "x", "frame_num": 10}, {"frame_num"}),
    ({"id": "d", "prompt": "x", "seed": -1, "solver": "nope"}, {"seed", "solver"}),
    ({"id": "e", "prompt": "x", "colour": "red"}, {"colour"}),
    ({"id": "f"}, {"prompt"}),
    ({"id": "g", "prompt": "x", "model": "tiny-i2v"}, {"image"}),
    ({"id": "h", "prompt": "x", "image": "a.png"}, {"image"}),
    ({"id": "a", "prompt": "again"}, {"item_id"}),
    (
        {"id": "i", "prompt": "x", "steps": 0, "model": "nope", "num_seeds": 0},
        {"steps", "model", "num_seeds"},
    ),
    ({"prompt": "no id", "size": "7*7"}, {"item_id", "size"}),
    ({"id": "j", "prompt": "fine too", "size": "128*128"}, set()),
]


@pytest.mark.parametrize("fmt", MANIFEST_FORMATS)
def test_every_bad_row_is_reported_at_once(tmp_path, fmt):
    rows = [row for row, _ in BAD_ROWS]
    if fmt == "parquet":  # one type per column: the unknown column is a string there too
        rows = [dict(r) for r in rows]
    url, first = write_manifest(tmp_path, fmt, rows)
    manifest = load_manifest(url)
    expected = {first + i: fields for i, (_, fields) in enumerate(BAD_ROWS) if fields}
    assert problem_fields(manifest.problems) == expected
    assert [r.item_id for r in manifest.requests] == ["a", "j"]
    assert manifest.rows == len(BAD_ROWS)
    by_field = {(p.line, p.field): p for p in manifest.problems}
    assert "multiples of 16" in by_field[first + 1, "size"].reason
    assert "4n+1" in by_field[first + 2, "frame_num"].reason
    assert "unknown field; did you mean" not in by_field[first + 4, "colour"].reason
    assert "expected one of: item_id, id, prompt" in by_field[first + 4, "colour"].reason
    assert "text-to-video" in by_field[first + 7, "image"].reason
    unit = "row" if fmt == "parquet" else "line"
    assert by_field[first + 8, "item_id"].reason == f"duplicate item_id 'a': already used on {unit} {first}"
    assert (
        by_field[first + 3, "seed"].item_id == "d" and '"solver": "nope"' in by_field[first + 3, "seed"].raw
    )

    with pytest.raises(ManifestError) as info:
        validate_manifest(url)
    error = info.value
    assert error.url == url and error.rows == len(BAD_ROWS) and error.problems == manifest.problems
    text = str(error)
    assert f"{url} {unit} {first + 1} (id 'b'), field 'size': size 800*479" in text
    assert f"{url} {unit} {first + 5} (id 'f'), field 'prompt': required field is missing" in text


def test_describe_is_one_readable_line():
    p = RowProblem(7, "size", "size '800*480': bad\nreally", "fox")
    assert p.describe("m.jsonl") == "m.jsonl line 7 (id 'fox'), field 'size': size '800*480': bad really"
    assert (
        RowProblem(3, None, "not valid JSON").describe("m.parquet", "row")
        == "m.parquet row 3: not valid JSON"
    )
    assert RowProblem(0, None, "file not found").describe("m.csv") == "m.csv: file not found"
    assert p._asdict()["raw"] is None


def test_csv_quoted_newlines_keep_line_numbers(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text(
        "id,prompt,seed\n"
        'a,"line one\nline two\nline three",1\n'  # lines 2-4
        "b,ok,notanumber\n"  # line 5
        'c,"x, ""quoted""",2\n'  # line 6
        "\n"  # line 7: blank
        "d,,3\n"  # line 8: no prompt
        "e,short\n"  # line 9: a cell missing
        ",,\n"  # line 10: empty cells only, skipped
        'f,"multi\r\nline",4\r\n'  # lines 11-12, CRLF
        "g,last,5"  # line 13, no final newline
    )
    manifest = load_manifest(str(path))
    assert [(r.item_id, r.line) for r in manifest.requests] == [("a", 2), ("c", 6), ("f", 11), ("g", 13)]
    assert manifest.requests[0].prompt == "line one\nline two\nline three"
    assert manifest.requests[1].prompt == 'x, "quoted"'
    assert [(p.line, p.field) for p in manifest.problems] == [(5, "seed"), (8, "prompt"), (9, None)]
    assert "expected 3 cells" in manifest.problems[2].reason and manifest.problems[2].item_id == "e"
    assert manifest.rows == 7


def test_csv_header_problems(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("id,prompt,id\na,b,c\n")
    with pytest.raises(ManifestError, match="field 'id': column named twice"):
        load_manifest(str(dup))
    headless = tmp_path / "headless.csv"
    headless.write_text("fox,a red fox\nowl,an owl\n")
    with pytest.raises(ManifestError, match="line 1: the first row must be a header"):
        load_manifest(str(headless))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfid,prompt,\r\na,b,\r\n")  # BOM, CRLF, a trailing empty column
    assert [r.item_id for r in validate_manifest(str(bom)).requests] == ["a"]


def test_unknown_columns_and_nulls(tmp_path):
    rows = [{"id": "a", "prompt": "p", "promt": "typo"}, {"id": "b", "prompt": "p", "promt": None}]
    for fmt in MANIFEST_FORMATS:
        url, first = write_manifest(tmp_path, fmt, rows)
        manifest = load_manifest(url)
        assert [(p.line, p.field) for p in manifest.problems] == [(first, "promt")], fmt
        assert "did you mean 'prompt'?" in manifest.problems[0].reason
        assert [r.item_id for r in manifest.requests] == ["b"]  # null / empty means unset


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n  \n\r\n"),
        ("empty.csv", b""),
        ("header.csv", b"id,prompt\n"),
        ("empty.jsonl.gz", gzip.compress(b"")),
    ],
)
def test_empty_manifest(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ManifestError, match="empty") as info:
        load_manifest(str(tmp_path / name))
    assert str(tmp_path / name) in str(info.value)
    with pytest.raises(ManifestError, match="empty"):
        split_manifest(str(tmp_path / name), str(tmp_path / "out"))


def test_empty_parquet(tmp_path):
    url = str(tmp_path / "e.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), url)
    with pytest.raises(ManifestError, match="empty"):
        load_manifest(url)
    with pytest.raises(ManifestError, match="empty"):
        split_manifest(url, str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.parquet"])
def test_missing_file(tmp_path, name):
    url = str(tmp_path / name)
    for call in (lambda: load_manifest(url), lambda: list(iter_rows(url)), lambda: split_manifest(url, "o")):
        with pytest.raises(ManifestError, match="file not found") as info:
            call()
        assert url in str(info.value) and info.value.problems[0].line == 0


def test_unreadable_files(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ManifestError, match="directory"):
        load_manifest(str(tmp_path / "dir.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(ManifestError, match="cannot read the file"):
        load_manifest(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ManifestError, match="cannot read the file"):
        load_manifest(str(tmp_path / "bad.jsonl.gz"))


def test_iter_rows_streams_fields_and_problems(tmp_path):
    url = write_jsonl(
        tmp_path / "r.jsonl", [{"id": "a", "prompt": "p"}, "", "[1]", {"id": "b", "prompt": None}]
    )
    rows = list(iter_rows(url))
    assert rows[0] == (1, {"id": "a", "prompt": "p"})
    assert rows[1][0] == 3 and isinstance(rows[1][1], RowProblem) and "got an array" in rows[1][1].reason
    assert rows[2] == (4, {"id": "b", "prompt": None})


def test_parquet_wrong_types(tmp_path):
    url = str(tmp_path / "t.parquet")
    table = pa.table({
        "id": pa.array([b"a", b"\xff\xfe", b"c", b"d", b"e"], pa.binary()),
        "prompt": pa.array(["p", "p", "p", "p", None]),
        "seed": pa.array(["1", "abc", None, "5", None]),
        "size": pa.array([None, None, [64, 48], None, None], pa.list_(pa.int64())),
        "steps": pa.array([None, None, None, True, None], pa.bool_()),
        "frame_num": pa.array([9.0, float("nan"), None, 9.5, None]),
        "meta": pa.array([None, None, None, {"a": 1}, None], pa.struct([("a", pa.int64())])),
        "when": pa.array([None, None, None, None, datetime.datetime(2026, 1, 1)], pa.timestamp("us")),
    })  # fmt: skip
    pq.write_table(table, url)
    manifest = load_manifest(url)
    assert [(r.line, r.item_id, r.seeds, r.frame_num) for r in manifest.requests] == [(1, "a", (1,), 9)]
    assert problem_fields(manifest.problems) == {
        2: {"id", "seed", "frame_num"},
        3: {"size"},
        4: {"steps", "frame_num", "meta"},
        5: {"prompt", "when"},
    }
    assert "row 4" in str(ManifestError(url, manifest.problems, manifest.rows))


def test_manifest_error_lists_at_most_fifty(tmp_path):
    url = write_jsonl(tmp_path / "many.jsonl", ["oops"] * 60)
    with pytest.raises(ManifestError) as info:
        validate_manifest(url)
    text = str(info.value)
    assert "60 problem(s) in 60 of 60 lines" in text and text.count("not valid JSON") == 50
    assert text.endswith("... and 10 more")
    again = pickle.loads(pickle.dumps(info.value))
    assert again.problems == info.value.problems and str(again) == text and isinstance(again, ValueError)


# --------------------------------------------------------------------------- text that cannot be stored


def assert_storable(problems: list[RowProblem]) -> None:
    """What `Catalog.record_rejections` stores: no NUL, no lone surrogate, no invisible character in names."""
    for problem in problems:
        for key, value in problem._asdict().items():
            if isinstance(value, str):
                assert "\x00" not in value, (key, value)
                value.encode("utf-8")  # no lone surrogate
        for name in (problem.field, problem.item_id):
            assert name is None or not any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in name)
        problem.describe("m.jsonl").encode("utf-8")


_TEXT_FIELDS = ["prompt", "negative_prompt", "id", "image", "size", "model", "solver"]


def _row_with(field: str, value: str) -> dict[str, Any]:
    row: dict[str, Any] = {"id": "row", "prompt": "a prompt"}
    if field == "image":
        row["model"] = "tiny-i2v"
    row[field] = value
    return row


@pytest.mark.parametrize("fmt", MANIFEST_FORMATS)
@pytest.mark.parametrize("field", _TEXT_FIELDS)
def test_nul_in_any_text_field_is_a_problem_of_that_row_and_field(tmp_path, fmt, field):
    good = {"id": "ok", "prompt": "fine"}
    url, first = write_manifest(
        tmp_path, fmt, [good, _row_with(field, "ab\x00cd"), {"id": "ok2", "prompt": "x"}]
    )
    manifest = load_manifest(url)
    assert [r.item_id for r in manifest.requests] == ["ok", "ok2"]
    assert [(p.line, p.field) for p in manifest.problems] == [(first + 1, field)]
    problem = manifest.problems[0]
    assert "U+0000 NULL at character 3" in problem.reason
    assert_storable(manifest.problems)
    assert manifest.invalid_rows == 1
    split = split_manifest(url, str(tmp_path / "out"), blocksize=64)
    assert split.problems == manifest.problems and split.valid == 2


def test_nul_prompt_reason_says_why():
    problems = resolve({"id": "a", "prompt": "a cat\x00"}, 4, RunDefaults())
    assert problems == [
        RowProblem(4, "prompt", "prompt contains U+0000 NULL at character 6 (PostgreSQL text cannot store "
                   "NUL)", "a", '{"id": "a", "prompt": "a cat\\u0000"}')
    ]  # fmt: skip


def test_nul_and_surrogates_in_names_and_ids_are_escaped_in_problems(tmp_path):
    lines = [
        '{"id": "a\\u0000b", "prompt": "p"}',  # NUL in the id
        '{"id": "c", "prompt": "p", "pro\\u0000mpt": "x"}',  # NUL in a field name
        '{"id": "d\\udc80", "prompt": "p"}',  # a lone surrogate in the id
        '{"id": "e", "prompt": "p", "k\\ud800": 1}',  # ... in a field name
        '{"id": "f", "prompt": "p", "x": 1, "x": 2, "\\u0000": 3, "\\u0000": 4}',  # a NUL key given twice
        '{"id": "g\u202e", "prompt": "\\ud83d"}',
        b'{"id": "h\x00", "prompt": "raw NUL byte"}',
    ]
    url = write_jsonl(tmp_path / "n.jsonl", lines)
    manifest = load_manifest(url)
    assert manifest.invalid_rows == 7 and manifest.requests == []
    assert_storable(manifest.problems)
    by_line = {p.line: p for p in manifest.problems}
    assert by_line[1].field == "id" and by_line[1].item_id == "a\\x00b"
    assert "U+0000 NULL" in by_line[1].reason
    assert any(
        p.line == 2 and p.field == "pro\\x00mpt" and "unknown field" in p.reason for p in manifest.problems
    )
    assert by_line[3].item_id == "d\\udc80" and "U+DC80" in by_line[3].reason
    assert any(p.line == 4 and p.field == "k\\ud800" for p in manifest.problems)
    assert by_line[5].field == "x" and "given twice" in by_line[5].reason
    assert by_line[6].item_id == "g\\u202e"
    assert "not valid JSON" in by_line[7].reason and "\\x00" in by_line[7].raw
    with pytest.raises(ManifestError) as info:
        validate_manifest(url)
    assert "\x00" not in str(info.value)
    str(info.value).encode("utf-8")
    # The same through CSV headers and Parquet column names.
    path = tmp_path / "h.csv"
    path.write_text("id,prompt,no\x00te\na\x00,p,\nb,p,x\n")
    csv_manifest = load_manifest(str(path))
    assert [(p.line, p.field) for p in csv_manifest.problems] == [(2, "id"), (3, "no\\x00te")]
    assert csv_manifest.problems[0].item_id == "a\\x00"
    assert_storable(csv_manifest.problems)
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "x\x00\u202e": ["1"]}), tmp_path / "h.parquet")
    pq_manifest = load_manifest(str(tmp_path / "h.parquet"))
    assert [(p.line, p.field) for p in pq_manifest.problems] == [(1, "x\\x00\\u202e")]
    assert_storable(pq_manifest.problems)


def test_a_problem_escapes_what_it_is_made_of():
    problem = RowProblem(
        3, "f\x00", "bad \x00 \ud800 \u202e\ttab\nline", "id\u200b\x00", "raw\x00\udfff\u2066"
    )
    assert problem == (
        3,
        "f\\x00",
        "bad \\x00 \\ud800 \\u202e\ttab\nline",
        "id\\u200b\\x00",
        "raw\\x00\\udfff\\u2066",
    )
    assert problem._replace(field="g\x00").field == "g\\x00"
    assert (
        problem.describe("m.jsonl")
        == "m.jsonl line 3 (id 'id\\u200b\\x00'), field 'f\\x00': bad \\x00 \\ud800 \\u202e tab line"
    )
    assert pickle.loads(pickle.dumps(problem)) == problem
    assert RowProblem(1, "x" * 500, "r", "y" * 500, "z" * 5000)[1::2] == ("x" * 200, "y" * 200)
    assert len(RowProblem(1, None, "r", None, "\x01" * 2000).raw) == 2000  # cut after escaping
    emoji = RowProblem(1, "prompt", "ok", "a", '{"prompt": "👩\u200d👩 \u05e9\u05dc\u05d5\u05dd"}')
    assert emoji.raw == '{"prompt": "👩\\u200d👩 \u05e9\u05dc\u05d5\u05dd"}'  # a ZWJ is shown, letters kept


_SPOOFING = [
    "\u202e", "\u202d", "\u202a", "\u200b", "\u200c", "\u200d", "\u2066", "\u2067", "\u2068", "\u2069",
    "\u200e", "\u200f", "\u061c", "\ufeff", "\u00ad", "\u2060", "\u2028", "\u2029", "\u00a0", "\u3000",
    "\u3164", "\u115f", "\ufe0f", "\U000e0041", "\x1b", "\x07", "\x85", "\x7f", "\t", "\n",
]  # fmt: skip


@pytest.mark.parametrize("char", _SPOOFING, ids=[f"U+{ord(c):04X}" for c in _SPOOFING])
def test_ids_with_invisible_or_direction_changing_characters_are_refused(char):
    problems = resolve({"id": f"invoice{char}fdp.exe", "prompt": "p"}, 2, RunDefaults())
    assert isinstance(problems, list) and [(p.line, p.field) for p in problems] == [(2, "id")]
    assert f"item_id contains U+{ord(char):04X} " in problems[0].reason
    assert "at character 8" in problems[0].reason and " not allowed in ids)" in problems[0].reason
    assert_storable(problems)


def test_id_refusal_names_the_character():
    problems = resolve({"item_id": "abc\u202egnp.exe", "prompt": "p"}, 1, RunDefaults())
    assert isinstance(problems, list)
    assert problems[0].reason == (
        "item_id contains U+202E RIGHT-TO-LEFT OVERRIDE at character 4 "
        "(invisible or direction-changing characters are not allowed in ids)"
    )
    assert problems[0].item_id == "abc\\u202egnp.exe"
    ordinary = resolve({"id": "Ünïcödé ids, spaces too_日本", "prompt": "p"}, 1, RunDefaults())
    assert isinstance(ordinary, ResolvedRequest)


@pytest.mark.parametrize("field", ["image", "last_image", "size", "model", "solver"])
def test_other_names_refuse_invisible_characters_too(field):
    row = {"id": "a", "prompt": "p", "model": "tiny-flf2v", "image": "a.png", "last_image": "b.png"}
    row[field] = {"size": "64*48", "model": "tiny-flf2v", "solver": "euler"}.get(field, "x.png") + "\u2067"
    problems = resolve(row, 1, RunDefaults())
    assert isinstance(problems, list) and [p.field for p in problems] == [field]
    assert f"{field} contains U+2067 RIGHT-TO-LEFT ISOLATE" in problems[0].reason


def test_prompts_keep_ordinary_unicode_and_whitespace_but_not_control_characters():
    fine = [
        "a family 👨\u200d👩\u200d👧 at the beach",  # ZWJ emoji sequence
        "\u05e9\u05dc\u05d5\u05dd \u200fworld",  # Hebrew with a right-to-left mark
        "tabs\tand\nnewlines\r\nare fine",
        "zero\u200bwidth, soft\u00adhyphen, nbsp\u00a0and \u2028 separators",
    ]
    for prompt in fine:
        resolved = resolve({"id": "a", "prompt": prompt, "negative_prompt": prompt}, 1, RunDefaults())
        assert isinstance(resolved, ResolvedRequest), prompt
        assert resolved.prompt == prompt.strip()
    controls = [("\x07", "BELL"), ("\x1b", "ESCAPE"), ("\x0b", "LINE TABULATION"), ("\x85", "NEXT LINE"),
                ("\x00", "NULL"), ("\x9f", "(control character)")]  # fmt: skip
    for char, name in controls:
        problems = resolve({"id": "a", "prompt": f"ab{char}c"}, 1, RunDefaults())
        assert isinstance(problems, list) and [p.field for p in problems] == ["prompt"]
        assert f"prompt contains U+{ord(char):04X} {name} at character 3" in problems[0].reason
        assert_storable(problems)
    with pytest.raises(ValueError, match="U\\+0000 NULL"):
        RunDefaults(negative_prompt="blurry\x00")
    with pytest.raises(ValueError, match="U\\+202E"):
        RunDefaults(size="64*48\u202e")


def test_bom_inside_a_jsonl_file_is_named(tmp_path):
    lines = [b'\xef\xbb\xbf{"id": "a", "prompt": "p"}', b'\xef\xbb\xbf{"id": "b", "prompt": "p"}']
    url = write_jsonl(tmp_path / "b.jsonl", lines)  # the first BOM is the file's: dropped
    manifest = load_manifest(url)
    assert [r.item_id for r in manifest.requests] == ["a"]
    assert [p.line for p in manifest.problems] == [2] and "byte-order mark" in manifest.problems[0].reason


# --------------------------------------------------------------------------- invalid rows


@pytest.mark.parametrize("fmt", MANIFEST_FORMATS)
def test_invalid_rows_counts_rows_not_problems(tmp_path, fmt):
    rows = [{"id": f"r{i}", "prompt": "p"} for i in range(10)]
    rows[3].update(seed=-1, size="13*13", steps=0)  # three problems, one row
    rows[7]["frame_num"] = 10
    url, _ = write_manifest(tmp_path, fmt, rows)
    manifest = load_manifest(url)
    assert len(manifest.problems) == 4 and manifest.invalid_rows == 2 and manifest.rows == 10
    assert manifest.rows == len(manifest.requests) + manifest.invalid_rows
    split = split_manifest(url, str(tmp_path / "out"), blocksize=128)
    assert split.invalid_rows == split.invalid == 2 and len(split.problems) == 4
    assert Manifest(url, fmt, "", 10, [], manifest.problems[:1], invalid_rows=2).invalid_rows == 2
    assert Manifest(url, fmt, "", 10, [], manifest.problems).invalid_rows == 2
    assert Manifest(url, fmt, "", 0, [], [RowProblem(0, None, "whole file")]).invalid_rows == 0

    @dataclasses.dataclass
    class Lazy(Manifest):  # as flows.batch subclasses it: a positional field after the base's
        models: list[str] = dataclasses.field(default_factory=list)

    lazy = Lazy(url, fmt, "", 10, [], manifest.problems, ["tiny-t2v"], invalid_rows=split.invalid_rows)
    assert lazy.models == ["tiny-t2v"] and lazy.invalid_rows == 2


# --------------------------------------------------------------------------- CSV cells and quotes


def test_csv_cell_over_the_size_limit_names_line_field_and_limit(tmp_path):
    limit = csv.field_size_limit()
    path = tmp_path / "big.csv"
    path.write_text(
        "id,prompt,seed\n"
        "a,fine,1\n"
        f"b,{'x' * 1_000_000},2\n"  # line 3: an unquoted megabyte
        f'c,"{"y, " * 50_000}",3\n'  # line 4: a quoted one
        f'd,ok,"{"9" * 200_000}"\n'  # line 5: in another column
        "e,fine too,5\n"
    )
    manifest = load_manifest(str(path))
    assert [r.item_id for r in manifest.requests] == ["a", "e"]
    assert [(p.line, p.field) for p in manifest.problems] == [(3, "prompt"), (4, "prompt"), (5, "seed")]
    assert manifest.problems[0].reason == (
        f"a cell of 1000000 characters; one CSV cell may hold at most {limit} characters"
    )
    assert all(str(limit) in p.reason for p in manifest.problems)
    assert all(len(p.raw or "") <= 2000 for p in manifest.problems)
    split = split_manifest(str(path), str(tmp_path / "out"), blocksize=100_000)
    assert split.problems == manifest.problems and split.valid == 2


def test_csv_unterminated_quote_is_reported_where_it_opens(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text(
        "id,prompt,seed\n"
        "a,fine,1\n"
        'b,"a quote that never closes,2\n'  # line 3
        "c,swallowed,3\n"
        "d,swallowed too,4\n"
        "e,,5\n"  # line 6: no prompt
    )
    manifest = load_manifest(str(path))
    assert [(r.item_id, r.line) for r in manifest.requests] == [("a", 2), ("c", 4), ("d", 5)]
    assert [(p.line, p.field) for p in manifest.problems] == [(3, "prompt"), (6, "prompt")]
    assert manifest.problems[0].reason.startswith("unterminated quoted field starting on line 3")
    assert "not valid UTF-8" not in manifest.problems[0].reason
    assert manifest.rows == 5 and manifest.invalid_rows == 2
    # A record that opens the quote on its second line: reported on its first line, naming where.
    path.write_text('id,prompt,seed\na,"two\nlines",1\nb,"ok\n",2\nc,p,"3\nd,p,4\n')
    manifest = load_manifest(str(path))
    assert [(r.item_id, r.line) for r in manifest.requests] == [("a", 2), ("b", 4), ("d", 7)]
    assert [(p.line, p.field) for p in manifest.problems] == [(6, "seed")]
    assert "starting on line 6" in manifest.problems[0].reason


def test_csv_unterminated_quote_in_a_large_file_stops_at_the_cell_limit(tmp_path):
    path = tmp_path / "q.csv"
    rows = "".join(f"r{i},{'z' * 100},{i}\n" for i in range(3000))  # 300 kB: more than a cell may hold
    path.write_text(f'id,prompt,seed\na,"never closed,1\n{rows}')
    manifest = load_manifest(str(path))
    assert manifest.rows == 3001 and len(manifest.requests) == 3000 and manifest.invalid_rows == 1
    assert [(p.line, p.field) for p in manifest.problems] == [(2, "prompt")]
    assert f"within {csv.field_size_limit()} characters" in manifest.problems[0].reason
    split = split_manifest(str(path), str(tmp_path / "out"), blocksize=50_000)
    assert split.problems == manifest.problems and split.valid == 3000


def test_csv_bad_bytes_and_carriage_returns_are_reported_on_their_own_line(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(b'id,prompt,seed\na,"multi\nline \xff",1\nb,x\ry,2\nc,ok,3\n,,,,\n\nd,"a ""q"" b",4\n')
    manifest = load_manifest(str(path))
    assert [(r.item_id, r.line) for r in manifest.requests] == [("c", 5), ("d", 8)]
    assert manifest.requests[1].prompt == 'a "q" b'
    assert [(p.line, p.field) for p in manifest.problems] == [(2, None), (4, None)]
    assert manifest.problems[0].reason == "not valid UTF-8 (byte 6 of line 3)"
    assert "carriage return" in manifest.problems[1].reason
    assert_storable(manifest.problems)


def test_csv_bad_header_record_is_a_manifest_error(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes(b'id,"prompt\na,b\n')
    with pytest.raises(ManifestError, match="line 1: cannot read the header: unterminated quoted field"):
        load_manifest(str(path))
    with pytest.raises(ManifestError, match="line 1: cannot read the header: unterminated quoted field"):
        split_manifest(str(path), str(tmp_path / "out"))


# --------------------------------------------------------------------------- fuzz

_GARBAGE = [
    "not json", "{", "}", "{'single': 'quotes'}", '{"id": "x",}', "[", "[[1]", "nul", "{}{}",
    '"just a string"', "42", "null", "true", "[1, 2, 3]", '{"id": "x"} trailing', "\x00\x01", "{" * 5000,
    "[" * 5000 + "]" * 5000,
]  # fmt: skip
_BAD_VALUES: dict[str, list[Any]] = {
    "id": ["", "   ", "a" * 200, "tab\there", "\x7f", True, 3.5, [1], {"a": 1}, "\u0085nel", "%" * 100],
    "prompt": ["", "  ", 1, 2.5, True, [], {"p": "x"}, ["a"], "x" * 20_001],
    "seed": [-1, 2**63, 10**30, True, False, "abc", 1.5, [], "1e3", {"a": 1}, "-5"],
    "num_seeds": [0, -3, 10_001, True, "many", 2.5],
    "size": ["abc", "13*48", "64*47", "0*0", "64", "64*48*3", [64, 48], 6448, True, "99999*16", "-64*48"],
    "frame_num": [0, 10, -1, True, "x", 8, 12, 10**9, 4.5],
    "steps": [0, -2, True, "ten", 10**6, 1.2],
    "sample_steps": [0, "x"],
    "shift": [-1, 0, "inf", "nan", True, "x", [], 10**6],
    "guide_scale": [-0.5, 1e9, "x", False, "-inf"],
    "solver": ["foo", 3, "", True, ["unipc"]],
    "model": ["nope", 5, "", "TINY-T2V", ["tiny-t2v"]],
    "image": ["", 1, ["a.png"]],
    "negative_prompt": [1, ["x"], {"a": "b"}],
}


def _fuzz_bad_line(rng: random.Random, index: int) -> bytes:
    """One line that must be reported (and never crash the validator)."""
    kind = rng.randrange(9)
    good = {"id": f"bad-{index}", "prompt": f"prompt {index}"}
    if kind == 0:
        return rng.choice(_GARBAGE).encode()
    if kind == 1:
        return b'{"id": "u-%d", "prompt": "\xff\xfe bad utf8"}' % index
    if kind == 2:
        return rng.choice([b'{"id": "d%d", "prompt": "a", "prompt": "b"}' % index,  # a key given twice
                           b'{"id": "s\\ud800", "prompt": "lone surrogate"}',
                           b'{"id": "n%d", "prompt": "x", "seed": NaN}' % index,
                           b'{"id": "h%d", "prompt": "x", "seed": 1%s}' % (index, b"0" * 5000),
                           b'{"id": "i%d", "prompt": "x", "shift": 1e400}' % index,
                           b'{"id": "t%d", "prompt": "\\udfff"}' % index])  # fmt: skip
    if kind == 3:  # an unknown field
        good["".join(rng.choice("abcxyz_") for _ in range(rng.randrange(1, 12))) + "_zz"] = rng.random()
    elif kind == 4:  # an image for a text-to-video model / none for image-to-video
        good.update(rng.choice([{"image": "a.png"}, {"model": "tiny-i2v"}, {"last_image": "b.png"}]))
    elif kind == 5:  # a required field missing
        del good[rng.choice(["id", "prompt"])]
    else:  # one to three bad values
        for field in rng.sample(sorted(_BAD_VALUES), rng.randrange(1, 4)):
            good[field] = rng.choice(_BAD_VALUES[field])
            if field == "id":
                good[field] = good[field] if not isinstance(good[field], str) else good[field] + "\x01"
    return json.dumps(good).encode()


def _fuzz_good_line(rng: random.Random, index: int) -> bytes:
    row: dict[str, Any] = {"id": f"good-{index}", "prompt": f"a prompt {index} " * rng.randrange(1, 4)}
    if rng.random() < 0.3:
        row["size"] = rng.choice(["64*48", "96x64", "128*128"])
    if rng.random() < 0.3:
        row["seed"] = rng.randrange(2**40)
    if rng.random() < 0.2:
        row.update(model="tiny-i2v", image=f"img/{index}.png")
    if rng.random() < 0.2:
        row["frame_num"] = rng.choice([1, 5, 9, 13])
    return json.dumps(row).encode()


def _fuzz_file(tmp_path: Path, seed: int, count: int) -> tuple[str, set[int], set[int]]:
    rng = random.Random(seed)
    lines, bad, good = [], set(), set()
    for index in range(count):
        if rng.random() < 0.08:
            lines.append(b"")  # blank lines count but hold no row
            continue
        if rng.random() < 0.5:
            lines.append(_fuzz_bad_line(rng, index))
            bad.add(index + 1)
        else:
            lines.append(_fuzz_good_line(rng, index))
            good.add(index + 1)
    path = tmp_path / f"fuzz-{seed}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), bad, good


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_rows_each_get_a_problem_on_their_line(tmp_path, seed):
    url, bad, good = _fuzz_file(tmp_path, seed, 400)
    manifest = load_manifest(url)
    assert {p.line for p in manifest.problems} == bad
    assert {r.line for r in manifest.requests} == good
    assert manifest.rows == len(bad) + len(good)
    text = str(ManifestError(url, manifest.problems, manifest.rows))
    text.encode("utf-8")  # printable: no lone surrogates leak into messages
    for problem in manifest.problems:
        assert problem.reason and "\n" not in problem.describe(url)
        assert problem.raw is None or len(problem.raw) <= 2000
    # The partitioned path finds the same problems on the same lines, across many small blocks.
    result = split_manifest(url, str(tmp_path / f"out-{seed}"), blocksize=2048, rows_per_shard=7)
    assert result.partitions > 10
    assert [(p.line, p.field, p.reason) for p in result.problems] == [
        (p.line, p.field, p.reason) for p in manifest.problems
    ]
    shard_rows = [r for shard in result.shards for r in read_shard(shard)]
    assert sorted(shard_rows, key=lambda r: r.line) == manifest.requests


def test_fuzzed_csv_rows(tmp_path):
    rng = random.Random(7)
    columns = ["id", "prompt", "seed", "size", "frame_num", "steps", "solver", "image"]
    lines, bad, good = [",".join(columns)], set(), set()
    for index in range(300):
        line_no = len(lines) + 1
        cells = [f"c{index}", f"prompt {index}", "", "", "", "", "", ""]
        roll = rng.randrange(6)
        if roll == 0:
            good.add(line_no)
        elif roll == 1:
            cells = cells[: rng.randrange(1, 8)] if rng.random() < 0.5 else [*cells, "extra"]
            bad.add(line_no)
        elif roll == 2:
            lines.append(b"\xff,bad utf-8,,,,,,".decode("latin-1"))
            bad.add(line_no)
            continue
        else:
            column = rng.randrange(8)
            choices = {0: ["", "\x01"], 1: [" "], 2: ["x", "-1", "1.5", "99999999999999999999"],
                       3: ["abc", "13*48", "64"], 4: ["10", "0", "x"], 5: ["0", "-1", "x"], 6: ["heun"],
                       7: ["a.png"]}[column]  # fmt: skip
            cells[column] = rng.choice(choices)
            if column in (0, 1) and cells[column].strip() == "":
                cells[column] = ""
            bad.add(line_no)
        lines.append(",".join(cells))
    path = tmp_path / "fuzz.csv"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    manifest = load_manifest(str(path))
    assert {p.line for p in manifest.problems} == bad
    assert {r.line for r in manifest.requests} == good


class _Weird:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_resolve_never_raises():
    rng = random.Random(3)
    values: list[Any] = [
        None, True, False, 0, -1, 1, 2**70, 10**5000, 1.5, math.nan, math.inf, -math.inf, "", " ",
        "x" * 30_000, "\ud800", b"bytes", b"\xff", [1], {"a": 1}, {1, 2}, (1, 2), _Weird(),
        decimal.Decimal("NaN"), decimal.Decimal("5"), datetime.datetime(2026, 1, 1), 1 + 2j, "64*48",
        "tiny-i2v", "a.png", 5, 9, "unipc", object(), [[[[[[]]]]]], float("-0.0"),
    ]  # fmt: skip
    keys: list[Any] = [
        *COLUMNS,
        "sample_shift",
        "sample_guide_scale",
        "sample_solver",
        "junk",
        "",
        1,
        None,
        ("t",),
    ]
    defaults = RunDefaults()
    outcomes = Counter()
    for line in range(1, 600):
        fields = {rng.choice(keys): rng.choice(values) for _ in range(rng.randrange(0, 8))}
        if rng.random() < 0.5:
            fields.setdefault("id", f"id{line}")
            fields.setdefault("prompt", "p")
        result = resolve(fields, line, defaults)
        if isinstance(result, ResolvedRequest):
            outcomes["ok"] += 1
            continue
        outcomes["bad"] += 1
        assert result and all(isinstance(p, RowProblem) and p.line == line for p in result)
        for p in result:
            p.describe("m.jsonl").encode("utf-8")
    assert outcomes["bad"] > 300
    for thing in ([1, 2], "text", 5, None):
        result = resolve(thing, 4, defaults)  # type: ignore[arg-type]
        assert (
            isinstance(result, list) and result[0].field is None and "expected an object" in result[0].reason
        )


# --------------------------------------------------------------------------- splitting with dask


def _shard_check(result, rows_per_shard: int) -> list[ResolvedRequest]:
    """Every shard holds one group and at most rows_per_shard rows; the rows of all shards, by line."""
    rows = []
    for shard in result.shards:
        in_shard = list(read_shard(shard))
        assert 0 < len(in_shard) <= rows_per_shard
        assert len({r.group() for r in in_shard}) == 1
        group = in_shard[0].group()
        assert f"-{group[0]}_{group[1][0]}x{group[1][1]}_{group[2]}f-" in Path(shard).name
        rows += in_shard
    rows.sort(key=lambda r: r.line)
    assert len(rows) == result.valid and sum(len(r.seeds) for r in rows) == result.jobs
    return rows


@pytest.mark.parametrize("fmt", MANIFEST_FORMATS)
def test_split_matches_load(tmp_path, fmt):
    rng = random.Random(5)
    rows: list[dict[str, Any]] = []
    for i in range(1500):
        row: dict[str, Any] = {
            "id": f"r{i}",
            "prompt": f"prompt number {i}",
            "size": rng.choice(["64*48", "96*64"]),
        }
        if i % 5 == 0:
            row.update(model="tiny-i2v", image=f"i{i}.png")
        if i % 97 == 3:
            row["frame_num"] = 10  # bad
        if i % 211 == 7:
            row["id"] = "r0"  # a duplicate of the first row, in a later partition
        rows.append(row)
    if fmt == "parquet":
        url = write_parquet(tmp_path / "m.parquet", rows, row_group_size=50)
    else:
        url = write_manifest(tmp_path, fmt, rows)[0]
    manifest = load_manifest(url)
    result = split_manifest(
        url, str(tmp_path / "out"), rows_per_shard=64, blocksize=8 * 1024, max_problems=10_000
    )
    assert result.partitions > 5
    assert (result.rows, result.valid, result.jobs) == (manifest.rows, len(manifest.requests), manifest.jobs)
    assert result.invalid == result.rows - result.valid == len({p.line for p in manifest.problems})
    assert result.problems == manifest.problems
    assert any("duplicate item_id 'r0'" in p.reason for p in result.problems)
    assert _shard_check(result, 64) == manifest.requests
    assert set(result.groups) == {
        "tiny-t2v/64x48/9f",
        "tiny-t2v/96x64/9f",
        "tiny-i2v/64x48/9f",
        "tiny-i2v/96x64/9f",
    }
    assert sum(result.groups.values()) == result.jobs


def test_split_output_location(tmp_path):
    url = write_jsonl(tmp_path / "m.jsonl", GOOD_ROWS)
    out = str(tmp_path / "out")
    first = split_manifest(url, out)
    with pytest.raises(FileExistsError, match="already holds"):
        split_manifest(url, out)
    again = split_manifest(url, "file://" + out, overwrite=True)
    assert [Path(s).name for s in again.shards] == [Path(s).name for s in first.shards]
    assert all(s.startswith("file://") for s in again.shards)
    assert sorted(os.listdir(out)) == sorted(Path(s).name for s in first.shards)
    compressed = write_jsonl(tmp_path / "m.jsonl.gz", GOOD_ROWS, compress=True)
    packed = split_manifest(compressed, str(tmp_path / "out-gz"))
    assert packed.partitions == 1 and packed.valid == 5


def test_read_shard_names_a_damaged_line(tmp_path):
    url = write_jsonl(tmp_path / "m.jsonl", GOOD_ROWS)
    shard = split_manifest(url, str(tmp_path / "out"), rows_per_shard=100).shards[0]
    Path(shard).write_text(Path(shard).read_text() + '{"line": 1}\n')
    with pytest.raises(ManifestError, match=r"line \d+: not a shard row"):
        list(read_shard(shard))


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _PeakRss:
    """Samples the process's resident set every few milliseconds: its growth over the start while open."""

    def __enter__(self) -> _PeakRss:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.003):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _big_manifest(path: Path, count: int) -> tuple[set[int], int, int]:
    """A generated JSON Lines manifest: three groups, some bad rows, one duplicate id far from its first use.
    Returns (bad lines, duplicate line, first line of that id)."""
    bad: set[int] = set()
    templates = [
        '{"id": "item-%07d", "prompt": "a photo of thing %d, golden hour, 35mm film"}\n',
        '{"id": "item-%07d", "prompt": "a drawing of thing %d", "size": "96*64", "seed": 42}\n',
        '{"id": "item-%07d", "prompt": "animate thing %d", "model": "tiny-i2v", "image": "img/x.png"}\n',
    ]
    with open(path, "w") as f:
        for i in range(count):
            line = i + 1
            if i % 40_000 == 1234:
                f.write(f'{{"id": "broken-{i}", \n')
                bad.add(line)
            elif i % 50_000 == 999:
                f.write(f'{{"id": "bad-{i}", "prompt": "x", "frame_num": 8, "size": "65*48"}}\n')
                bad.add(line)
            elif i == count - 10:
                f.write(templates[0] % (10, i))  # repeats the id of line 11
                bad.add(line)
            else:
                f.write(templates[i % 3] % (i, i))
    return bad, count - 9, 11


def test_split_200k_rows_fast_and_bounded(tmp_path):
    """200,000 rows split in partitions: fast, exact line numbers, bounded memory.

    Memory: the process's peak resident set (sampled every 3 ms from /proc) may grow by less than half of
    what the resolved rows would take if held together, estimated by measuring (tracemalloc) 20,000 of
    them held in a list (about 85 MiB for all; the split grows by 10 to 20 MiB: two tasks' 1 MiB blocks,
    their shard buffers and allocator slack). Blocks of 1 MiB make about 20 partitions of the 20 MiB file.
    """
    count = 200_000
    url = str(tmp_path / "big.jsonl")
    bad, dup_line, dup_first = _big_manifest(Path(url), count)

    # What holding every row would take: measured on a tenth of them.
    with open(url) as f:
        sample = [json.loads(line) for _, line in zip(range(20_000), f, strict=False) if "broken" not in line]
    tracemalloc.start()
    held = [
        resolve(fields, n, RunDefaults()) for n, fields in enumerate(sample, 1) if isinstance(fields, dict)
    ]
    per_row = tracemalloc.get_traced_memory()[0] / len(held)
    tracemalloc.stop()
    del held, sample
    all_rows_bytes = per_row * count

    warm = write_jsonl(tmp_path / "warm.jsonl", GOOD_ROWS)  # imports and the thread pool, outside the measure
    split_manifest(warm, str(tmp_path / "warm-out"), blocksize=64)

    rows_per_shard = 2000
    start = time.perf_counter()
    with _PeakRss() as memory:
        result = split_manifest(
            url, str(tmp_path / "shards"), rows_per_shard=rows_per_shard, blocksize="1MiB"
        )
    seconds = time.perf_counter() - start
    growth, all_mib = memory.growth / 2**20, all_rows_bytes / 2**20
    print(f"split {count} rows: {seconds:.1f} s, {result.partitions} partitions, "
          f"peak RSS growth {growth:.1f} MiB vs {all_mib:.0f} MiB to hold all rows")  # fmt: skip
    assert seconds < 60
    assert result.partitions > 10
    assert len({Path(s).name.split("-")[1] for s in result.shards}) == result.partitions
    assert memory.growth < all_rows_bytes / 2

    assert result.rows == count and result.invalid == len(bad) and result.valid == count - len(bad)
    assert {p.line for p in result.problems} == bad
    dup = [p for p in result.problems if p.line == dup_line]
    assert dup == [RowProblem(dup_line, "item_id", f"duplicate item_id 'item-0000010': already used on line "
                                                   f"{dup_first}", "item-0000010")]  # fmt: skip
    assert result.groups == {
        "tiny-t2v/64x48/9f": len([i for i in range(count) if i % 3 == 0 and i + 1 not in bad]),
        "tiny-t2v/96x64/9f": len([i for i in range(count) if i % 3 == 1 and i + 1 not in bad]),
        "tiny-i2v/64x48/9f": len([i for i in range(count) if i % 3 == 2 and i + 1 not in bad]),
    }
    rows = _shard_check(result, rows_per_shard)
    lines = [r.line for r in rows]
    assert lines == sorted(set(range(1, count + 1)) - bad)
    with open(url) as f:
        assert rows[0] == resolve(json.loads(f.readline()), 1, RunDefaults())
    assert rows[-1].item_id == f"item-{count - 1:07d}" and rows[-1].line == count


@pytest.mark.integration
def test_s3_manifest(s3_target):
    options = s3_target.options
    body = b"".join(json.dumps(r).encode() + b"\n" for r in GOOD_ROWS)
    s3_target.put("in/m.jsonl", body)
    url = s3_target.url("in/m.jsonl")
    manifest = validate_manifest(url, storage_options=options)
    assert isinstance(manifest, Manifest) and manifest.sha256 == hashlib.sha256(body).hexdigest()
    result = split_manifest(url, s3_target.url("shards"), storage_options=options, rows_per_shard=2)
    assert result.valid == 5 and all(s.startswith("s3://") for s in result.shards)
    rows = sorted(
        (r for s in result.shards for r in read_shard(s, storage_options=options)), key=lambda r: r.line
    )
    assert rows == manifest.requests
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(s3_target.url("in/nope.csv"), storage_options=options)
