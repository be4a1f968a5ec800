"""Typed reads of a decoded JSON body's fields, for the request parsers: every failure is a 400
that names the field (with its path), the bad value and what was expected."""

from __future__ import annotations

import math
from typing import Any

from router.app.errors import RequestError, invalid, short, unsupported


class Fields:
    """Typed reads of one JSON object's fields; every failure names ``prefix + field``."""

    def __init__(self, body: Any, prefix: str = "", what: str = "request body") -> None:
        if not isinstance(body, dict):
            raise invalid(
                f"{what} must be a JSON object, got {json_type(body)}", prefix.rstrip(".") or None
            )
        self.body: dict[str, Any] = body
        self.prefix = prefix

    def name(self, field: str) -> str:
        return f"{self.prefix}{field}"

    def raw(self, field: str) -> Any:
        return self.body.get(field)

    def flag(self, field: str, default: bool) -> bool:
        value = self.body.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._type(field, value, "a boolean")
        return value

    def optional_int(self, field: str, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.body.get(field)
        if value is None:
            return None
        if not is_int(value):
            raise self._type(field, value, "an integer")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                bounds = f">= {lo}"
            elif lo is None:
                bounds = f"<= {hi}"
            else:
                bounds = f"in [{lo}, {hi}]"
            raise invalid(f"{self.name(field)} must be {bounds}, got {value}", self.name(field))
        return int(value)

    def integer(
        self, field: str, default: int, lo: int | None = None, hi: int | None = None
    ) -> int:
        value = self.optional_int(field, lo, hi)
        return default if value is None else value

    def number(
        self, field: str, default: float, lo: float, hi: float, lo_open: bool = False
    ) -> float:
        value = self.body.get(field)
        if value is None:
            return default
        if not is_number(value) or not math.isfinite(value):
            raise self._type(field, value, "a finite number")
        if (value <= lo if lo_open else value < lo) or value > hi:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise invalid(
                f"{self.name(field)} must be in {interval}, got {value!r}", self.name(field)
            )
        return float(value)

    def optional_text(self, field: str) -> str | None:
        value = self.body.get(field)
        if value is not None and not isinstance(value, str):
            raise self._type(field, value, "a string")
        return value

    def text(self, field: str) -> str:
        value = self.optional_text(field)
        if value is None:
            raise invalid(f"{self.name(field)} is required", self.name(field), "missing")
        return value

    def only_default(self, field: str, allowed: tuple[Any, ...], text: str) -> None:
        """Refuse ``field`` unless absent or equal to one of ``allowed`` (booleans apart)."""
        value = self.body.get(field)
        if value is None or any(
            isinstance(value, bool) == isinstance(a, bool) and value == a for a in allowed
        ):
            return
        raise unsupported(self.name(field), value, text)

    def _type(self, field: str, value: Any, expected: str) -> RequestError:
        return invalid(
            f"{self.name(field)} must be {expected}, got {json_type(value)} {short(value)}",
            self.name(field),
            "invalid_type",
        )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_type(value: Any) -> str:
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__
