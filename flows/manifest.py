"""Manifests: what a user asks for, one row per item, validated with a message for every bad row.

A manifest is JSON Lines (`.jsonl`, `.ndjson`), CSV (`.csv`, header required) or Parquet (`.parquet`,
`.pq`) at any fsspec URL; the text formats may be compressed (`.jsonl.gz`, `.csv.xz`, ...). A row is
validated as a `GenerationRequest`, then resolved against the run defaults and the model preset into a
`ResolvedRequest` (row > `RunDefaults` > preset). Nothing a row holds can make the validator raise:
every problem of every row comes back as a `RowProblem` naming the line (or Parquet row), the field
and what was expected, and the file as a whole fails only with a `ManifestError` (missing, unreadable,
empty, bad CSV header).

Two ways in:

- `load_manifest` / `validate_manifest` stream the rows (bounded memory while reading) and return
  every resolved request in one list: right for manifests that fit in memory.
- `split_manifest` never holds the whole manifest: dask reads it in partitions (byte blocks of the text
  formats, row groups of Parquet), each partition validates its rows and writes them straight to shard
  manifests of one group (model, size, frames) and at most `rows_per_shard` rows; `read_shard` reads
  a shard back. Line numbers are exact: a cheap first pass counts each block's lines.

Conventions shared by all formats: a missing value, `null`, `None` or an empty CSV cell means "unset";
a row repeating an earlier row's `item_id` is a problem (on field "item_id", naming the first line).
Seeds are explicit (`seed`, `seed+1`, ...) or derived from the item id and the run's `base_seed`, so
the same manifest always yields the same jobs.

Text: no field may hold NUL or a lone surrogate (PostgreSQL text cannot store them); prompts may hold any
other Unicode (emoji ZWJ sequences, right-to-left marks) and, of the control characters, tab, newline and
carriage return only; ids and the other text fields may hold no control, format (bidirectional overrides,
zero-width characters), separator or other invisible character, nor any space but U+0020 (see
`_check_chars`). A RowProblem's texts are always storable: such characters in them are written as escapes.
`Manifest.invalid_rows` / `SplitResult.invalid_rows` count the rows with a problem (a row may have several).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import json
import re
import reprlib
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import fsspec
import fsspec.compression
import fsspec.utils
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from storage.layout import MAX_ID_LENGTH, safe_name
from storage.urls import join_url, redact
from wan.configs import PRESETS, default_shift, parse_size, validate_request

__all__ = [
    "MANIFEST_FORMATS",
    "GenerationRequest",
    "Manifest",
    "ManifestError",
    "ResolvedRequest",
    "RowProblem",
    "RunDefaults",
    "SplitResult",
    "derive_seed",
    "iter_rows",
    "load_manifest",
    "manifest_format",
    "manifest_sha256",
    "read_shard",
    "resolve",
    "split_manifest",
    "validate_manifest",
]

MANIFEST_FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {"jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv", "parquet": "parquet", "pq": "parquet"}
# Stream compressions fsspec knows by extension (zip is an archive that needs seeking: not offered).
_COMPRESSIONS = {ext: name for ext, name in fsspec.utils.compressions.items() if name != "zip"}

MAX_SEED = 2**63 - 1
MAX_NUM_SEEDS = 10_000
MAX_PROMPT_CHARS = 20_000  # far beyond the text encoder's 512 tokens; guards against a runaway cell
MAX_URI_CHARS = 4096
MAX_SIDE = 8192  # pixels; validate_request checks the rest (multiples of the patch quantum)
MAX_FRAMES = 10_001
MAX_STEPS = 1000
MAX_RAW_CHARS = 2000  # a problem's `raw`: the row as written, cut
MAX_NAME_CHARS = 200  # a problem's `field` and `item_id`, cut
MAX_LISTED = 50  # problems listed in a ManifestError's message
_BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 1 << 20
_PARQUET_BATCH = 4096


# --------------------------------------------------------------------------- formats


def _name_parts(url: str) -> tuple[str, str | None]:
    """(extension, compression) of a URL's file name, both lower case; extension '' when none."""
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    parts = name.split(".")
    compression = None
    if len(parts) > 2 and parts[-1] in _COMPRESSIONS:
        compression = _COMPRESSIONS[parts.pop()]
    return (parts[-1] if len(parts) > 1 else ""), compression


def manifest_format(url: str) -> str:
    """'jsonl', 'csv' or 'parquet' from the file name (a compression suffix such as .gz is looked past)."""
    ext, compression = _name_parts(url)
    fmt = _EXTENSIONS.get(ext)
    accepted = ", ".join(f".{e}" for e in _EXTENSIONS)
    if fmt is None:
        reason = (
            f"unknown manifest extension {('.' + ext) if ext else '(none)'!r}; expected one of {accepted}"
            f" (text formats optionally compressed: {', '.join('.' + c for c in _COMPRESSIONS)})"
        )
        raise ManifestError(url, [RowProblem(0, None, reason)])
    if fmt == "parquet" and compression:
        reason = "Parquet files are compressed inside; give the .parquet file itself, not a compressed copy"
        raise ManifestError(url, [RowProblem(0, None, reason)])
    return fmt


def _unit(url: str) -> str:
    """'row' for Parquet (no lines), 'line' for the text formats."""
    ext, _ = _name_parts(url)
    return "row" if _EXTENSIONS.get(ext) == "parquet" else "line"


# --------------------------------------------------------------------------- schema


@functools.cache
def _solvers() -> tuple[str, ...]:
    # wan.sampling pulls in torch and diffusers: imported on first use, not with this module.
    from wan.sampling import SOLVERS

    return SOLVERS


# What text fields may hold. Every value ends up in PostgreSQL text / JSON columns, task names, storage keys
# and CLI tables, so:
# - no field may hold NUL (U+0000: PostgreSQL text cannot store it) or a lone surrogate (U+D800-U+DFFF: not
#   valid Unicode, cannot be encoded as UTF-8);
# - prompts (prompt, negative_prompt) may hold any other Unicode, format characters included (ZWJ emoji
#   sequences, right-to-left marks in Arabic or Hebrew text), and of the control characters only tab,
#   newline and carriage return;
# - ids and the other text fields (image URIs, model, size, solver) may hold no control character (Cc), no
#   format character (Cf: bidirectional overrides and isolates, zero-width spaces, BOM, ...), no line or
#   paragraph separator, no space other than U+0020 and no other invisible (default-ignorable) character:
#   such characters can make one id look like another in task names, storage keys and tables.
_PROMPT_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_IGNORABLE = re.compile(  # default-ignorable code points outside category Cf (invisible when rendered)
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]"
)
_STRICT_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Zs"})  # U+0020 is the one Zs allowed
_CONTROL_NAMES = {
    0x00: "NULL", 0x07: "BELL", 0x08: "BACKSPACE", 0x09: "CHARACTER TABULATION", 0x0A: "LINE FEED",
    0x0B: "LINE TABULATION", 0x0C: "FORM FEED", 0x0D: "CARRIAGE RETURN", 0x1B: "ESCAPE", 0x7F: "DELETE",
    0x85: "NEXT LINE",
}  # fmt: skip


def _char_label(ch: str) -> str:
    """'U+202E RIGHT-TO-LEFT OVERRIDE': a character named so a reader can find it (it may be invisible)."""
    code = ord(ch)
    name = unicodedata.name(ch, "") or _CONTROL_NAMES.get(code, "")
    if not name:
        category = unicodedata.category(ch)
        name = {"Cc": "(control character)", "Cs": "(lone surrogate)"}.get(category, f"(category {category})")
    return f"U+{code:04X} {name}"


def _forbidden_char(value: str, prompt: bool) -> tuple[int, str] | None:
    """(index, character) of the first character `value` may not hold, or None: see the rules above."""
    if prompt:
        match = _PROMPT_FORBIDDEN.search(value)
        return (match.start(), match.group()) if match else None
    ignorable = _IGNORABLE.search(value)
    if not value.isprintable():  # the fast path: isprintable() is False for every category refused here
        end = ignorable.start() if ignorable else len(value)
        for index in range(end):
            ch = value[index]
            if ch != " " and unicodedata.category(ch) in _STRICT_CATEGORIES:
                return index, ch
    return (ignorable.start(), ignorable.group()) if ignorable else None


