"""Filters on outputs, written as a user types them: `motion > 0.02`, `not frozen and width >= 832`.

`parse_filter(text)` turns the text into `Condition`s (joined by `and`), each `FIELD OP VALUE`, or a bare
boolean field (`frozen`, `not black`). Fields are the outputs' measured columns (`FILTER_FIELDS`); the
operators are `<`, `<=`, `>`, `>=`, `=` (or `==`) and `!=`. A condition on a column a video has no value for
(a video stored before it was measured) is false. Conditions become SQL (`clause`), so the catalog filters,
not the client. A bad filter raises ValueError naming the part that is wrong and what was expected.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from storage.catalog.records import LATENTS_CODEC
from storage.catalog.tables import Output

__all__ = ["FILTER_FIELDS", "Condition", "parse_filter"]

# field -> (type, what it is)
FILTER_FIELDS: dict[str, tuple[type, str]] = {
    "motion": (float, "mean frame-to-frame luma change, 0-1"),
    "black": (bool, "a black stretch of 1 s or more"),
    "flat": (bool, "a one-colour stretch of 1 s or more"),
    "frozen": (bool, "a frozen stretch of 1 s or more"),
    "black_frames": (int, "black frames"),
    "flat_frames": (int, "one-colour frames"),
    "frozen_frames": (int, "frames repeating the previous one"),
    "width": (int, "pixels"),
    "height": (int, "pixels"),
    "frames": (int, "frames"),
    "fps": (float, "frames per second"),
    "bytes": (int, "stored size"),
    "dit_forwards": (int, "DiT forwards of the sampling loop"),
    "dit_forwards_skipped": (int, "DiT forwards a step cache skipped"),
    "clip_score": (float, "text-video similarity (CLIP), -1 to 1, where a CLIP file was configured"),
    "video": (bool, "a decoded video (false: a latents-only output)"),
    "latents": (bool, "the final latents are stored"),
}
# Fields that are not a column of their own: the SQL expression each stands for (never NULL).
_DERIVED: dict[str, Callable[[], sa.ColumnElement[Any]]] = {
    "video": lambda: Output.codec != LATENTS_CODEC,
    "latents": lambda: Output.latents_uri.is_not(None),
}
_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "<=": operator.le, ">=": operator.ge, "!=": operator.ne, "==": operator.eq, "=": operator.eq,
    "<": operator.lt, ">": operator.gt,
}  # fmt: skip
_COMPARISON = re.compile(r"^\s*([A-Za-z_]+)\s*(<=|>=|!=|==|=|<|>)\s*(\S+)\s*$")
_BARE = re.compile(r"^\s*(not\s+)?([A-Za-z_]+)\s*$", re.IGNORECASE)
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True)
class Condition:
    """One `field op value` condition on outputs."""

    field: str
    op: str
    value: float | int | bool

    def clause(self) -> sa.ColumnElement[bool]:
        """The SQL condition (a NULL column makes it false)."""
        if self.field in _DERIVED:
            return _OPERATORS[self.op](_DERIVED[self.field](), self.value)
        column = getattr(Output, self.field)
        return sa.and_(column.is_not(None), _OPERATORS[self.op](column, self.value))

    def __str__(self) -> str:
        value = str(self.value).lower() if isinstance(self.value, bool) else self.value
        return f"{self.field} {self.op} {value}"


def _fields() -> str:
    return ", ".join(FILTER_FIELDS)


def _value(field: str, text: str, part: str) -> float | int | bool:
    kind = FILTER_FIELDS[field][0]
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"filter {part!r}: {field} is true or false, got {text!r}")
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"filter {part!r}: {field} takes a number, got {text!r}") from None
    return int(number) if kind is int and number.is_integer() else number


def parse_filter(text: str | None) -> list[Condition]:
    """'motion > 0.02 and not frozen' -> [Condition('motion', '>', 0.02), Condition('frozen', '=', False)];
    [] for None or blank text."""
    if text is None or not text.strip():
        return []
    conditions = []
    for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        comparison, bare = _COMPARISON.match(part), _BARE.match(part)
        if comparison:
            field, op, value = comparison.groups()
        elif bare:
            negated, field = bare.groups()
            op, value = "=", "false" if negated else "true"
        else:
            raise ValueError(
                f"filter {part!r}: expected FIELD OP VALUE (OP one of <, <=, >, >=, =, !=) or a true/false "
                f"field, joined by 'and'; fields: {_fields()}"
            )
        field = field.lower()
        if field not in FILTER_FIELDS:
            raise ValueError(f"filter {part!r}: unknown field {field!r}; fields: {_fields()}")
        if bare and not comparison and FILTER_FIELDS[field][0] is not bool:
            raise ValueError(f"filter {part!r}: {field} is a number; compare it (e.g. {field} > 0)")
        if FILTER_FIELDS[field][0] is bool and op not in ("=", "==", "!="):
            raise ValueError(f"filter {part!r}: {field} is true or false; use = or !=")
        conditions.append(Condition(field, op, _value(field, value, part)))
    return conditions
