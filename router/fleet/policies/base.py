"""The policy interface: ``Policy.pick(candidates, token_ids)``, and the helpers the policies
share."""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

W = TypeVar("W")


class Policy(abc.ABC):
    """Chooses one worker for a request. ``candidates`` is never empty."""

    name: ClassVar[str]  # the name on the command line (``--policy``) and in metrics

    @abc.abstractmethod
    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        """Return one element of ``candidates`` for the prompt ``token_ids``."""

    def remove_worker(self, worker: object) -> None:  # noqa: B027 (optional hook)
        """Forget ``worker`` (it left the pool). Policies without per-worker state ignore it."""


def require(candidates: Sequence[Any], name: str) -> None:
    if not candidates:
        raise ValueError(f"{name}.pick needs at least one candidate")


class Rotation:
    """Breaks ties in turn, so equal workers (for example with no load known) share the
    requests instead of the first one taking them all."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def least(self, candidates: Sequence[W], key: Callable[[W], Any]) -> W:
        keys = [key(c) for c in candidates]
        best = min(keys)
        tied = [c for c, k in zip(candidates, keys, strict=True) if k == best]
        if len(tied) == 1:
            return tied[0]
        return tied[next(self._counter) % len(tied)]
