"""Load-balancing policies: which worker of a role serves the next request.

A policy sees the candidates (the pool's workers of one role, in a stable order) and the
request's prompt, and returns one of them. Policies hold their own state (a counter, a prefix
tree, load reports) and must not block: ``pick`` runs on the event loop.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Sequence
from typing import TypeVar

W = TypeVar("W")


class Policy(abc.ABC):
    """Chooses one worker for a request. ``candidates`` is never empty."""

    @abc.abstractmethod
    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        """Return one element of ``candidates`` for the prompt ``token_ids``."""


class RoundRobin(Policy):
    """Each worker in turn, ignoring the prompt."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        if not candidates:
            raise ValueError("RoundRobin.pick needs at least one candidate")
        return candidates[next(self._counter) % len(candidates)]


POLICIES: dict[str, type[Policy]] = {"round_robin": RoundRobin}


def make_policy(name: str) -> Policy:
    """The policy called ``name`` (ValueError listing the known ones otherwise)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}") from None
