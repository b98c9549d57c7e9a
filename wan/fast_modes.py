"""What the fast modes are asked for, as plain values (no torch: manifests and CLIs parse them):

- `CacheSetting`: a step cache and its threshold, written 'KIND[:THRESHOLD]' ('fbcache', 'magcache:0.2');
- `LoraRef`: a LoRA file and its strength, written 'URI[:STRENGTH]';
- `Recipe`: named sampling settings for step- and CFG-distilled LoRAs (`RECIPES`).

The work itself is in `wan.cache` (step caches) and `wan.lora` (LoRA files, merging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CACHE_KINDS", "DEFAULT_THRESHOLDS", "RECIPES", "CacheSetting", "LoraRef", "Recipe", "get_recipe",
    "parse_lora_ref",
]  # fmt: skip

CACHE_KINDS = ("fbcache", "magcache")
_KIND_NAMES = {
    "fbcache": "fbcache", "fbc": "fbcache", "first-block": "fbcache", "first_block": "fbcache",
    "firstblock": "fbcache", "magcache": "magcache", "mag": "magcache",
}  # fmt: skip
_OFF = ("", "off", "none", "false", "0", "no")
# The threshold each kind takes when none is given: diffusers' first-block cache default, and MagCache's
# Wan 2.1 script's default (`wan.cache.MAG_DEFAULTS`).
DEFAULT_THRESHOLDS = {"fbcache": 0.05, "magcache": 0.12}


@dataclass(frozen=True)
class CacheSetting:
    """Which step cache a generation uses and its threshold; None (no setting) means no caching.

    Written 'KIND[:THRESHOLD]' (`parse`): 'fbcache' (first-block cache, default threshold 0.05),
    'magcache' (MagCache with the model's published calibration, default 0.12).
    """

    kind: str
    threshold: float

    def __post_init__(self) -> None:
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache kind {self.kind!r}: expected one of {', '.join(CACHE_KINDS)}")
        if not (isinstance(self.threshold, int | float) and 0 <= self.threshold < float("inf")):
            raise ValueError(f"cache threshold {self.threshold!r}: expected a number >= 0")
        object.__setattr__(self, "threshold", float(self.threshold))

    def __str__(self) -> str:
        return f"{self.kind}:{self.threshold:g}"

    def describe(self) -> dict[str, Any]:
        """{"kind": ..., "threshold": ...}: JSON-ready, for job parameters, sidecars and exports."""
        return {"kind": self.kind, "threshold": self.threshold}

    @classmethod
    def parse(cls, value: object) -> CacheSetting | None:
        """'KIND[:THRESHOLD]', {"kind": ..., "threshold": ...} (threshold optional), a CacheSetting, or
        None / '' / 'off' / 'none' for no caching. ValueError names what was expected."""
        if value is None or isinstance(value, CacheSetting):
            return value
        if isinstance(value, dict):
            kind, threshold = _cache_fields(value)
        elif isinstance(value, str):
            if value.strip().lower() in _OFF:
                return None
            kind, _, text = value.strip().partition(":")
            threshold = _number(text, value) if text else None
        else:
            raise ValueError(f"cache {value!r}: {_CACHE_FORM}")
        name = _KIND_NAMES.get(kind.strip().lower())
        if name is None:
            raise ValueError(f"cache kind {kind!r}: expected one of {', '.join(CACHE_KINDS)} (or off)")
        return cls(name, DEFAULT_THRESHOLDS[name] if threshold is None else threshold)


_CACHE_FORM = "expected KIND[:THRESHOLD], e.g. fbcache:0.05"


def _number(text: str, value: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"cache {value!r}: {_CACHE_FORM}") from None


def _cache_fields(value: dict[Any, Any]) -> tuple[str, Any]:
    """(kind, threshold or None) of a {"kind": ..., "threshold": ...} mapping."""
    unknown = sorted(map(str, set(value) - {"kind", "threshold"}))
    if unknown or "kind" not in value:
        also = f" (unknown keys: {', '.join(unknown)})" if unknown else ""
        raise ValueError(f'cache {value!r}: expected {{"kind": {" | ".join(CACHE_KINDS)}, "threshold": '
                         f"number}}{also}")  # fmt: skip
    kind, threshold = value["kind"], value.get("threshold")
    if not isinstance(kind, str):
        raise ValueError(f"cache kind {kind!r}: expected one of {', '.join(CACHE_KINDS)}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
        raise ValueError(f"cache threshold {threshold!r}: expected a number >= 0")
    return kind, threshold


# ------------------------------------------------------------------------------------------------ LoRAs

MAX_LORA_STRENGTH = 10.0


@dataclass(frozen=True)
class LoraRef:
    """A LoRA file (a path or fsspec URL) and the strength it is merged with."""

    uri: str
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise ValueError(f"LoRA uri {self.uri!r}: expected a path or URL")
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise ValueError(f"LoRA strength {strength!r}: expected a number")
        if abs(strength) > MAX_LORA_STRENGTH:
            raise ValueError(f"LoRA strength {strength:g}: expected a number from -{MAX_LORA_STRENGTH:g} "
                             f"to {MAX_LORA_STRENGTH:g}")  # fmt: skip
        object.__setattr__(self, "strength", float(strength))

    def __str__(self) -> str:
        return f"{self.uri}:{self.strength:g}"


def parse_lora_ref(value: object) -> LoraRef:
    """'URI[:STRENGTH]' (the strength after the last ':' when it reads as a number, else 1), a
    {"uri": ..., "strength": ...} mapping, or a LoraRef. ValueError says what was expected."""
    if isinstance(value, LoraRef):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"uri", "strength"})
        if unknown or "uri" not in value:
            raise ValueError(
                f'LoRA {value!r}: expected {{"uri": path or URL, "strength": number}}'
                + (f" (unknown keys: {', '.join(map(str, unknown))})" if unknown else "")
            )
        return LoraRef(value["uri"], value.get("strength", 1.0))
    if not isinstance(value, str):
        raise ValueError(f'LoRA {value!r}: expected URI[:STRENGTH] or {{"uri": ..., "strength": ...}}')
    head, sep, tail = value.strip().rpartition(":")
    if sep and head and not tail.startswith("//"):
        try:
            return LoraRef(head, float(tail))
        except ValueError as error:
            if "strength" in str(error):
                raise
    return LoraRef(value.strip())


# ---------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """Sampling settings a distilled LoRA was trained for: they replace the preset's defaults (a row's or
    the run's own values still win). guide_scale 1 skips the unconditional pass."""

    name: str
    steps: int
    guide_scale: float
    shift: float
    solver: str
    about: str

    def settings(self) -> dict[str, Any]:
        return {"steps": self.steps, "guide_scale": self.guide_scale, "shift": self.shift,
                "solver": self.solver}  # fmt: skip


RECIPES: dict[str, Recipe] = {
    "few-step": Recipe(
        "few-step", steps=4, guide_scale=1.0, shift=5.0, solver="euler",
        about="step- and CFG-distilled LoRAs (lightx2v's Wan 2.1 step/CFG distill LoRA, CausVid): 4 steps, "
              "no classifier-free guidance",
    ),
}  # fmt: skip


def get_recipe(name: str) -> Recipe:
    """A recipe by name; ValueError lists the known ones."""
    try:
        return RECIPES[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown recipe {name!r}; expected one of: {', '.join(RECIPES)}") from None
