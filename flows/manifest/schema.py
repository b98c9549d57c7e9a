"""The manifest schema: what a row and the run may hold, and how problems are reported.

Owns the limits and constants (MAX_*, the formats and their file extensions), the file-name -> format
mapping (`manifest_format`), the character rules of text fields, the request models (`GenerationRequest`,
`RunDefaults`, `ResolvedRequest`), the problem types (`RowProblem`, `ManifestError`) and the small text
helpers every step uses to describe a row (`_short`, `_clean`, `_raw_text`, `_raw_item_id`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import reprlib
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

import fsspec
import fsspec.utils
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from storage.layout import MAX_ID_LENGTH, safe_name
from storage.urls import redact
from wan.configs import PRESETS, parse_size
from wan.fast_modes import CacheSetting, get_recipe, parse_lora_ref

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
MAX_LORAS = 16  # LoRA files stacked on one row
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


def _check_cache(value: Any) -> str | None:
    """A step-cache setting ('KIND[:THRESHOLD]' or {"kind", "threshold"}) as 'kind:threshold', or 'off'."""
    if value is None:
        return None
    if isinstance(value, str):
        _check_chars(value, "cache", "cache settings")
    setting = CacheSetting.parse(value)
    return "off" if setting is None else str(setting)


def _check_recipe(value: str | None) -> str | None:
    if value is None:
        return None
    _check_chars(value, "recipe", "recipe names")
    return get_recipe(value).name


def _lora_refs(value: Any) -> Any:
    """A row's `loras` as a list of {"uri", "strength"}: a list of 'URI[:STRENGTH]' strings or mappings, or
    one string (a JSON list, or entries separated by ';': CSV cells)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"not a JSON list ({error.msg} at character {error.pos + 1})") from None
        else:
            value = [part for part in text.split(";") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError(
            "expected a list of LoRAs: [{\"uri\": path or URL, \"strength\": number}] or 'URI[:STRENGTH];...'"
        )
    refs = []
    for n, entry in enumerate(value, 1):
        try:
            ref = parse_lora_ref(entry)
        except ValueError as error:
            raise ValueError(f"LoRA {n}: {error}") from None
        _check_chars(ref.uri, f"LoRA {n} uri", "LoRA URIs")
        if len(ref.uri) > MAX_URI_CHARS:
            raise ValueError(f"LoRA {n}: uri longer than {MAX_URI_CHARS} characters")
        refs.append({"uri": ref.uri, "strength": ref.strength})
    if len(refs) > MAX_LORAS:
        raise ValueError(f"{len(refs)} LoRAs: at most {MAX_LORAS} can be stacked on one row")
    return refs


class LoraEntry(BaseModel):
    """One LoRA of a row or of the run: a file (path or fsspec URL, resolved like images) and its strength."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    strength: float = 1.0


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
    """The checks of the fields a row and the run defaults share: model, size, solver, the fast modes."""

    @field_validator("loras", mode="before", check_fields=False)
    @classmethod
    def _loras(cls, value: Any) -> Any:
        return None if value is None else _lora_refs(value)

    @field_validator("cache", mode="before", check_fields=False)
    @classmethod
    def _cache(cls, value: Any) -> str | None:
        return _check_cache(value)

    @field_validator("recipe", check_fields=False)
    @classmethod
    def _recipe(cls, value: str | None) -> str | None:
        return _check_recipe(value)

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
    loras: tuple[LoraEntry, ...] | None = None
    cache: str | None = None
    recipe: str | None = None

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
    loras: tuple[LoraEntry, ...] = ()
    cache: str | None = None
    recipe: str | None = None
    # Keep each video's final latents beside it (True), or instead of it ("only": no VAE decode but the
    # first frame's, for the thumbnail); a job parameter when on.
    save_latents: bool | Literal["only"] = False

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
    loras: tuple[tuple[str, float], ...] = ()  # (uri as written, strength) in stacking order
    cache: str | None = None  # 'kind:threshold' (`wan.fast_modes.CacheSetting`); None: no step cache
    save_latents: bool | Literal["only"] = False  # the run keeps the final latents beside the video / only

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
        # The fast modes join a job's parameters only when used: jobs of runs without them keep their keys.
        if self.loras:
            out["loras"] = [{"uri": uri, "strength": strength} for uri, strength in self.loras]
        if self.cache is not None:
            out["cache"] = CacheSetting.parse(self.cache).describe()  # type: ignore[union-attr]
        if self.save_latents:  # a job that kept its latents is not the job that did not
            out["save_latents"] = self.save_latents
        return out

    def group(self) -> tuple[str, tuple[int, int], int]:
        """(model, size, frame_num): jobs of one group can share a shard (one loaded pipeline)."""
        return self.model, self.size, self.frame_num

    def to_record(self) -> dict[str, Any]:
        """Every field, JSON-ready (seeds a list, size 'W*H'): one row of a shard manifest."""
        record = {f.name: getattr(self, f.name) for f in _RESOLVED_FIELDS}  # asdict() is slow: it deep-copies
        record["seeds"] = list(self.seeds)
        record["size"] = f"{self.size[0]}*{self.size[1]}"
        record["loras"] = [list(entry) for entry in self.loras]
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
            loras=tuple((str(uri), float(strength)) for uri, strength in record["loras"]),
            cache=None if record["cache"] is None else str(record["cache"]),
            save_latents="only" if record["save_latents"] == "only" else bool(record["save_latents"]),
        )


_RESOLVED_FIELDS = dataclasses.fields(ResolvedRequest)


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


# --------------------------------------------------------------------------- row values


class _Unreadable:
    """A Parquet value pyarrow could not turn into Python (reported as a problem on its column)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<unreadable: {self.reason}>"
