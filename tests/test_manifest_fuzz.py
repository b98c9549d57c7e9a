"""Deterministic fuzz of the manifest loader: malformed rows of every kind, in JSON Lines, CSV and Parquet.

Each generated file mixes valid rows with malformed ones whose line (Parquet: row) and field are known in
advance. The loader `wanflow validate` uses (`load_manifest`) and the partitioned path (`split_manifest`)
must raise nothing but ManifestError, report every malformed row on its own line and field, accept every
valid row, and count as invalid exactly the malformed rows. Seeded `random`: the same files every run.
"""

from __future__ import annotations

import csv
import io
import json
import random
import traceback
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.manifest import Manifest, ManifestError, RowProblem, iter_rows, load_manifest, split_manifest

# --------------------------------------------------------------------------- bookkeeping


@dataclass
class Expected:
    """What a generated file holds: the line of every valid row, and of every malformed one the fields one
    of which (at least) must be named (None: the row as a whole, e.g. not JSON at all)."""

    valid: dict[int, str] = field(default_factory=dict)  # line -> item id
    malformed: dict[int, set[str | None]] = field(default_factory=dict)  # line -> acceptable fields
    kinds: dict[str, int] = field(default_factory=dict)  # malformed kind -> rows, for the coverage check

    def bad(self, line: int, kind: str, *fields: str | None) -> None:
        assert line not in self.malformed and line not in self.valid
        self.malformed[line] = set(fields)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def good(self, line: int, item_id: str) -> None:
        assert line not in self.malformed and line not in self.valid
        self.valid[line] = item_id


def _escaped(name: str) -> str:
    """A field name as a RowProblem shows it (NUL and invisible characters as escapes)."""
    return RowProblem(0, name, "").field or ""


def _safe(call: Callable[[], Any]) -> Any:
    """`call()`; any exception but ManifestError fails the test with its traceback."""
    try:
        return call()
    except ManifestError:
        raise
    except Exception:
        pytest.fail(
            f"the manifest loader raised something other than ManifestError:\n{traceback.format_exc()}"
        )


def _check_storable(problems: list[RowProblem]) -> None:
    for problem in problems:
        for value in problem._asdict().values():
            if isinstance(value, str):
                assert "\x00" not in value
                value.encode("utf-8")  # no lone surrogate
        for name in (problem.field, problem.item_id):
            assert name is None or not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)
        assert problem.reason and "\n" not in problem.describe("m.jsonl")
        assert problem.raw is None or len(problem.raw) <= 2000


def _check(url: str, expected: Expected, *, blocksize: int | None, tmp_path: Path) -> Manifest:
    """Load (and split) `url`; every malformed row reported on its line and field, nothing else."""
    manifest = _safe(lambda: load_manifest(url))
    _check_storable(manifest.problems)
    reported: dict[int, set[str | None]] = {}
    for problem in manifest.problems:
        reported.setdefault(problem.line, set()).add(problem.field)
    assert set(reported) == set(expected.malformed), (
        f"lines reported but not malformed: {sorted(set(reported) - set(expected.malformed))[:10]}, "
        f"malformed but not reported: {sorted(set(expected.malformed) - set(reported))[:10]}"
    )
    for line, fields in expected.malformed.items():
        assert fields & reported[line], (line, fields, [p for p in manifest.problems if p.line == line])
    assert {r.line: r.item_id for r in manifest.requests} == expected.valid
    assert manifest.rows == len(expected.valid) + len(expected.malformed)
    assert manifest.invalid_rows == len(expected.malformed)
    str(ManifestError(url, manifest.problems, manifest.rows)).encode("utf-8")

    # The partitioned path: in blocks of `blocksize` bytes, or one partition (CSV records spanning lines).
    out = str(tmp_path / (Path(url).name + "-shards"))
    split = _safe(
        lambda: split_manifest(
            url, out, blocksize=blocksize or "64MiB", rows_per_shard=50, max_problems=10**6
        )
    )
    assert split.partitions > 1 if blocksize else split.partitions == 1
    assert (split.rows, split.valid, split.invalid_rows) == (
        manifest.rows,
        len(manifest.requests),
        manifest.invalid_rows,
    )
    assert split.problems == manifest.problems
    return manifest


