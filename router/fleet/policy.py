"""Load-balancing policies: which worker of a role serves the next request.

A policy sees the candidates (the pool's usable workers of one role, in a stable order) and
the request's prompt, and returns one of them. Policies hold their own state (a counter, a
prefix tree) and read load through the ``load_of`` callable the pool gives them
(``router.load``). ``pick`` runs on the event loop and must not block; it is called once per
worker request, and the worker it returns is the one the request goes to.

| name | picks |
| --- | --- |
| ``round_robin`` | each candidate in turn |
| ``random`` | uniformly at random (``seed`` makes it reproducible) |
| ``power_of_two`` | two distinct random candidates, the one with the lower load score |
| ``least_load`` | the lowest load score (``WorkerLoad.score``); ties in turn |
| ``cache_aware`` | the longest cached prefix, else the least loaded (``CacheAware``) |
"""

from __future__ import annotations

import abc
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from router.fleet.load import LoadFn, no_load
from router.fleet.radix_tree import RadixTree

W = TypeVar("W")


class Policy(abc.ABC):
    """Chooses one worker for a request. ``candidates`` is never empty."""

    name: ClassVar[str]  # the name on the command line (``--policy``) and in metrics

    @abc.abstractmethod
    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        """Return one element of ``candidates`` for the prompt ``token_ids``."""

    def remove_worker(self, worker: object) -> None:  # noqa: B027 (optional hook)
        """Forget ``worker`` (it left the pool). Policies without per-worker state ignore it."""


def _require(candidates: Sequence[Any], name: str) -> None:
    if not candidates:
        raise ValueError(f"{name}.pick needs at least one candidate")


class RoundRobin(Policy):
    """Each worker in turn, ignoring the prompt."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        _require(candidates, "RoundRobin")
        return candidates[next(self._counter) % len(candidates)]


class Random(Policy):
    """Uniformly at random; ``seed`` makes the sequence reproducible (tests)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        _require(candidates, "Random")
        return candidates[self._rng.randrange(len(candidates))]


class PowerOfTwo(Policy):
    """Two distinct candidates at random, the one with the lower load score (the first of
    the two on a tie). Nearly as good as least load, and no herd on one worker when load
    reports are stale."""

    name = "power_of_two"

    def __init__(self, load_of: LoadFn = no_load, seed: int | None = None) -> None:
        self._load_of = load_of
        self._rng = random.Random(seed)

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        _require(candidates, "PowerOfTwo")
        if len(candidates) == 1:
            return candidates[0]
        n = len(candidates)
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)  # a distinct second: skip over i
        a, b = candidates[i], candidates[j + (j >= i)]
        return b if self._load_of(b).score < self._load_of(a).score else a


class _Rotation:
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


class LeastLoad(Policy):
    """The lowest ``WorkerLoad.score``: requests (the router's in-flight count, or the
    worker's running + queued when it reports more) plus queued, per unit of free KV."""

    name = "least_load"

    def __init__(self, load_of: LoadFn = no_load) -> None:
        self._load_of = load_of
        self._ties = _Rotation()

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        _require(candidates, "LeastLoad")
        if len(candidates) == 1:
            return candidates[0]
        return self._ties.least(candidates, lambda w: self._load_of(w).score)


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
        self._ties = _Rotation()

    def pick(self, candidates: Sequence[W], token_ids: Sequence[int]) -> W:
        _require(candidates, "CacheAware")
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


@dataclass(frozen=True)
class PolicySpec:
    """How to build a policy: its name and the knobs the named policies take."""

    name: str
    cache_aware: CacheAwareOptions = CacheAwareOptions()
    seed: int | None = None  # random and power_of_two; None: seeded from the OS


POLICIES: dict[str, Callable[[PolicySpec, LoadFn], Policy]] = {
    "round_robin": lambda spec, load_of: RoundRobin(),
    "random": lambda spec, load_of: Random(spec.seed),
    "power_of_two": lambda spec, load_of: PowerOfTwo(load_of, spec.seed),
    "least_load": lambda spec, load_of: LeastLoad(load_of),
    "cache_aware": lambda spec, load_of: CacheAware(load_of, spec.cache_aware),
}


def make_policy(name: str | PolicySpec, load_of: LoadFn = no_load) -> Policy:
    """The policy ``name`` (ValueError listing the known ones otherwise), reading load
    through ``load_of``."""
    spec = name if isinstance(name, PolicySpec) else PolicySpec(name)
    try:
        build = POLICIES[spec.name]
    except KeyError:
        raise ValueError(f"unknown policy {spec.name!r}; known: {sorted(POLICIES)}") from None
    return build(spec, load_of)
