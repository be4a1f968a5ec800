"""Load-balancing policies: which worker of a role serves the next request.

A policy sees the candidates (the pool's usable workers of one role, in a stable order) and
the request's prompt, and returns one of them. Policies hold their own state (a counter, a
prefix tree) and read load through the ``load_of`` callable the pool gives them
(``router.fleet.load``). ``pick`` runs on the event loop and must not block; it is called once per
worker request, and the worker it returns is the one the request goes to.

| name | picks |
| --- | --- |
| ``round_robin`` | each candidate in turn |
| ``random`` | uniformly at random (``seed`` makes it reproducible) |
| ``power_of_two`` | two distinct random candidates, the one with the lower load score |
| ``least_load`` | the lowest load score (``WorkerLoad.score``); ties in turn |
| ``cache_aware`` | the longest cached prefix, else the least loaded (``CacheAware``) |

One file per policy, behind ``base.Policy``; ``make_policy`` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from router.fleet.load import LoadFn, no_load
from router.fleet.policies.base import Policy
from router.fleet.policies.cache_aware import CacheAware, CacheAwareOptions
from router.fleet.policies.least_load import LeastLoad
from router.fleet.policies.power_of_two import PowerOfTwo
from router.fleet.policies.random import Random
from router.fleet.policies.round_robin import RoundRobin


@dataclass(frozen=True)
class PolicySpec:
    """How to build a policy: its name and the knobs the named policies take."""

    name: str
    cache_aware: CacheAwareOptions = CacheAwareOptions()  # noqa: RUF009 (frozen)
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


__all__ = [
    "POLICIES", "CacheAware", "CacheAwareOptions", "LeastLoad", "Policy", "PolicySpec",
    "PowerOfTwo", "Random", "RoundRobin", "make_policy",
]  # fmt: skip