# --------------------------------------------------------------------------- values

_CONTROLS = ["\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\x9f"]
_INVISIBLE = [
    "\u202e", "\u202d", "\u200b", "\u2066", "\u2067", "\u2069", "\u200e", "\u200f", "\u061c", "\ufeff",
    "\u00ad", "\u2028", "\u00a0", "\u3164", "\u180e",
]  # fmt: skip
_FINE_PROMPTS = [
    "a red fox runs through snow",
    "a family 👨\u200d👩\u200d👧 at the beach",
    "שלום \u200fworld, with a right-to-left mark",
    "tab\tseparated words",
    "an «émigré» café, naïve façade",
    "line one\nline two",
    'she said "hello", then left',
    "commas, commas, commas",
]

# field -> values a row may not hold there (each must make that field's problem)
_BAD_VALUES: dict[str, list[Any]] = {
    "id": ["", "   ", "x" * 129, True, 3.5, [1], {"a": 1}, "a/../..\x00", -1.5],
    "prompt": ["", "  ", 1, 2.5, True, [], {"p": "x"}, ["a"], "x" * 20_001, "ab\x00c", "bell\x07"],
    "negative_prompt": [1, ["x"], {"a": "b"}, "n\x00", "esc\x1b[31m"],
    "seed": [-1, 2**63, 10**30, True, False, "abc", 1.5, [], "1e3", {"a": 1}, "-5"],
    "num_seeds": [0, -3, 10_001, True, "many", 2.5],
    "size": ["abc", "13*48", "64*47", "0*0", "64", "64*48*3", [64, 48], 6448, True, "99999*16", "-64*48",
             "64*48\x00", "64\u202e*48"],
    "frame_num": [0, 10, -1, True, "x", 8, 12, 10**9, 4.5],
    "steps": [0, -2, True, "ten", 10**6, 1.2, -0.5],
    "shift": [-1, 0, "inf", "nan", True, "x", [], 10**6],
    "guide_scale": [-0.5, 1e9, "x", False, "-inf"],
    "solver": ["foo", 3, "", True, ["unipc"], "unipc\x00"],
    "model": ["nope", 5, "", "TINY-T2V", ["tiny-t2v"], "tiny-t2v\u200b"],
    "image": ["", 1, ["a.png"], "a\x00.png", "a\u2067.png"],
}  # fmt: skip
# the same for CSV, where every value is text (1, True or [] would be fine prompts there)
_CSV_BAD: dict[str, list[str]] = {
    "id": ["x" * 129, "a\x00", "tab\tid", "n\x85el"],  # (whitespace at either end is stripped: not bad)
    "prompt": ["x" * 20_001, "ab\x00c", "bell\x07"],
    "negative_prompt": ["n\x00", "esc\x1b[31m"],
    "seed": ["-1", "abc", "1.5", "1e3", "99999999999999999999", "True"],
    "num_seeds": ["0", "-3", "10001", "many", "2.5"],
    "size": ["abc", "13*48", "64", "0*0", "99999*16", "64*48*3", "64*48\x00"],
    "frame_num": ["0", "10", "-1", "x", "8", "4.5"],
    "steps": ["0", "-2", "ten", "1000000", "1.2"],
    "shift": ["-1", "0", "inf", "nan", "x"],
    "guide_scale": ["-0.5", "1e9", "x", "-inf"],
    "solver": ["foo", "3", "unipc\x00"],
    "model": ["nope", "TINY-T2V", "tiny-t2v\u200b"],
    "image": ["a\x00.png", "a\u2067.png"],
}