def _check_chars(value: str, name: str, where: str, prompt: bool = False) -> str:
    """`value` unchanged, or ValueError naming the first character it may not hold (`where`: "ids", ...)."""
    found = _forbidden_char(value, prompt)
    if found is None:
        return value
    index, ch = found
    category = unicodedata.category(ch)
    if ch == "\x00":
        why = "PostgreSQL text cannot store NUL"
    elif category == "Cs":
        why = "a lone surrogate is not valid Unicode text"
    elif category == "Cc" and prompt:
        why = f"control characters other than tab, newline and carriage return are not allowed in {where}"
    elif category == "Cc":
        why = f"control characters are not allowed in {where}"
    elif category == "Zs":
        why = f"spaces other than the ordinary space U+0020 are not allowed in {where}"
    elif category in ("Zl", "Zp"):
        why = f"line and paragraph separators are not allowed in {where}"
    else:
        why = f"invisible or direction-changing characters are not allowed in {where}"
    raise ValueError(f"{name} contains {_char_label(ch)} at character {index + 1} ({why})")


_PLAIN_ID = re.compile(r"[A-Za-z0-9._-]+")  # ids that storage keys take as they are


@functools.lru_cache(maxsize=256)
def _parse_size(value: str) -> tuple[int, int]:
    return parse_size(value)


def _normalize_size(value: str | None) -> str | None:
    if value is None:
        return None
    _check_chars(value, "size", "sizes")
    width, height = _parse_size(value)
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ValueError(f"size {value!r}: width and height must be at most {MAX_SIDE}")
    return f"{width}*{height}"


def _check_model(value: str | None) -> str | None:
    if value is not None and _check_chars(value, "model", "model names") not in PRESETS:
        raise ValueError(f"unknown model {value!r}; expected one of: {', '.join(PRESETS)}")
    return value


def _check_solver(value: str | None) -> str | None:
    if value is None:
        return None
    _check_chars(value, "solver", "solver names")
    value = value.lower()
    if value not in _solvers():
        raise ValueError(f"unknown solver {value!r}; expected one of: {', '.join(_solvers())}")
    return value


_NUMERIC = ("seed", "num_seeds", "frame_num", "steps", "shift", "guide_scale")
_PROMPTS = ("prompt", "negative_prompt")
_URIS = ("image", "last_image")


class _SharedChecks(BaseModel):
    """The checks of the fields a row and the run defaults share: model, size, solver."""

    @field_validator("model", check_fields=False)
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        return _check_model(value)

    @field_validator("size", check_fields=False)
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        return _normalize_size(value)

    @field_validator("solver", check_fields=False)
    @classmethod
    def _solver(cls, value: str | None) -> str | None:
        return _check_solver(value)


class GenerationRequest(_SharedChecks):
    """One manifest row as the user wrote it. Unset fields fall back to the run defaults, then the preset.

    Accepted aliases: `id` for item_id, `task` for model, `sample_steps`, `sample_shift`,
    `sample_guide_scale`, `sample_solver` (the names of the official `generate.py`).
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, populate_by_name=True)

    item_id: str = Field(
        validation_alias=AliasChoices("item_id", "id"), min_length=1, max_length=MAX_ID_LENGTH
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, validation_alias=AliasChoices("model", "task"))
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    image: str | None = Field(None, min_length=1, max_length=MAX_URI_CHARS)
    last_image: str | None = Field(None, min_length=1, max_length=MAX_URI_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_seeds: int | None = Field(None, ge=1, le=MAX_NUM_SEEDS)
    size: str | None = None
    frame_num: int | None = Field(None, ge=1, le=MAX_FRAMES)
    steps: int | None = Field(
        None, validation_alias=AliasChoices("steps", "sample_steps"), ge=1, le=MAX_STEPS
    )
    shift: float | None = Field(
        None, validation_alias=AliasChoices("shift", "sample_shift"), gt=0, le=1000, allow_inf_nan=False
    )
    guide_scale: float | None = Field(
        None,
        validation_alias=AliasChoices("guide_scale", "sample_guide_scale"),
        ge=0,
        le=100,
        allow_inf_nan=False,
    )
    solver: str | None = Field(None, validation_alias=AliasChoices("solver", "sample_solver"))

    @field_validator("item_id", mode="before")
    @classmethod
    def _int_id(cls, value: Any) -> Any:
        # Integer ids ({"id": 17}, an int64 Parquet column) are taken as their decimal text.
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**40:
            return str(value)
        return value

    @field_validator(*_NUMERIC, mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value

    @field_validator("item_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        _check_chars(value, "item_id", "ids")
        if not _PLAIN_ID.fullmatch(value):
            safe_name(value)  # the id must make a storage key: raises with the reason otherwise
        return value

    @field_validator(*_PROMPTS)
    @classmethod
    def _check_prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_chars(value, str(info.field_name), "prompts", prompt=True)

    @field_validator(*_URIS)
    @classmethod
    def _check_uri(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_chars(value, str(info.field_name), "image URIs")

    @field_validator("negative_prompt")
    @classmethod
    def _empty_negative(cls, value: str | None) -> str | None:
        return value or None  # "" means "the default negative prompt", as in the official code


class RunDefaults(_SharedChecks):
    """Run-level parameters (CLI options / flow parameters): rows override them, they override the preset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "tiny-t2v"
    num_seeds: int = Field(1, ge=1, le=MAX_NUM_SEEDS)
    base_seed: int = Field(0, ge=0, le=MAX_SEED)
    size: str | None = None
    frame_num: int | None = Field(None, ge=1, le=MAX_FRAMES)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    shift: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)
    guide_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    solver: str | None = None
    negative_prompt: str | None = None

    @field_validator("negative_prompt")
    @classmethod
    def _check_prompt(cls, value: str | None) -> str | None:
        return None if value is None else _check_chars(value, "negative_prompt", "prompts", prompt=True)


def _aliases() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, info in GenerationRequest.model_fields.items():
        alias = info.validation_alias
        out[name] = tuple(str(c) for c in alias.choices) if isinstance(alias, AliasChoices) else (name,)
    return out


_NAMES = _aliases()  # canonical name -> every accepted spelling
_MULTI = [aliases for aliases in _NAMES.values() if len(aliases) > 1]
_CANONICAL = {alias: name for name, aliases in _NAMES.items() for alias in aliases}
_ACCEPTED = ", ".join(_CANONICAL)
_IMAGE_MODELS = ", ".join(name for name, preset in PRESETS.items() if preset.task != "t2v")


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class ResolvedRequest:
    """A valid row with every default filled in: what the jobs of this item will run."""

    line: int  # 1-based physical line where the row starts (JSONL/CSV), or 1-based row (Parquet)
    item_id: str
    model: str
    task: str  # preset.task: "t2v", "i2v" or "flf2v"
    prompt: str
    negative_prompt: str
    image: str | None
    last_image: str | None
    seeds: tuple[int, ...]
    size: tuple[int, int]  # (width, height)
    frame_num: int
    steps: int
    shift: float
    guide_scale: float
    solver: str

    def params(self) -> dict[str, Any]:
        """JSON-ready generation parameters that identify a job, less item id, model, seed and line."""
        out: dict[str, Any] = {
            "task": self.task,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "size": f"{self.size[0]}*{self.size[1]}",
            "frame_num": self.frame_num,
            "steps": self.steps,
            "shift": self.shift,
            "guide_scale": self.guide_scale,
            "solver": self.solver,
        }
        if self.image is not None:
            out["image"] = self.image
        if self.last_image is not None:
            out["last_image"] = self.last_image
        return out

    def group(self) -> tuple[str, tuple[int, int], int]:
        """(model, size, frame_num): jobs of one group can share a shard (one loaded pipeline)."""
        return self.model, self.size, self.frame_num

    def to_record(self) -> dict[str, Any]:
        """Every field, JSON-ready (seeds a list, size 'W*H'): one row of a shard manifest."""
        record = {f.name: getattr(self, f.name) for f in _RESOLVED_FIELDS}  # asdict() is slow: it deep-copies
        record["seeds"] = list(self.seeds)
        record["size"] = f"{self.size[0]}*{self.size[1]}"
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ResolvedRequest:
        """The inverse of `to_record` (KeyError / ValueError / TypeError on a record it did not write)."""
        fields = {f.name for f in _RESOLVED_FIELDS}
        if set(record) != fields:
            raise ValueError(f"expected the fields {sorted(fields)}, got {sorted(record)}")
        return cls(
            line=int(record["line"]),
            item_id=str(record["item_id"]),
            model=str(record["model"]),
            task=str(record["task"]),
            prompt=str(record["prompt"]),
            negative_prompt=str(record["negative_prompt"]),
            image=None if record["image"] is None else str(record["image"]),
            last_image=None if record["last_image"] is None else str(record["last_image"]),
            seeds=tuple(int(s) for s in record["seeds"]),
            size=parse_size(record["size"]),
            frame_num=int(record["frame_num"]),
            steps=int(record["steps"]),
            shift=float(record["shift"]),
            guide_scale=float(record["guide_scale"]),
            solver=str(record["solver"]),
        )


