"""``least_load``: the lowest load score, ties in turn."""

from __future__ import annotations

from collections.abc import Sequence

from router.fleet.load import LoadFn, no_load
from router.fleet.policies.base import Policy, Rotation, W, require


class LeastLoad(Policy):
    """The lowest ``WorkerLoad.score``: requests (the router's in-flight count, or the
    worker's running + queued when it reports more) plus queued, per unit of free KV."""

    name = "least_load"

    def __init__(self, load_of: LoadFn = no_load) -> None:
        self._load_of = load_of
        self._ties = Rotation()

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        require(candidates, "LeastLoad")
        if len(candidates) == 1:
            return candidates[0]
        return self._ties.least(candidates, lambda w: self._load_of(w).score)