def _good_row(rng: random.Random, item_id: str, plain: bool = False) -> dict[str, Any]:
    """A valid row; `plain`: no character a CSV writer would quote (after an unterminated quote)."""
    prompt = f"prompt {item_id}" if plain else rng.choice(_FINE_PROMPTS)
    row: dict[str, Any] = {"id": item_id, "prompt": prompt}
    if rng.random() < 0.3:
        row["size"] = rng.choice(["64*48", "96x64", "128*128"])
    if rng.random() < 0.3:
        row["seed"] = rng.randrange(2**40)
    if rng.random() < 0.2:
        row["num_seeds"] = rng.randrange(1, 4)
    if rng.random() < 0.2:
        row["frame_num"] = rng.choice([1, 5, 9, 13])
    if rng.random() < 0.15:
        row["steps"] = rng.randrange(1, 30)
    if rng.random() < 0.15:
        row["shift"] = rng.choice([0.5, 3, 7.25])
    if rng.random() < 0.15:
        row["guide_scale"] = rng.choice([0, 1.5, 6])
    if rng.random() < 0.15:
        row["solver"] = rng.choice(["unipc", "euler", "dpm++"])
    if rng.random() < 0.15:
        row["negative_prompt"] = "blurry" if plain else rng.choice(_FINE_PROMPTS)
    if rng.random() < 0.15:
        row.update(model="tiny-i2v", image=f"img/{item_id}.png")
    return row


def _bad_value_row(
    rng: random.Random, item_id: str, table: dict[str, list[Any]]
) -> tuple[dict[str, Any], list[str]]:
    """A row with one to three bad values from `table`: (row, the fields at fault)."""
    row: dict[str, Any] = {"id": item_id, "prompt": f"prompt {item_id}"}
    fields = rng.sample(sorted(table), rng.randrange(1, 4))
    if "image" in fields:
        row["model"] = "tiny-i2v"
    for name in fields:
        row[name] = rng.choice(table[name])
    return row, fields


def _canonical(name: str) -> set[str | None]:
    """The names a problem on field `name` may carry (a missing required field is reported canonically)."""
    return {name, {"id": "item_id"}.get(name, name)}


# --------------------------------------------------------------------------- JSON Lines

_GARBAGE = [
    b"not json", b"{", b"}", b"{'single': 'quotes'}", b'{"id": "x",}', b"[", b"[[1]", b"nul", b"{}{}",
    b'"just a string"', b"42", b"null", b"true", b"[1, 2, 3]", b'{"id": "x"} trailing', b"\x00\x01",
    b"{" * 3000, b"[" * 3000 + b"]" * 3000, b'{"a": ' * 2000 + b"1" + b"}" * 2000, b"\xef\xbb\xbf{}",
    b'{"id": "x", "prompt": "raw \x00 NUL byte"}', b'{"id": "x", "prompt": "raw \x07 control"}', b"\x1b[31m",
]  # fmt: skip


