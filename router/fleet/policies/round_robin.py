"""``round_robin``: each candidate in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from router.fleet.policies.base import Policy, W, require


class RoundRobin(Policy):
    """Each worker in turn, ignoring the prompt."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        require(candidates, "RoundRobin")
        return candidates[next(self._counter) % len(candidates)]