_RESOLVED_FIELDS = dataclasses.fields(ResolvedRequest)


def _group_key(group: tuple[str, tuple[int, int], int]) -> str:
    model, (width, height), frames = group
    return f"{model}/{width}x{height}/{frames}f"


_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape_char(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _visible(text: str, strict: bool) -> str:
    """`text` with every character that could not be stored or that hides itself written as an escape
    (`\\x00`, `\\u202e`, `\\ud800`, as Python's repr writes them): NUL, lone surrogates, control and format
    characters, line and paragraph separators. Tab and newline are kept unless `strict`
    (for names and ids, which also get any space but U+0020 and invisible fillers escaped)."""
    if text.isprintable() and not (strict and _IGNORABLE.search(text)):
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(_escape_char(ch) if strict and _IGNORABLE.match(ch) else ch)
            continue
        category = unicodedata.category(ch)
        if strict:
            unsafe = category in _STRICT_CATEGORIES
        else:
            unsafe = category in _UNSAFE_CATEGORIES and ch not in "\t\n"
        out.append(_escape_char(ch) if unsafe else ch)
    return "".join(out)


class _ProblemFields(NamedTuple):
    line: int
    field: str | None
    reason: str
    item_id: str | None = None
    raw: str | None = None


class RowProblem(_ProblemFields):
    """One thing wrong with one row (line 0: the file as a whole).

    `_asdict()` is what `Catalog.record_rejections` takes. Its texts are always safe to store and print:
    NUL, lone surrogates and invisible or direction-changing characters in `field`, `item_id`, `reason`
    and `raw` are written as visible escapes (`\\x00`, `\\u202e`) when the problem is made, and `field`
    and `item_id` are cut to MAX_NAME_CHARS, `raw` to MAX_RAW_CHARS.
    """

    __slots__ = ()

    def __new__(
        cls, line: int, field: str | None, reason: str, item_id: str | None = None, raw: str | None = None
    ) -> RowProblem:
        return super().__new__(
            cls,
            line,
            None if field is None else _visible(str(field), strict=True)[:MAX_NAME_CHARS],
            _visible(str(reason), strict=False),
            None if item_id is None else _visible(str(item_id), strict=True)[:MAX_NAME_CHARS],
            None if raw is None else _visible(str(raw), strict=False)[:MAX_RAW_CHARS],
        )

    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> RowProblem:  # _replace() goes through here
        return cls(*iterable)

    def describe(self, source: str, unit: str | None = None) -> str:
        """One readable line: "<source> line 7 (id 'a'), field 'size': <reason>".

        `unit` defaults to "row" when `source` names a Parquet file, "line" otherwise. The id and field are
        quoted as they are (already escaped), so an escape reads `\\x00`, not `\\\\x00` as repr() would write.
        """
        unit = unit or _unit(source)
        where = source if self.line <= 0 else f"{source} {unit} {self.line}"
        if self.item_id:
            where += f" (id '{self.item_id}')"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {' '.join(self.reason.split())}"


class ManifestError(ValueError):
    """A manifest that cannot be used: the file itself (line 0), or its bad rows (from validate_manifest).

    `url`, `problems` (every RowProblem) and `rows` (data rows read); `str()` lists the problems, the first
    MAX_LISTED of them, one a line.
    """

    def __init__(self, url: str, problems: list[RowProblem], rows: int = 0) -> None:
        self.url = url
        self.problems = list(problems)
        self.rows = rows
        super().__init__(self._message())

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.url, self.problems, self.rows)

    def _message(self) -> str:
        source = redact(self.url)
        unit = _unit(self.url)
        if len(self.problems) == 1 and self.problems[0].line <= 0:
            return self.problems[0].describe(f"manifest {source}", unit)
        bad_rows = _count_invalid_rows(self.problems)
        head = f"manifest {source}: {len(self.problems)} problem(s)"
        if self.rows:
            head += f" in {bad_rows} of {self.rows} {unit}s"
        lines = [head] + ["  " + p.describe(source, unit) for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        return "\n".join(lines)


@dataclasses.dataclass
class Manifest:
    """A manifest read in full: every valid row resolved, every problem listed."""

    url: str
    format: str
    sha256: str  # of the file's bytes as stored (compressed bytes for a compressed file)
    rows: int  # data rows read (blank lines and the CSV header not counted)
    requests: list[ResolvedRequest]
    problems: list[RowProblem]
    # Rows with at least one problem (one row may have several problems, so this is not len(problems)):
    # rows = len(requests) + invalid_rows. Counted from `problems` when not given (or negative); a split
    # manifest, whose `problems` may list only the first ones, passes SplitResult.invalid_rows.
    invalid_rows: int = dataclasses.field(default=-1, kw_only=True)

    def __post_init__(self) -> None:
        if self.invalid_rows < 0:
            self.invalid_rows = _count_invalid_rows(self.problems)

    @property
    def jobs(self) -> int:
        """One job per (request, seed)."""
        return sum(len(r.seeds) for r in self.requests)


@dataclasses.dataclass
class SplitResult:
    """What `split_manifest` wrote and found."""

    shards: list[str]  # URLs of the shard manifests, sorted
    rows: int  # data rows read
    valid: int  # rows written to shards
    jobs: int  # sum of the seeds of the valid rows
    problems: list[RowProblem]  # in manifest order, the first `max_problems` of them
    invalid: int  # rows with a problem, all of them (not only those listed): rows = valid + invalid
    groups: dict[str, int]  # "model/WxH/Ff" -> jobs
    partitions: int = 0  # dask partitions the manifest was read in

    @property
    def invalid_rows(self) -> int:
        """Rows with at least one problem (`invalid`, under the name `Manifest` uses)."""
        return self.invalid


def _count_invalid_rows(problems: Iterable[RowProblem]) -> int:
    """Distinct rows (lines) with a problem; problems of the file as a whole (line 0) are no row's."""
    return len({p.line for p in problems if p.line > 0})


# --------------------------------------------------------------------------- text helpers

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxlevel = 2


def _short(value: Any) -> str:
    """A short repr for messages, never raising (huge ints, odd objects)."""
    try:
        return _clean(_REPR.repr(value))
    except Exception:
        return f"<{type(value).__name__}>"


def _clean(text: str) -> str:
    """Text that can always be encoded (lone surrogates escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _raw_text(fields: Any) -> str | None:
    """The row as text for a problem report (JSON of the parsed row), cut to MAX_RAW_CHARS."""
    try:
        text = json.dumps(fields, ensure_ascii=False, default=str)
    except Exception:  # nested too deeply, ints past the str conversion limit, ...
        text = _short(fields)
    return _clean(text[: MAX_RAW_CHARS * 2])[:MAX_RAW_CHARS]


def _raw_item_id(fields: Any) -> str | None:
    """The item id as written (stripped), if the row has a usable one; for reports and duplicate checks."""
    if not isinstance(fields, Mapping):
        return None
    for key in _NAMES["item_id"]:
        value = fields.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**40:
            value = str(value)
        if isinstance(value, str) and value.strip():
            return _clean(value.strip()[:200])
    return None


def derive_seed(item_id: str, base_seed: int) -> int:
    """The first seed of a row without `seed`: stable across runs and machines (blake2b, 31 bits)."""
    digest = hashlib.blake2b(f"{base_seed}:{item_id}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % 2**31


def _digest(item_id: str) -> int:
    """64-bit digest of an item id, for the partitioned duplicate check."""
    return int.from_bytes(
        hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


# --------------------------------------------------------------------------- resolving one row


class _Unreadable:
    """A Parquet value pyarrow could not turn into Python (reported as a problem on its column)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<unreadable: {self.reason}>"


def _error_reason(error: Mapping[str, Any]) -> str:
    kind = error.get("type")
    field = str(error["loc"][0]) if error.get("loc") else ""
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(field, list(_CANONICAL), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field; {hint}expected one of: {_ACCEPTED}"
    if kind == "missing":
        names = _NAMES.get(field, (field,))
        also = f" (as {' or '.join(repr(n) for n in names)})" if len(names) > 1 else ""
        return f"required field is missing{also}"
    value = error.get("input")
    if kind == "string_unicode" and isinstance(value, str):  # pydantic refuses lone surrogates itself
        found = _forbidden_char(value, prompt=True)
        if found is not None:
            index, ch = found
            return (
                f"{_CANONICAL.get(field, field)} contains {_char_label(ch)} at character {index + 1} (a lone "
                "surrogate is not valid Unicode text)"
            )
    message = str(error.get("msg", "invalid value"))
    if kind == "value_error":  # our own validators: the message names the value already
        return message.removeprefix("Value error, ")
    return f"{message} (got {_short(value)})"


@functools.lru_cache(maxsize=1024)
def _preset_problem(model: str, field: str, value: Any) -> str | None:
    """validate_request for one field, the others held at the preset's defaults (so each field is judged
    on its own and a row gets one message per bad field). Cached: a value is judged (and warned about)
    once per model."""
    preset = PRESETS[model]
    s = preset.sampling
    args = {"size": s.size, "frame_num": s.frame_num, "steps": s.steps}
    args[field] = value
    try:
        validate_request(preset, args["size"], args["frame_num"], args["steps"])
    except ValueError as exc:
        return str(exc)
    return None


def resolve(
    fields: Mapping[str, Any], line: int, defaults: RunDefaults
) -> ResolvedRequest | list[RowProblem]:
    """Validate one row and fill in its defaults; every problem of the row, or the resolved request.

    Never raises: a value of any type in any field gives a RowProblem (a failure of the validator itself
    too, as a problem on the whole row).
    """
    try:
        return _resolve(fields, line, defaults)
    except Exception as exc:
        reason = f"could not validate the row ({type(exc).__name__}: {_short(str(exc))})"
        return [RowProblem(line, None, reason, _raw_item_id(fields), _raw_text(fields))]


def _resolve(
    fields: Mapping[str, Any], line: int, defaults: RunDefaults
) -> ResolvedRequest | list[RowProblem]:
    if not isinstance(fields, Mapping):
        reason = f"expected an object mapping field names to values, got {type(fields).__name__}"
        return [RowProblem(line, None, reason, None, _raw_text(fields))]
    found: list[tuple[str | None, str]] = []
    data: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            continue
        name = key if isinstance(key, str) else _short(key)
        if isinstance(value, _Unreadable):
            found.append((name, f"cannot read the value ({value.reason})"))
        elif not name.isascii() and _SURROGATE.search(name):  # pydantic would refuse the row, not the name
            found.append((name, f"unknown field (a lone surrogate in its name); expected one of {_ACCEPTED}"))
        else:
            data[name] = value
    for aliases in _MULTI:
        given = [a for a in aliases if a in data]
        for extra in given[1:]:
            found.append((extra, f"the same field as {given[0]!r}: give only one of {', '.join(aliases)}"))
            del data[extra]

    bad: set[str] = set()
    try:
        request: GenerationRequest | None = GenerationRequest.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            field = str(error["loc"][0]) if error.get("loc") else None
            found.append((field, _error_reason(error)))
            if field is not None:
                bad.add(_CANONICAL.get(field, field))
        # Validate what is left, so the remaining fields are still checked against the preset.
        rest = {k: v for k, v in data.items() if _CANONICAL.get(k) not in bad and k in _CANONICAL}
        if not any(name in rest for name in _NAMES["item_id"]):
            rest["item_id"] = "_"  # placeholders for required fields that failed: reported above
        rest.setdefault("prompt", "_")
        try:
            request = GenerationRequest.model_validate(rest)
        except ValidationError:
            request = None
    if request is not None:
        found += _check_against_preset(request, data, defaults, bad)

    if found:
        item_id = request.item_id if request is not None and "item_id" not in bad else _raw_item_id(fields)
        raw = _raw_text(fields)
        return [RowProblem(line, field, reason, item_id, raw) for field, reason in found]
    return _fill(request, line, defaults)  # type: ignore[arg-type]


def _given(name: str, data: Mapping[str, Any]) -> str:
    """The spelling of field `name` the row used (the canonical name if the row did not set it)."""
    return next((a for a in _NAMES[name] if a in data), name)


def _check_against_preset(
    request: GenerationRequest, data: Mapping[str, Any], defaults: RunDefaults, bad: set[str]
) -> list[tuple[str | None, str]]:
    """Problems only the model preset can tell: size / frames / steps it cannot do, image vs task, seeds."""
    found: list[tuple[str | None, str]] = []
    if "model" in bad:
        return found
    model = request.model or defaults.model
    preset = PRESETS.get(model)
    if preset is None:
        return [("model", f"unknown model {model!r} (run default); expected one of: {', '.join(PRESETS)}")]
    for name in ("size", "frame_num", "steps"):
        if name in bad:
            continue
        row_value, run_value = getattr(request, name), getattr(defaults, name)
        value = row_value if row_value is not None else run_value
        if value is None:
            continue
        origin = "" if row_value is not None else " (run default)"
        key = _parse_size(value) if name == "size" else value
        problem = _preset_problem(model, name, key)
        if problem:
            found.append((_given(name, data), problem + origin))
    if preset.task == "t2v":
        for name in ("image", "last_image"):
            if getattr(request, name) is not None and name not in bad:
                found.append(
                    (name, f"model {model} is text-to-video and takes no {name}; for image-to-video use a "
                           f"model of task i2v ({_IMAGE_MODELS})")
                )  # fmt: skip
    else:
        if request.image is None and "image" not in bad:
            found.append(
                ("image", f"model {model} is image-to-video and needs an input image (field 'image')")
            )
        if preset.task == "flf2v" and request.last_image is None and "last_image" not in bad:
            found.append((
                "last_image", f"model {model} is first-last-frame-to-video and needs a last image (field "
                "'last_image')",
            ))  # fmt: skip
        if preset.task == "i2v" and request.last_image is not None and "last_image" not in bad:
            found.append((
                "last_image", f"model {model} animates one image and takes no last_image; first-last-frame "
                f"models: {', '.join(n for n, p in PRESETS.items() if p.task == 'flf2v')}",
            ))  # fmt: skip
    if request.seed is not None and "num_seeds" not in bad:
        count = request.num_seeds or defaults.num_seeds
        if request.seed + count - 1 > MAX_SEED:
            found.append(
                (
                    _given("seed", data),
                    f"seed {request.seed} with {count} seeds runs past the largest seed {MAX_SEED}",
                )
            )
    return found


def _fill(request: GenerationRequest, line: int, defaults: RunDefaults) -> ResolvedRequest:
    model = request.model or defaults.model
    preset = PRESETS[model]
    s = preset.sampling

    def pick(name: str, preset_value: Any) -> Any:
        row_value = getattr(request, name)
        if row_value is not None:
            return row_value
        run_value = getattr(defaults, name)
        return run_value if run_value is not None else preset_value

    count = request.num_seeds or defaults.num_seeds
    first = request.seed if request.seed is not None else derive_seed(request.item_id, defaults.base_seed)
    size = pick("size", None)
    resolved_size = _parse_size(size) if size is not None else tuple(s.size)
    return ResolvedRequest(
        line=line,
        item_id=request.item_id,
        model=model,
        task=preset.task,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or defaults.negative_prompt or s.negative_prompt,
        image=request.image,
        last_image=request.last_image,
        seeds=tuple(range(first, first + count)),
        size=resolved_size,
        frame_num=pick("frame_num", s.frame_num),
        steps=pick("steps", s.steps),
        shift=float(pick("shift", default_shift(preset, resolved_size))),
        guide_scale=float(pick("guide_scale", s.guide_scale)),
        solver=pick("solver", s.solver),
    )


# --------------------------------------------------------------------------- reading rows


class _JsonDuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JsonDuplicateKey(key)
            seen.add(key)
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _parse_json_line(data: bytes, line: int) -> dict[str, Any] | RowProblem:
    """One JSON Lines row: the object, or a RowProblem saying why it is not one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raw = _clean(data[: MAX_RAW_CHARS * 2].decode("utf-8", "backslashreplace"))[:MAX_RAW_CHARS]
        return RowProblem(line, None, f"not valid UTF-8 (byte {exc.start + 1} of the line)", None, raw)
    raw = _clean(text[:MAX_RAW_CHARS])
    try:
        value = _DECODER.decode(text)
    except _JsonDuplicateKey as exc:
        return RowProblem(line, _clean(exc.key), "field given twice in the same object", None, raw)
    except json.JSONDecodeError as exc:
        hint = " (the line starts with a byte-order mark, U+FEFF)" if text.startswith("\ufeff") else ""
        return RowProblem(line, None, f"not valid JSON: {exc.msg} at column {exc.colno}{hint}", None, raw)
    except RecursionError:
        return RowProblem(line, None, "not a usable JSON object: nested too deeply", None, raw)
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        return RowProblem(line, None, f"not valid JSON: {_short(str(exc))}", None, raw)
    if not isinstance(value, dict):
        kind = "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)
        return RowProblem(line, None, f"expected a JSON object {{...}}, got {kind}", None, raw)
    return value


def _numbered(lines: Iterable[bytes], first_line: int, at_start: bool) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) for each physical line; a UTF-8 byte-order mark at the file start is dropped."""
    for number, data in enumerate(lines, first_line):
        if at_start and number == first_line and data.startswith(_BOM):
            data = data[len(_BOM) :]
        yield number, data


def _jsonl_rows(lines: Iterable[bytes], first_line: int, at_start: bool) -> Iterator[tuple[int, Any]]:
    for number, data in _numbered(lines, first_line, at_start):
        data = data.strip()
        if data:
            yield number, _parse_json_line(data, number)


class _Line(NamedTuple):
    """One physical line of a CSV manifest, decoded."""

    number: int
    text: str  # invalid UTF-8 written as \\xNN escapes
    bad_byte: int = 0  # 1-based byte of the first invalid UTF-8 sequence, 0 if the line is valid UTF-8


class _CsvError(NamedTuple):
    """A CSV record that cannot be read: why, and which cell (0-based; None: the record as a whole)."""

    reason: str
    cell: int | None = None
    raw: str | None = None


_CSV_STOP = re.compile(r"[,\r\n]")


def _csv_line_state(text: str, quoted: bool, cell: int) -> tuple[bool, int, int]:
    """Where one physical line leaves a CSV record, read as the csv module reads its default dialect (','
    between cells, '"' opening a quoted cell only as the cell's first character, '""' a quote inside one,
    a quoted cell going on unquoted after its closing quote, '\\r' or '\\n' outside quotes ending the record).

    `quoted`: whether the line starts inside a quoted cell, `cell` the index of the cell it starts in.
    Returns (whether the line ends inside a quoted cell, the index just past the quote that opened that cell
    if it opened on this line else -1, the index of the cell the line ends in).
    """
    if not quoted and '"' not in text:
        return False, -1, cell
    index, opened, at_start = 0, -1, not quoted
    while True:
        if quoted:
            close = text.find('"', index)
            if close < 0:
                return True, opened, cell
            if text.startswith('"', close + 1):  # a doubled quote: a quote inside the cell
                index = close + 2
                continue
            quoted, opened, index, at_start = False, -1, close + 1, False
        elif at_start and text.startswith('"', index):
            quoted, opened, index = True, index + 1, index + 1
            continue
        stop = _CSV_STOP.search(text, index)
        if stop is None or stop.group() != ",":
            return False, -1, cell
        cell, index, at_start = cell + 1, stop.end(), True


def _csv_cell_sizes(text: str) -> list[int]:
    """The length of each cell of one CSV record as written (quotes included), read as `_csv_line_state`
    reads it; only for naming the cell of a record the csv module refused."""
    sizes, index, end = [], 0, len(text)
    while True:
        start = index
        if text.startswith('"', index):
            index += 1
            while True:
                close = text.find('"', index)
                if close < 0:
                    index = end
                    break
                index = close + (2 if text.startswith('"', close + 1) else 1)
                if index == close + 1:
                    break
        stop = _CSV_STOP.search(text, index)
        sizes.append((end if stop is None else stop.start()) - start)
        if stop is None or stop.group() != ",":
            return sizes
        index = stop.end()


def _decoded_lines(lines: Iterable[bytes], first_line: int, at_start: bool) -> Iterator[_Line]:
    for number, data in _numbered(lines, first_line, at_start):
        try:
            yield _Line(number, data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield _Line(number, data.decode("utf-8", "backslashreplace"), exc.start + 1)


class _Feed:
    """The lines a csv.reader reads, given one record at a time (an iterator that may run dry and go on)."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque()

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        if self.lines:
            return self.lines.popleft()
        raise StopIteration


def _csv_records(
    lines: Iterable[bytes], first_line: int, at_start: bool
) -> Iterator[tuple[int, list[str] | _CsvError]]:
    """(start line, cells) per CSV record, or (start line, _CsvError) for a record that cannot be read.

    Records are delimited here (see `_csv_line_state`) and each is parsed on its own by the csv module, so
    a bad record never takes the next ones with it. A quoted cell whose closing quote is missing, at the
    end of the input or once it holds more than the csv module's field size limit (the most one cell may
    hold), is reported on the record's line as unterminated, and reading goes on from the line after the
    one the quote opened on: memory stays bounded by that limit, and the rows that quote swallowed are
    still read and checked.
    """
    limit = csv.field_size_limit()
    source = _decoded_lines(lines, first_line, at_start)
    pushed: list[_Line] = []  # lines to read again, the next one last
    feed = _Feed()
    reader = csv.reader(feed)

    def take() -> _Line | None:
        return pushed.pop() if pushed else next(source, None)

    while (first := take()) is not None:
        record = [first]
        quoted, opened, cell = _csv_line_state(first.text, False, 0)
        open_line, open_cell, open_chars = first.number, cell, len(first.text) - opened
        while quoted and open_chars <= limit:
            line = take()
            if line is None:
                break
            record.append(line)
            quoted, opened, cell = _csv_line_state(line.text, True, cell)
            if opened >= 0:
                open_line, open_cell, open_chars = line.number, cell, len(line.text) - opened
            else:
                open_chars += len(line.text)
        if quoted:
            reason = (  # the same words either way: a partition of split_manifest ends at its block's end
                f"unterminated quoted field starting on line {open_line}: no closing quote before the end of "
                f"the file or within {limit} characters (the most one CSV cell may hold)"
            )
            pushed.extend(reversed([line for line in record if line.number > open_line]))
            yield first.number, _CsvError(reason, open_cell, _csv_raw(first))
            continue
        if first.bad_byte or (len(record) > 1 and any(line.bad_byte for line in record)):
            bad = next(line for line in record if line.bad_byte)
            where = "the line" if len(record) == 1 else f"line {bad.number}"
            reason = f"not valid UTF-8 (byte {bad.bad_byte} of {where})"
            yield first.number, _CsvError(reason, None, _csv_raw(first))
            continue
        feed.lines.extend(line.text for line in record)
        try:
            cells: list[str] | _CsvError = next(reader)
        except csv.Error as exc:
            cells = _csv_error(exc, record, limit)
        except StopIteration:  # cannot happen: a line is never empty
            cells = []
        if feed.lines:  # cannot happen if _csv_line_state reads as the csv module does
            feed.lines.clear()
            cells = _CsvError("not valid CSV: the record ends before its last line", None, _csv_raw(first))
        yield first.number, cells


def _csv_raw(line: _Line) -> str:
    return line.text[: MAX_RAW_CHARS + 2].rstrip("\r\n")


def _csv_error(exc: csv.Error, record: list[_Line], limit: int) -> _CsvError:
    """The csv module's error for one record, said for a person (naming the cell where it can)."""
    raw = _csv_raw(record[0])
    if "field larger than field limit" in str(exc):
        sizes = _csv_cell_sizes("".join(line.text for line in record))
        cell = max(range(len(sizes)), key=sizes.__getitem__)
        reason = f"a cell of {sizes[cell]} characters; one CSV cell may hold at most {limit} characters"
        return _CsvError(reason, cell, raw)
    if "new-line character seen in unquoted field" in str(exc):
        reason = "not valid CSV: a carriage return (\\r) inside an unquoted cell (quote the cell)"
        return _CsvError(reason, None, raw)
    return _CsvError(f"not valid CSV: {exc}", None, raw)


def _csv_header(cells: list[str], line: int) -> list[str]:
    """Column names of a CSV header row; ManifestError-worthy problems raised as a RowProblem list."""
    names = [c.strip() for c in cells]
    for index, name in enumerate(names):
        if name and name in names[:index]:
            raise _HeaderError(RowProblem(line, _clean(name), "column named twice in the header"))
    if not any(n in _CANONICAL for n in names):
        reason = (
            f"the first row must be a header naming the columns (expected some of: {_ACCEPTED}), "
            f"got {_short(cells)}"
        )
        raise _HeaderError(RowProblem(line, None, reason))
    return names


class _HeaderError(Exception):
    def __init__(self, problem: RowProblem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


def _csv_rows(
    records: Iterable[tuple[int, list[str] | _CsvError]], header: list[str] | None, skip_through: int = 0
) -> Iterator[tuple[int, Any]]:
    """Rows of a CSV as dicts (empty cells left out), the header taken from the first record if not given.

    Records starting at or before `skip_through` are skipped (the header when a block starts the file).
    """
    for line, cells in records:
        if line <= skip_through:
            continue
        if isinstance(cells, _CsvError):
            if header is None:
                raise _HeaderError(RowProblem(line, None, f"cannot read the header: {cells.reason}"))
            field, reason = None, cells.reason
            if cells.cell is not None:
                if cells.cell < len(header) and header[cells.cell]:
                    field = header[cells.cell]
                else:
                    reason += f" (cell {cells.cell + 1}, past the {len(header)} named columns of the header)"
            yield line, RowProblem(line, field, reason, None, cells.raw)
            continue
        if not any(c.strip() for c in cells):
            continue  # a blank line, or a row of empty cells (",,,")
        if header is None:
            header = _csv_header(cells, line)
            continue
        if len(cells) != len(header):
            out = io.StringIO()
            csv.writer(out, lineterminator="").writerow(cells)
            reason = f"expected {len(header)} cells (one per header column), found {len(cells)}"
            item_id = _raw_item_id(dict(zip(header, cells, strict=False)))
            yield line, RowProblem(line, None, reason, item_id, _clean(out.getvalue()[:MAX_RAW_CHARS]))
            continue
        yield line, {name: cell for name, cell in zip(header, cells, strict=True) if cell.strip()}
    if header is None:
        raise _HeaderError(RowProblem(0, None, "the manifest is empty: no header and no rows"))


def _batch_dicts(batch: Any) -> list[dict[str, Any]]:
    """A pyarrow RecordBatch as dicts; values pyarrow cannot convert become `_Unreadable` markers."""
    try:
        return batch.to_pylist()
    except Exception:
        columns = []
        for column in batch.columns:
            try:
                columns.append(column.to_pylist())
            except Exception:
                values: list[Any] = []
                for index in range(len(column)):
                    try:
                        values.append(column[index].as_py())
                    except Exception as exc:
                        values.append(_Unreadable(f"{type(exc).__name__}: {_short(str(exc))}"))
                columns.append(values)
        names = batch.schema.names
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def _parquet_file(f: Any) -> Any:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    for index, name in enumerate(names):
        if name in names[:index]:
            raise _HeaderError(RowProblem(0, name, "column appears twice in the Parquet schema"))
    if not names:
        raise _HeaderError(RowProblem(0, None, "the Parquet file has no columns"))
    return pf


def _parquet_rows(pf: Any, row_groups: list[int] | None, first_row: int) -> Iterator[tuple[int, Any]]:
    number = first_row
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=row_groups, use_threads=False):
        for fields in _batch_dicts(batch):
            yield number, fields
            number += 1


class _HashingReader(io.RawIOBase):
    """Reads a file object through, feeding every byte read to a hash (for the file's sha256 in one pass)."""

    def __init__(self, f: Any, hasher: Any | None) -> None:
        self._f = f
        self._hasher = hasher

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        if self._hasher is not None:
            self._hasher.update(data)
        return len(data)


def _file_error(url: str, exc: BaseException) -> ManifestError:
    if isinstance(exc, FileNotFoundError):
        reason = "file not found"
    elif isinstance(exc, IsADirectoryError):
        reason = "is a directory, expected a manifest file"
    elif isinstance(exc, PermissionError):
        reason = f"cannot read the file: permission denied ({exc})"
    else:
        reason = f"cannot read the file: {type(exc).__name__}: {_short(str(exc))}"
    return ManifestError(url, [RowProblem(0, None, reason)])


def iter_rows(
    url: str, storage_options: dict | None = None
) -> Iterator[tuple[int, dict[str, Any] | RowProblem]]:
    """Stream a manifest's data rows as (line, fields) or (line, RowProblem) for rows that do not parse.

    Bounded memory (one line / one Parquet batch at a time). Raises ManifestError for the file as a whole
    (unknown extension, missing or unreadable file, bad CSV header, no rows), lazily, while iterating.
    """
    return _iter_rows(url, storage_options, None)


def _iter_rows(url: str, storage_options: dict | None, hasher: Any | None) -> Iterator[tuple[int, Any]]:
    fmt = manifest_format(url)
    _, compression = _name_parts(url)
    rows = 0
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        with fs.open(path, "rb") as raw:
            if fmt == "parquet":
                items: Iterator[tuple[int, Any]] = _parquet_rows(_parquet_file(raw), None, 1)
            else:
                tap = _HashingReader(raw, hasher)
                stream: Any = io.BufferedReader(tap, _READ_CHUNK)
                if compression:
                    stream = fsspec.compression.compr[compression](stream, mode="rb")
                if fmt == "jsonl":
                    items = _jsonl_rows(stream, 1, True)
                else:
                    items = _csv_rows(_csv_records(stream, 1, True), None)
            for item in items:
                rows += 1
                yield item
            if fmt != "parquet":
                while tap.read(_READ_CHUNK):  # hash anything the decompressor left unread
                    pass
    except _HeaderError as exc:
        raise ManifestError(url, [exc.problem]) from None
    except Exception as exc:
        raise _file_error(url, exc) from exc
    if rows == 0:
        raise ManifestError(url, [RowProblem(0, None, "the manifest is empty: no data rows")])


def manifest_sha256(url: str, storage_options: dict | None = None) -> str:
    """sha256 of the manifest file's bytes as stored (one streaming pass; ManifestError if unreadable)."""
    return _sha256_file(url, storage_options)


def _sha256_file(url: str, storage_options: dict | None) -> str:
    hasher = hashlib.sha256()
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            while chunk := f.read(_READ_CHUNK):
                hasher.update(chunk)
    except Exception as exc:
        raise _file_error(url, exc) from exc
    return hasher.hexdigest()


# --------------------------------------------------------------------------- whole manifests


def _resolve_item(
    item: Any, line: int, defaults: RunDefaults
) -> tuple[ResolvedRequest | None, list[RowProblem]]:
    """A row from `iter_rows` resolved: (request, []) or (None, its problems)."""
    if isinstance(item, RowProblem):
        return None, [item]
    result = resolve(item, line, defaults)
    return (result, []) if isinstance(result, ResolvedRequest) else (None, list(result))


def _item_key(item: Any) -> str | None:
    """The id a row is checked for duplicates under (as written, stripped)."""
    return item.item_id if isinstance(item, RowProblem) else _raw_item_id(item)


def _duplicate(line: int, item_id: str, first: int, unit: str) -> RowProblem:
    return RowProblem(
        line, "item_id", f"duplicate item_id {item_id!r}: already used on {unit} {first}", item_id
    )


def load_manifest(
    url: str, defaults: RunDefaults | None = None, storage_options: dict | None = None
) -> Manifest:
    """Read a manifest (streaming) and resolve every row; bad rows are listed in `problems`, not raised.

    Raises ManifestError only for the file as a whole (see `iter_rows`).
    """
    defaults = defaults or RunDefaults()
    fmt = manifest_format(url)
    unit = _unit(url)
    hasher = hashlib.sha256()
    requests: list[ResolvedRequest] = []
    problems: list[RowProblem] = []
    first_seen: dict[str, int] = {}
    rows = 0
    for line, item in _iter_rows(url, storage_options, hasher if fmt != "parquet" else None):
        rows += 1
        resolved, found = _resolve_item(item, line, defaults)
        item_id = _item_key(item)  # any row's id counts, valid or not, as in split_manifest
        if item_id is not None:
            first = first_seen.setdefault(item_id, line)
            if first != line:
                found.append(_duplicate(line, item_id, first, unit))
        if found:
            problems.extend(found)
        elif resolved is not None:
            requests.append(resolved)
    sha256 = _sha256_file(url, storage_options) if fmt == "parquet" else hasher.hexdigest()
    return Manifest(url=url, format=fmt, sha256=sha256, rows=rows, requests=requests, problems=problems)


def validate_manifest(
    url: str, defaults: RunDefaults | None = None, storage_options: dict | None = None
) -> Manifest:
    """`load_manifest`, raising ManifestError with every problem if any row is bad."""
    manifest = load_manifest(url, defaults, storage_options)
    if manifest.problems:
        raise ManifestError(url, manifest.problems, manifest.rows)
    return manifest


# --------------------------------------------------------------------------- large manifests (dask)


@dataclasses.dataclass
class _PartResult:
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    jobs: int = 0
    groups: Counter = dataclasses.field(default_factory=Counter)
    problems: list[RowProblem] = dataclasses.field(default_factory=list)
    shards: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one partition's rows come from: a byte range of a text manifest (cut at newlines the way
    `fsspec.utils.read_block` does), a whole compressed text manifest (`length` None: streamed), or
    consecutive row groups of a Parquet file. Each task reads its own part, so a partition's bytes exist
    only inside the task that handles it."""

    url: str
    fmt: str
    storage_options: dict
    compression: str | None = None
    offset: int = 0
    length: int | None = None
    header: list[str] | None = None  # CSV column names
    header_line: int = 0  # the CSV header's line (skipped in the partition that starts the file)
    row_groups: tuple[int, ...] = ()
    first_row: int = 1


def _read_block(source: _Source) -> bytes:
    fs, path = fsspec.core.url_to_fs(source.url, **source.storage_options)
    with fs.open(path, "rb") as f:
        return fsspec.utils.read_block(f, source.offset, source.length, delimiter=b"\n")


def _text_rows(source: _Source, lines: Iterable[bytes], first_line: int) -> Iterator[tuple[int, Any]]:
    at_start = source.offset == 0
    if source.fmt == "jsonl":
        return _jsonl_rows(lines, first_line, at_start)
    skip = source.header_line if at_start else 0
    return _csv_rows(_csv_records(lines, first_line, at_start), source.header, skip)


def _partition_rows(source: _Source, first_line: int) -> Iterator[tuple[int, Any]]:
    """The rows of one partition, numbered from `first_line` (the partition's first line or row)."""
    if source.fmt == "parquet":
        fs, path = fsspec.core.url_to_fs(source.url, **source.storage_options)
        with fs.open(path, "rb") as f:
            yield from _parquet_rows(_parquet_file(f), list(source.row_groups), source.first_row)
    elif source.length is None:
        with fsspec.open(source.url, "rb", compression=source.compression, **source.storage_options) as f:
            yield from _text_rows(source, f, first_line)
    else:
        yield from _text_rows(source, io.BytesIO(_read_block(source)), first_line)


def _scan_partition(source: _Source) -> tuple[int, Any, Any]:
    """First pass: the partition's line count (rows for Parquet) and (digest, line within the partition)
    of every row's item id."""
    import numpy as np

    digests: list[int] = []
    lines: list[int] = []
    if source.fmt == "parquet":
        import pyarrow.parquet as pq

        fs, path = fsspec.core.url_to_fs(source.url, **source.storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            id_columns = [n for n in _NAMES["item_id"] if n in pf.schema_arrow.names]
            count = sum(pf.metadata.row_group(i).num_rows for i in source.row_groups)
            batches = pf.iter_batches(
                batch_size=_PARQUET_BATCH, row_groups=list(source.row_groups), columns=id_columns
            )
            number = 1
            for batch in batches if id_columns else ():
                for fields in _batch_dicts(batch):
                    item_id = _raw_item_id(fields)
                    if item_id is not None:
                        digests.append(_digest(item_id))
                        lines.append(number)
                    number += 1
    else:
        if source.length is None:  # streamed: the only partition, its line count is not needed
            count, rows = 0, _partition_rows(source, 1)
        else:
            block = _read_block(source)
            count = block.count(b"\n") + (1 if block and not block.endswith(b"\n") else 0)
            rows = _text_rows(source, io.BytesIO(block), 1)
        for number, item in rows:
            item_id = _item_key(item)
            if item_id is not None:
                digests.append(_digest(item_id))
                lines.append(number)
    return count, np.array(digests, dtype=np.uint64), np.array(lines, dtype=np.int64)


def _split_partition(
    source: _Source,
    index: int,
    first_line: int,
    defaults: RunDefaults,
    duplicates: dict[int, int],
    out_url: str,
    rows_per_shard: int,
    max_problems: int,
) -> _PartResult:
    """Second pass: validate a partition's rows and write the valid ones to its shards, group by group."""
    fs, root = fsspec.core.url_to_fs(out_url, **source.storage_options)
    unit = "row" if source.fmt == "parquet" else "line"
    result = _PartResult()
    buffers: dict[tuple[str, tuple[int, int], int], list[bytes]] = {}
    written: Counter = Counter()

    def flush(group: tuple[str, tuple[int, int], int]) -> None:
        slug = _group_key(group).replace("/", "_")
        name = f"part-{index:05d}-{slug}-{written[group]:04d}.jsonl"
        fs.pipe_file(f"{root}/{name}", b"".join(buffers.pop(group)))
        written[group] += 1
        result.shards.append(join_url(out_url, name))

    for line, item in _partition_rows(source, first_line):
        result.rows += 1
        resolved, found = _resolve_item(item, line, defaults)
        item_id = _item_key(item) if duplicates else None
        if item_id is not None:
            first = duplicates.get(_digest(item_id))
            if first is not None and first != line:
                found.append(_duplicate(line, item_id, first, unit))
        if found or resolved is None:
            result.invalid += 1
            result.problems.extend(found[: max(0, max_problems - len(result.problems))])
            continue
        result.valid += 1
        result.jobs += len(resolved.seeds)
        group = resolved.group()
        result.groups[_group_key(group)] += len(resolved.seeds)
        record = json.dumps(resolved.to_record(), ensure_ascii=False, separators=(",", ":"))
        buffer = buffers.setdefault(group, [])
        buffer.append(record.encode("utf-8") + b"\n")
        if len(buffer) >= rows_per_shard:
            flush(group)
    for group in list(buffers):
        flush(group)
    return result


def _plan_text(url: str, fmt: str, compression: str | None, blocksize: int, options: dict) -> list[_Source]:
    """Byte ranges of `blocksize` (one streamed partition for a compressed file); CSV header read here."""
    header, header_line = None, 0
    if fmt == "csv":
        with fsspec.open(url, "rb", compression=compression, **options) as f:
            for line, cells in _csv_records(f, 1, True):
                if isinstance(cells, _CsvError):
                    raise _HeaderError(RowProblem(line, None, f"cannot read the header: {cells.reason}"))
                if any(c.strip() for c in cells):
                    header, header_line = _csv_header(cells, line), line
                    break
        if header is None:
            raise _HeaderError(RowProblem(0, None, "the manifest is empty: no header and no rows"))
    base = _Source(url, fmt, options, compression, header=header, header_line=header_line)
    if compression:  # a compressed stream cannot be cut at byte offsets
        return [base]
    fs, path = fsspec.core.url_to_fs(url, **options)
    size = fs.size(path)
    return [
        dataclasses.replace(base, offset=o, length=min(blocksize, size - o))
        for o in range(0, size, blocksize)
    ]


def _plan_parquet(url: str, blocksize: int, options: dict) -> list[_Source]:
    """Partitions of consecutive row groups of about `blocksize` bytes (uncompressed) each."""
    fs, path = fsspec.core.url_to_fs(url, **options)
    with fs.open(path, "rb") as f:
        meta = _parquet_file(f).metadata
    sources, groups, size, first, row = [], [], 0, 1, 1
    for index in range(meta.num_row_groups):
        group = meta.row_group(index)
        groups.append(index)
        size += group.total_byte_size
        row += group.num_rows
        if size >= blocksize or index == meta.num_row_groups - 1:
            sources.append(_Source(url, "parquet", options, row_groups=tuple(groups), first_row=first))
            groups, size, first = [], 0, row
    return sources


def _find_duplicates(scans: list[tuple[int, Any, Any]], offsets: list[int]) -> dict[int, int]:
    """Digest -> first line, for every item-id digest seen on more than one row."""
    import numpy as np

    if sum(len(s[1]) for s in scans) < 2:
        return {}
    digests = np.concatenate([s[1] for s in scans])
    lines = np.concatenate([s[2] + (offset - 1) for s, offset in zip(scans, offsets, strict=True)])
    order = np.lexsort((lines, digests))
    digests, lines = digests[order], lines[order]
    repeated = digests[1:] == digests[:-1]
    if not repeated.any():
        return {}
    starts = np.flatnonzero(np.concatenate(([True], ~repeated)))  # first row of each run of one digest
    counts = np.diff(np.concatenate((starts, [len(digests)])))
    firsts = starts[counts > 1]
    return {int(d): int(n) for d, n in zip(digests[firsts], lines[firsts], strict=True)}


def split_manifest(
    url: str,
    out_url: str,
    defaults: RunDefaults | None = None,
    *,
    rows_per_shard: int = 1000,
    blocksize: str | int = "16MiB",
    storage_options: dict | None = None,
    max_problems: int = 1000,
    scheduler: str = "threads",
    overwrite: bool = False,
) -> SplitResult:
    """Validate a large manifest in dask partitions and write its valid rows to shard manifests.

    Partitions: `blocksize` byte ranges of a text manifest, cut at newlines (as dask's read_text and
    read_csv cut them); consecutive Parquet row groups of up to `blocksize` uncompressed bytes (a row
    group is never split); a compressed text manifest is one partition, streamed. Each partition is a
    dask task that reads its own part and writes its valid rows straight to
    `out_url/part-<partition:05d>-<model>_<W>x<H>_<F>f-<k:04d>.jsonl`, one group per file and at most
    `rows_per_shard` rows, so no process holds the whole manifest: memory is about blocksize plus
    rows_per_shard rows per group per running task.

    Two passes: the first counts each block's lines (exact line numbers for the second) and takes a
    64-bit blake2b digest of every row's item id; the driver finds the digests seen more than once
    (16 bytes per row, the only per-row state it holds) and the second pass validates, reports every
    row that repeats an earlier row's id, and writes. (Two different ids sharing a 64-bit digest would be
    reported as duplicates: odds about n²/2⁶⁵, 3e-6 for ten million rows.)

    Blocked CSV needs one record per line, as dask's own read_csv does: a quoted newline that falls on a
    block boundary breaks the records on both sides (a compressed CSV, one partition, has no such
    limit). Raises FileExistsError if `out_url` already holds shards (unless `overwrite`, which removes
    them first) and ManifestError for the file as a whole; bad rows are returned, not raised.
    `scheduler` is any dask scheduler name ("threads", "processes", "synchronous").
    """
    import dask
    from dask.utils import parse_bytes

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    defaults = defaults or RunDefaults()
    options = dict(storage_options or {})
    fmt = manifest_format(url)
    _, compression = _name_parts(url)
    size = max(1, parse_bytes(blocksize) if isinstance(blocksize, str) else int(blocksize))

    try:
        in_fs, in_path = fsspec.core.url_to_fs(url, **options)
        if in_fs.isdir(in_path):
            raise IsADirectoryError(in_path)
        in_fs.info(in_path)  # FileNotFoundError -> "file not found"
        if fmt == "parquet":
            sources = _plan_parquet(url, size, options)
        else:
            sources = _plan_text(url, fmt, compression, size, options)
    except _HeaderError as exc:
        raise ManifestError(url, [exc.problem]) from None
    except Exception as exc:
        raise _file_error(url, exc) from exc

    fs, root = fsspec.core.url_to_fs(out_url, **options)
    existing = fs.glob(f"{root}/part-*.jsonl") if fs.exists(root) else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{redact(out_url)} already holds {len(existing)} shard(s); give an empty location"
        )
    for path in existing:
        fs.rm(path)
    fs.makedirs(root, exist_ok=True)

    try:
        scans = dask.compute(*[dask.delayed(_scan_partition)(s) for s in sources], scheduler=scheduler)
    except Exception as exc:
        raise _file_error(url, exc) from exc
    if fmt == "parquet":
        offsets = [s.first_row for s in sources]
    else:
        counts = [s[0] for s in scans]
        offsets = [1 + sum(counts[:i]) for i in range(len(counts))]
    duplicates = _find_duplicates(list(scans), offsets)
    del scans

    tasks = [
        dask.delayed(_split_partition)(
            s, i, offsets[i], defaults, duplicates, out_url, rows_per_shard, max_problems
        )
        for i, s in enumerate(sources)
    ]
    parts: tuple[_PartResult, ...] = dask.compute(*tasks, scheduler=scheduler)

    rows = sum(p.rows for p in parts)
    if rows == 0:
        raise ManifestError(url, [RowProblem(0, None, "the manifest is empty: no data rows")])
    groups: Counter = Counter()
    for p in parts:
        groups.update(p.groups)
    return SplitResult(
        shards=sorted(shard for p in parts for shard in p.shards),
        rows=rows,
        valid=sum(p.valid for p in parts),
        jobs=sum(p.jobs for p in parts),
        problems=[problem for p in parts for problem in p.problems][:max_problems],
        invalid=sum(p.invalid for p in parts),
        groups=dict(sorted(groups.items())),
        partitions=len(sources),
    )


def read_shard(url: str, storage_options: dict | None = None) -> Iterator[ResolvedRequest]:
    """The rows of a shard manifest written by `split_manifest` (ManifestError naming the line if damaged)."""
    try:
        with fsspec.open(url, "rb", compression="infer", **(storage_options or {})) as f:
            for number, data in enumerate(f, 1):
                if not data.strip():
                    continue
                try:
                    yield ResolvedRequest.from_record(json.loads(data))
                except Exception as exc:
                    reason = (
                        f"not a shard row written by split_manifest: {type(exc).__name__}: {_short(str(exc))}"
                    )
                    raise ManifestError(url, [RowProblem(number, None, reason)]) from None
    except ManifestError:
        raise
    except Exception as exc:
        raise _file_error(url, exc) from exc