def _jsonl_file(tmp_path: Path, seed: int, count: int) -> tuple[str, Expected]:
    rng = random.Random(seed)
    out = bytearray(b"\xef\xbb\xbf" if seed % 2 else b"")  # a byte-order mark opening the file is fine
    expected = Expected()
    valid_ids: list[str] = []
    line = 0
    for index in range(count):
        line += 1
        item_id = f"j{seed}-{index}"
        end = rng.choice([b"\n", b"\n", b"\r\n"])
        roll = rng.random()
        if roll < 0.06:
            out += rng.choice([b"", b"   ", b"\t", b" \r"]) + end  # blank: no row
            continue
        if roll < 0.5:
            row = _good_row(rng, item_id)
            text = json.dumps(row, ensure_ascii=rng.random() < 0.5).encode()
            out += (b"  " if rng.random() < 0.1 else b"") + text + end
            expected.good(line, item_id)
            valid_ids.append(item_id)
            continue
        kind = rng.randrange(16)
        if kind == 13 and line == 1:  # a BOM that opens the file is the file's, not a fault
            kind = 0
        if kind == 0:
            garbage = rng.choice(_GARBAGE)
            out += (b"not json" if line == 1 and garbage.startswith(b"\xef") else garbage) + end
            expected.bad(line, "garbage", None)
        elif kind == 1:
            out += b'{"id": "%s", "prompt": "\xff\xfe bad \xc3 utf8"}' % item_id.encode() + end
            expected.bad(line, "invalid utf-8", None)
        elif kind == 2:
            out += b'{"id": "%s", "prompt": "a", "prompt": "b"}' % item_id.encode() + end
            expected.bad(line, "key twice", "prompt")
        elif kind == 3:
            digits = b"9" * rng.choice([5000, 20_000])
            out += b'{"id": "%s", "prompt": "p", "seed": %s}' % (item_id.encode(), digits) + end
            expected.bad(line, "huge number", None)
        elif kind == 4:
            out += (
                b'{"id": "%s", "prompt": "p", "shift": %s}'
                % (item_id.encode(), rng.choice([b"NaN", b"1e400", b"-Infinity"]))
                + end
            )
            expected.bad(line, "non-finite", "shift")
        elif kind == 5:  # NUL written as a JSON escape, in a value or a key
            name = rng.choice(
                ["prompt", "negative_prompt", "id", "image", "size", "solver", "model", "pro\x00mpt"]
            )
            row = {"id": item_id, "prompt": "p"}
            if name == "image":
                row["model"] = "tiny-i2v"
            row[name] = {"size": "64*48", "solver": "euler", "model": "tiny-t2v"}.get(name, "v") + "\x00"
            out += json.dumps(row).encode() + end
            expected.bad(line, "NUL", *_canonical(name), _escaped(name))
        elif kind == 6:  # lone surrogates, escaped in JSON
            name = rng.choice(["prompt", "id", "negative_prompt", "k"])
            texts = {
                "negative_prompt": f'{{"id": "{item_id}", "prompt": "p", "negative_prompt": "x\\ud800y"}}',
                "k": f'{{"id": "{item_id}", "prompt": "p", "k\\udfff": 1}}',
                "id": f'{{"id": "{item_id}\\udc00", "prompt": "p"}}',
                "prompt": f'{{"id": "{item_id}", "prompt": "x\\udc00y"}}',
            }
            text = texts[name]
            out += text.encode() + end
            expected.bad(line, "surrogate", *_canonical(name), _escaped("k\udfff"))
        elif kind == 7:  # invisible or direction-changing characters in an id
            spoof = f"{item_id}{rng.choice(_INVISIBLE)}txt.exe"
            out += (
                json.dumps({"item_id": spoof, "prompt": "p"}, ensure_ascii=rng.random() < 0.5).encode() + end
            )
            expected.bad(line, "spoofing id", "item_id")
        elif kind == 8:  # a control character in a prompt
            prompt = f"prompt {rng.choice(_CONTROLS)} here"
            out += json.dumps({"id": item_id, "prompt": prompt}).encode() + end
            expected.bad(line, "control in prompt", "prompt")
        elif kind == 9:
            name = rng.choice(["id", "prompt"])
            row = {"id": item_id, "prompt": "p"}
            del row[name]
            out += json.dumps(row).encode() + end
            expected.bad(line, "missing field", *_canonical(name))
        elif kind == 10:
            key = "".join(rng.choice("abcxyz_") for _ in range(rng.randrange(1, 12))) + "_zz"
            out += json.dumps({"id": item_id, "prompt": "p", key: rng.random()}).encode() + end
            expected.bad(line, "unknown field", key)
        elif kind == 11 and valid_ids:
            out += json.dumps({"id": rng.choice(valid_ids), "prompt": "again"}).encode() + end
            expected.bad(line, "duplicate id", "item_id")
        elif kind == 12:
            row = rng.choice([{"model": "tiny-i2v"}, {"image": "a.png"}, {"last_image": "b.png"},
                              {"model": "tiny-flf2v", "image": "a.png"}])  # fmt: skip
            out += json.dumps({"id": item_id, "prompt": "p", **row}).encode() + end
            expected.bad(line, "image vs model", "image", "last_image")
        elif kind == 13:  # a byte-order mark in the middle of the file
            out += b"\xef\xbb\xbf" + json.dumps({"id": item_id, "prompt": "p"}).encode() + end
            expected.bad(line, "BOM mid-file", None)
        else:
            row, fields = _bad_value_row(rng, item_id, _BAD_VALUES)
            out += json.dumps(row).encode() + end
            expected.bad(line, "bad values", *{f for name in fields for f in _canonical(name)})
    path = tmp_path / f"fuzz-{seed}.jsonl"
    path.write_bytes(bytes(out))
    return str(path), expected


# --------------------------------------------------------------------------- CSV

_CSV_COLUMNS = ["id", "prompt", "negative_prompt", "seed", "num_seeds", "size", "frame_num", "steps", "shift",
                "guide_scale", "solver", "model", "image", "notes"]  # fmt: skip


