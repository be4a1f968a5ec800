"""Command-line argument types the benchmarks share."""

from __future__ import annotations

import argparse


def int_list(text: str, minimum: int = 1) -> tuple[int, ...]:
    """Comma-separated integers of at least `minimum` (an argparse type)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,64,256, got {text!r}") from exc
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(
            f"expected integers of at least {minimum} like 1,64,256, got {text!r}"
        )
    return values


def split_list(text: str) -> tuple[int, ...]:
    """Context-split (or range) counts to time, 0 for the kernel's own rule."""
    return int_list(text, minimum=0)
