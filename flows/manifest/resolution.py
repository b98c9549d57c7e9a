"""Resolving one row: validation against the model preset, defaults filled in, seeds derived.

Owns `resolve` (a row's fields -> `ResolvedRequest` or its `RowProblem`s, never raising), the checks only
the preset can make (size, frames, steps, image vs task), the row > `RunDefaults` > preset fallback and
`derive_seed`. Sizes are parsed by `schema._parse_size` (cached, shared with the size validator).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from flows.manifest.schema import (
    _ACCEPTED,
    _CANONICAL,
    _MULTI,
    _NAMES,
    _SURROGATE,
    MAX_SEED,
    GenerationRequest,
    ResolvedRequest,
    RowProblem,
    RunDefaults,
    _char_label,
    _forbidden_char,
    _parse_size,
    _raw_item_id,
    _raw_text,
    _short,
    _Unreadable,
)
from wan.configs import PRESETS, default_shift, validate_request
from wan.fast_modes import get_recipe

_IMAGE_MODELS = ", ".join(name for name, preset in PRESETS.items() if preset.task != "t2v")


def derive_seed(item_id: str, base_seed: int) -> int:
    """The first seed of a row without `seed`: stable across runs and machines (blake2b, 31 bits)."""
    digest = hashlib.blake2b(f"{base_seed}:{item_id}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % 2**31


# --------------------------------------------------------------------------- resolving one row


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

    # A recipe's settings sit between the values given and the preset's: row value > row recipe > run
    # value > run recipe > preset.
    row_recipe = get_recipe(request.recipe).settings() if request.recipe else {}
    run_recipe = get_recipe(defaults.recipe).settings() if defaults.recipe else {}

    def pick(name: str, preset_value: Any) -> Any:
        for value in (getattr(request, name), row_recipe.get(name), getattr(defaults, name, None),
                      run_recipe.get(name)):  # fmt: skip
            if value is not None:
                return value
        return preset_value

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
        loras=tuple((e.uri, e.strength)
                    for e in (defaults.loras if request.loras is None else request.loras)),
        cache=None if (cache := request.cache or defaults.cache) in (None, "off") else cache,
        save_latents=defaults.save_latents,
    )
