"""Values quoted in error messages, cut short: a client's JSON may be megabytes, or nest a
thousand deep."""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel = 3  # a client's JSON may nest a thousand deep; repr() would recurse that far
_REPR.maxstring = _REPR.maxother = 80


def short(value: Any, limit: int = 60) -> str:
    """``value`` as Python writes it, cut to ``limit`` characters, for an error message."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