def _csv_line(cells: list[Any], end: str) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator=end).writerow(["" if c is None else str(c) for c in cells])
    return out.getvalue()


def _cells(row: dict[str, Any]) -> list[Any]:
    return [row.get(c) for c in _CSV_COLUMNS]


def _csv_file(tmp_path: Path, seed: int, count: int) -> tuple[str, Expected]:
    rng = random.Random(seed)
    parts: list[bytes] = [b"\xef\xbb\xbf" if seed % 2 else b"", _csv_line(_CSV_COLUMNS, "\n").encode()]
    expected = Expected()
    valid_ids: list[str] = []
    line = 2  # the next record's first line
    unterminated_at = rng.randrange(count // 2, count)  # after it, nothing a quote could close

    def emit(data: bytes) -> int:
        nonlocal line
        start = line
        parts.append(data)
        line += data.count(b"\n")
        return start

    for index in range(count):
        item_id = f"c{seed}-{index}"
        plain = index > unterminated_at
        end = rng.choice(["\n", "\n", "\r\n"])
        roll = rng.random()
        if index == unterminated_at:
            start = emit(f'{item_id},"a quote that never closes,,,,,,,,,,,,\n'.encode())
            expected.bad(start, "unterminated quote", "prompt")
            continue
        if roll < 0.06:
            emit(rng.choice(["\n", "\r\n", ",,,,,,,,,,,,,\n", " , ,\n"]).encode())  # blank: no row
            continue
        if roll < 0.5:
            row = _good_row(rng, item_id, plain=plain)
            start = emit(_csv_line(_cells(row), end).encode())
            expected.good(start, item_id)
            valid_ids.append(item_id)
            continue
        kind = rng.randrange(13)
        cells = _cells({"id": item_id, "prompt": f"prompt {item_id}"})
        if kind == 0:  # one cell too many or too few
            cells = cells[: rng.randrange(1, len(cells))] if rng.random() < 0.5 else [*cells, "extra"]
            start = emit(_csv_line(cells, end).encode())
            expected.bad(start, "cell count", None)
        elif kind == 1:
            start = emit(_csv_line(cells, end).encode().replace(b"prompt", b"pr\xffom\xc3pt"))
            expected.bad(start, "invalid utf-8", None)
        elif kind == 2:  # NUL or another control character in a cell
            column = rng.choice(["id", "prompt", "negative_prompt", "size", "image", "solver", "model"])
            row = {"id": item_id, "prompt": "p", column: f"x{rng.choice(_CONTROLS[:4])}y"}
            if column == "image":
                row["model"] = "tiny-i2v"
            start = emit(_csv_line(_cells(row), end).encode())
            expected.bad(start, "control character", column)
        elif kind == 3:
            cells[0] = f"{item_id}{rng.choice(_INVISIBLE)}x"  # inside: the ends are stripped
            start = emit(_csv_line(cells, end).encode())
            expected.bad(start, "spoofing id", "id")
        elif kind == 4 and not plain:  # a cell larger than the csv module takes
            cells[1] = "x" * 140_000 if rng.random() < 0.5 else "a, b" * 40_000
            start = emit(_csv_line(cells, end).encode())
            expected.bad(start, "huge cell", "prompt")
        elif kind == 5:  # a carriage return inside an unquoted cell
            start = emit(f"{item_id},pro\rmpt,,,,,,,,,,,,\n".encode())
            expected.bad(start, "bare CR", None)
        elif kind == 6 and valid_ids:
            cells[0] = rng.choice(valid_ids)
            start = emit(_csv_line(cells, end).encode())
            expected.bad(start, "duplicate id", "item_id")
        elif kind == 7:
            column = rng.choice([0, 1])
            cells[column] = ""
            start = emit(_csv_line(cells, end).encode())
            expected.bad(start, "missing field", ["item_id", "prompt"][column])
        elif kind == 8:  # a byte-order mark in the middle of the file
            start = emit(b"\xef\xbb\xbf" + _csv_line(cells, end).encode())
            expected.bad(start, "BOM mid-file", "id")
        elif kind == 9:  # the extra column holds a value
            cells[-1] = "a note"
            start = emit(_csv_line(cells, end).encode())
            expected.bad(start, "unknown column", "notes")
        elif kind == 10 and not plain:  # a multi-line quoted prompt with a bad value elsewhere
            cells[1] = 'first line\nsecond, "quoted" line\n'
            cells[3] = "-1"
            start = emit(_csv_line(cells, end).encode())
            expected.bad(start, "multi-line bad", "seed")
        else:
            row, fields = _bad_value_row(rng, item_id, _CSV_BAD)
            start = emit(_csv_line(_cells(row), end).encode())
            expected.bad(start, "bad values", *{c for f in fields for c in _canonical(f)})
    path = tmp_path / f"fuzz-{seed}.csv"
    path.write_bytes(b"".join(parts))
    return str(path), expected


# --------------------------------------------------------------------------- Parquet


def _parquet_file(tmp_path: Path, seed: int, count: int) -> tuple[str, Expected]:
    """Typed columns (one type per column, as Parquet has): wrong values of the right type, strings where
    numbers go, bytes that are not UTF-8, nested values in columns the schema does not know."""
    rng = random.Random(seed)
    schema = pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.binary()), ("seed", pa.int64()),
        ("steps", pa.float64()), ("size", pa.string()), ("frame_num", pa.int64()), ("shift", pa.float64()),
        ("model", pa.string()), ("image", pa.string()), ("num_seeds", pa.string()),
        ("meta", pa.struct([("a", pa.int64())])), ("tags", pa.list_(pa.string())), ("no\x00te", pa.string()),
    ])  # fmt: skip
    rows: list[dict[str, Any]] = []
    expected = Expected()
    valid_ids: list[str] = []
    for index in range(count):
        number = index + 1
        item_id = f"p{seed}-{index}"
        row: dict[str, Any] = {"id": item_id, "prompt": f"prompt {index}"}
        if rng.random() < 0.5:
            good = _good_row(rng, item_id)
            good.pop("solver", None)
            good.pop("guide_scale", None)
            if "negative_prompt" in good:
                good["negative_prompt"] = good["negative_prompt"].encode()
            if "steps" in good:
                good["steps"] = float(good["steps"])  # 4.0 is an integer: fine for steps
            if "shift" in good:
                good["shift"] = float(good["shift"])
            if "num_seeds" in good:
                good["num_seeds"] = str(good["num_seeds"])  # "2": numeric text is fine
            rows.append(good)
            expected.good(number, item_id)
            valid_ids.append(item_id)
            continue
        kind = rng.randrange(12)
        if kind == 0:
            column = rng.choice(["id", "prompt", "size", "image", "model"])
            row[column] = {"size": "64*48", "model": "tiny-t2v"}.get(column, "v") + rng.choice(
                ["\x00", "\x07"]
            )
            if column == "image":
                row["model"] = "tiny-i2v"
            expected.bad(number, "control character", column)
        elif kind == 1:
            row["negative_prompt"] = rng.choice([b"\xff\xfe", b"ok\x00", b"\xed\xa0\x80"])  # bad UTF-8, NUL
            expected.bad(number, "bad bytes", "negative_prompt")
        elif kind == 2:
            row["id"] = f"{item_id}{rng.choice(_INVISIBLE)}x"
            expected.bad(number, "spoofing id", "id")
        elif kind == 3:
            row["seed"] = rng.choice([-1, -(2**63)])
            expected.bad(number, "negative seed", "seed")
        elif kind == 4:
            row["steps"] = rng.choice([2.5, -1.0, float("nan"), float("inf"), 1e12])
            expected.bad(number, "bad steps", "steps")
        elif kind == 5:
            column = rng.choice(["meta", "tags"])
            row[column] = {"a": 1} if column == "meta" else ["x"]
            expected.bad(number, "nested value", column)
        elif kind == 6:
            row["no\x00te"] = "a note"
            expected.bad(number, "NUL column name", _escaped("no\x00te"))
        elif kind == 7:
            row[rng.choice(["id", "prompt"])] = None
            expected.bad(number, "missing field", "item_id" if row["id"] is None else "prompt")
        elif kind == 8 and valid_ids:
            row["id"] = rng.choice(valid_ids)
            expected.bad(number, "duplicate id", "item_id")
        elif kind == 9:
            row["num_seeds"] = rng.choice(["0", "-2", "x", "1.5", "10001", "1e2"])
            expected.bad(number, "bad num_seeds", "num_seeds")
        elif kind == 10:
            row["shift"] = rng.choice([float("nan"), -1.0, 0.0, float("-inf")])
            expected.bad(number, "bad shift", "shift")
        else:
            update, column = rng.choice(
                [
                    ({"size": "13*48"}, "size"),
                    ({"frame_num": 10}, "frame_num"),
                    ({"frame_num": -3}, "frame_num"),
                    ({"model": "nope"}, "model"),
                    ({"model": "tiny-i2v"}, "image"),
                    ({"prompt": "x" * 20_001}, "prompt"),
                ]
            )
            row.update(update)  # fmt: skip
            expected.bad(number, "bad value", column)
        rows.append(row)
    table = pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in rows], schema=schema)
    path = tmp_path / f"fuzz-{seed}.parquet"
    pq.write_table(table, path, row_group_size=rng.choice([17, 40, 64]))
    return str(path), expected


