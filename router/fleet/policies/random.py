"""``random``: uniformly at random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.fleet.policies.base import Policy, W, require


class Random(Policy):
    """Uniformly at random; ``seed`` makes the sequence reproducible (tests)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        require(candidates, "Random")
        return candidates[self._rng.randrange(len(candidates))]
