"""``cache_aware``: SGLang's cache-aware routing over token ids (``CacheAware``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.fleet.load import LoadFn, no_load
from router.fleet.policies.base import Policy, Rotation, W, require
from router.fleet.policies.radix_tree import RadixTree


@dataclass(frozen=True)
class CacheAwareOptions:
    """SGLang router's cache-aware knobs, with sglang-router 0.3.2's defaults (its
    ``router_args.py``) except ``max_tree_size``, which counts tokens here, per worker."""

    cache_threshold: float = 0.3  # route by cache when match_len / prompt_len > this
    balance_abs_threshold: int = 64  # imbalanced when max - min requests > this ...
    balance_rel_threshold: float = 1.5  # ... and max > min * this
    max_tree_size: int = 1 << 20  # tokens remembered per worker (LRU beyond)

    def __post_init__(self) -> None:
        # The messages name the router's flags, which set these.
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"--cache-threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0:
            raise ValueError(
                f"--balance-abs-threshold must be >= 0, got {self.balance_abs_threshold}"
            )
        if self.balance_rel_threshold < 1.0:
            raise ValueError(
                f"--balance-rel-threshold must be >= 1.0, got {self.balance_rel_threshold}"
            )
        if self.max_tree_size < 1:
            raise ValueError(f"--max-tree-size must be >= 1 (tokens), got {self.max_tree_size}")


class CacheAware(Policy):
    """SGLang's cache-aware routing over token ids.

    1. Imbalanced load (over the candidates, by ``WorkerLoad.requests``): when
       ``max - min > balance_abs_threshold`` and ``max > min * balance_rel_threshold``, the
       least loaded candidate, whatever its cache.
    2. Otherwise the candidate whose remembered prompts share the longest prefix with this
       one, when ``match_len / len(prompt) > cache_threshold`` (ties: the lower load score).
    3. Otherwise (a cache miss) the least loaded candidate by load score, ties broken by the
       smaller tree (most room left, SGLang's first rule), then in turn.

    In every case the prompt is then recorded under the chosen worker, which makes its path
    that worker's most recently used. The tree approximates the workers' prefix caches; its
    per-worker bound is ``max_tree_size`` tokens, LRU beyond (the router never sees the
    workers' own evictions).
    """

    name = "cache_aware"

    def __init__(self, load_of: LoadFn = no_load, options: CacheAwareOptions | None = None) -> None:
        self.options = options or CacheAwareOptions()
        self._load_of = load_of
        self.tree: RadixTree[Any] = RadixTree(self.options.max_tree_size)
        self._ties = Rotation()

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        require(candidates, "CacheAware")
        tokens = tuple(token_ids)
        chosen = self._choose(candidates, tokens)
        self.tree.insert(tokens, chosen)
        return chosen

    def _choose(self, candidates: Sequence[W], tokens: tuple[int, ...]) -> W:
        if len(candidates) == 1:
            return candidates[0]
        opts = self.options
        loads = [self._load_of(c) for c in candidates]
        requests = [load.requests for load in loads]
        most, least = max(requests), min(requests)
        scores = {id(c): load.score for c, load in zip(candidates, loads, strict=True)}
        if most - least > opts.balance_abs_threshold and most > least * opts.balance_rel_threshold:
            return self._ties.least(candidates, lambda c: scores[id(c)])
        if tokens:
            matched = self.tree.match(tokens)
            best: W | None = None
            best_len = 0
            for c in candidates:
                n = matched.get(c, 0)
                if n > best_len or (n == best_len and n and scores[id(c)] < scores[id(best)]):
                    best, best_len = c, n
            if best is not None and best_len / len(tokens) > opts.cache_threshold:
                return best
        return self._ties.least(candidates, lambda c: (scores[id(c)], self.tree.size(c)))

    def remove_worker(self, worker: object) -> None:
        self.tree.remove_tenant(worker)