# --------------------------------------------------------------------------- the tests

_SEEDS = [11, 12, 13]


@pytest.mark.parametrize(
    ("make", "count", "blocksize"),
    [(_jsonl_file, 500, 6_000), (_csv_file, 420, None), (_parquet_file, 300, 2_000)],
    ids=["jsonl", "csv", "parquet"],
)
def test_malformed_rows_are_each_reported_on_their_line(tmp_path, make, count, blocksize):
    malformed = 0
    kinds: dict[str, int] = {}
    for seed in _SEEDS:
        url, expected = make(tmp_path, seed, count)
        _check(url, expected, blocksize=blocksize, tmp_path=tmp_path)
        malformed += len(expected.malformed)
        for kind, n in expected.kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
        assert expected.valid, "some valid rows in every file"
        assert all(isinstance(item, tuple) for item in _safe(lambda u=url: list(iter_rows(u))))
    assert malformed >= 340, malformed  # three formats: well over 1,000 malformed rows in all
    assert min(kinds.values()) >= 1 and len(kinds) >= 9, kinds


def test_csv_split_in_blocks_agrees_for_one_line_records(tmp_path):
    """Blocked CSV needs one record per line (as dask's read_csv): a file of such records, split in blocks."""
    rng = random.Random(5)
    lines, expected = ["id,prompt,seed,size"], Expected()
    for index in range(600):
        number = len(lines) + 1
        if rng.random() < 0.5:
            lines.append(f"b{index},prompt {index},{index},64*48")
            expected.good(number, f"b{index}")
        else:
            bad = rng.choice([("x\x00y", "prompt"), ("p", "seed"), ("p", "size"), (f"q\u202e{index}", "id")])
            value, column = bad
            if column == "id":
                lines.append(f"{value},p,1,64*48")
            elif column == "prompt":
                lines.append(f"b{index},{value},1,64*48")
            else:
                lines.append(
                    f"b{index},p,{'-1' if column == 'seed' else '1'},{'13*48' if column == 'size' else ''}"
                )
            expected.bad(number, column, column)
    path = tmp_path / "blocks.csv"
    path.write_text("\n".join(lines) + "\n")
    _check(str(path), expected, blocksize=3_000, tmp_path=tmp_path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.parquet", b"PAR1 not really parquet PAR1"),
        ("truncated.parquet", b"PAR1"),
        ("dup.csv", b"id,prompt,id\x00,id\x00\na,b,c,d\n"),
        ("headless.csv", b"fox,a red fox\n"),
        ("quoted-header.csv", b'id,"prompt\na,b\n'),
        ("bad-header.csv", b"\xff\xfe,id\n"),
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n\r\n   \n"),
        ("garbage.jsonl.gz", b"\x1f\x8b not gzip"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_whole_file_failures_are_manifest_errors(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    for call in (lambda: load_manifest(str(tmp_path / name)), lambda: list(iter_rows(str(tmp_path / name)))):
        with pytest.raises(ManifestError) as info:
            _safe(call)
        assert "\x00" not in str(info.value)
        _check_storable(info.value.problems)
