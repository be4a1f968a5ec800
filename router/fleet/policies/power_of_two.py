"""``power_of_two``: two distinct candidates at random, the less loaded of the two."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.fleet.load import LoadFn, no_load
from router.fleet.policies.base import Policy, W, require


class PowerOfTwo(Policy):
    """Two distinct candidates at random, the one with the lower load score (the first of
    the two on a tie). Nearly as good as least load, and no herd on one worker when load
    reports are stale."""

    name = "power_of_two"

    def __init__(self, load_of: LoadFn = no_load, seed: int | None = None) -> None:
        self._load_of = load_of
        self._rng = random.Random(seed)

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        require(candidates, "PowerOfTwo")
        if len(candidates) == 1:
            return candidates[0]
        n = len(candidates)
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)  # a distinct second: skip over i
        a, b = candidates[i], candidates[j + (j >= i)]
        return b if self._load_of(b).score < self._load_of(a).score else a
