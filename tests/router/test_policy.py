"""Load-balancing policies and the cache-aware radix tree, alone (no server, no workers)."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import pytest

from router.config import RouterConfig, build_parser, config_from_args
from router.fleet.load import WorkerLoad, no_load
from router.fleet.policies import (
    POLICIES,
    CacheAware,
    CacheAwareOptions,
    LeastLoad,
    PolicySpec,
    PowerOfTwo,
    Random,
    RoundRobin,
    make_policy,
)
from router.fleet.policies.radix_tree import RadixTree

WORKERS = ["w0", "w1", "w2", "w3"]


class Loads:
    """A ``load_of`` whose answers the test sets: ``loads["w0"] = WorkerLoad(...)``."""

    def __init__(self, **requests: int) -> None:
        self.table = {w: WorkerLoad(in_flight=n) for w, n in requests.items()}

    def __call__(self, worker: object) -> WorkerLoad:
        return self.table.get(str(worker), WorkerLoad())

    def __setitem__(self, worker: str, load: WorkerLoad) -> None:
        self.table[worker] = load


# ---- load score -------------------------------------------------------------------------------


def test_load_score() -> None:
    assert WorkerLoad().score == 1.0
    # The router's count and the report are not added: the report includes our requests.
    assert WorkerLoad(in_flight=3, num_running=2).requests == 3
    assert WorkerLoad(in_flight=1, num_running=4, num_waiting=1).requests == 5
    # Queued requests weigh twice; a full pool makes a worker look busy.
    assert WorkerLoad(num_running=2, num_waiting=2).score > WorkerLoad(num_running=4).score
    half = WorkerLoad(in_flight=1, num_free_pages=50, num_total_pages=100)
    assert half.free_fraction == 0.5 and half.score == 4.0
    full = WorkerLoad(in_flight=1, num_free_pages=0, num_total_pages=100)
    assert full.score > WorkerLoad(in_flight=20, num_free_pages=100, num_total_pages=100).score
    assert no_load("anything") == WorkerLoad()


# ---- simple policies --------------------------------------------------------------------------


def test_round_robin_cycles() -> None:
    policy = RoundRobin()
    picks = [policy.pick(WORKERS, [1]) for _ in range(10)]
    assert picks == WORKERS * 2 + WORKERS[:2]
    with pytest.raises(ValueError, match="at least one candidate"):
        policy.pick([], [1])


def test_random_covers_all_and_is_seeded() -> None:
    policy = Random(seed=1)
    picks = [policy.pick(WORKERS, [1]) for _ in range(400)]
    counts = collections.Counter(picks)
    assert set(counts) == set(WORKERS)
    assert min(counts.values()) > 60  # ~100 each
    again = Random(seed=1)
    assert [again.pick(WORKERS, [1]) for _ in range(400)] == picks


def test_power_of_two_never_picks_the_more_loaded_of_its_two() -> None:
    loads = Loads(w0=5, w1=1, w2=9, w3=3)
    # With two candidates it must always pick the less loaded one.
    policy = PowerOfTwo(loads, seed=0)
    assert {policy.pick(["w0", "w1"], [1]) for _ in range(50)} == {"w1"}
    # With more, the most loaded worker loses every pair it is in, and every other worker
    # wins some pair; the least loaded wins every pair it is in.
    picks = collections.Counter(policy.pick(WORKERS, [1]) for _ in range(600))
    assert "w2" not in picks
    assert set(picks) == {"w0", "w1", "w3"}
    assert picks["w1"] > picks["w3"] > picks["w0"]
    # Replaying its random pairs: each pick is the lower score of the pair.
    rng = random.Random(7)
    policy = PowerOfTwo(loads, seed=7)
    for _ in range(100):
        i, j = rng.randrange(4), rng.randrange(3)
        pair = [WORKERS[i], WORKERS[j + (j >= i)]]
        assert policy.pick(WORKERS, [1]) == min(pair, key=lambda w: loads(w).score)
    assert PowerOfTwo(loads).pick(["w2"], [1]) == "w2"


def test_least_load_picks_min_and_rotates_ties() -> None:
    loads = Loads(w0=4, w1=2, w2=7, w3=2)
    policy = LeastLoad(loads)
    assert [policy.pick(WORKERS, [1]) for _ in range(4)] == ["w1", "w3", "w1", "w3"]
    loads["w3"] = WorkerLoad(in_flight=2, num_waiting=1)  # a queue counts
    assert {policy.pick(WORKERS, [1]) for _ in range(4)} == {"w1"}
    loads["w1"] = WorkerLoad(in_flight=2, num_free_pages=1, num_total_pages=100)  # KV full
    assert policy.pick(WORKERS, [1]) == "w3"
    # The worker's report wins when it sees more than the router sent (other routers).
    loads["w0"] = WorkerLoad(in_flight=0, num_running=0)
    loads["w2"] = WorkerLoad(in_flight=0, num_running=30)
    assert policy.pick(WORKERS, [1]) == "w0"
    # No load known at all: plain rotation, not the first worker every time.
    idle = LeastLoad()
    assert [idle.pick(WORKERS, [1]) for _ in range(4)] == WORKERS


def test_make_policy_and_config_specs(model_dir: Path) -> None:
    assert set(POLICIES) == {"round_robin", "random", "power_of_two", "least_load", "cache_aware"}
    for name in POLICIES:
        policy = make_policy(name)
        assert policy.name == name and policy.pick(WORKERS, [1, 2, 3]) in WORKERS
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    opts = CacheAwareOptions(cache_threshold=0.9)
    cache_aware = make_policy(PolicySpec("cache_aware", opts))
    assert isinstance(cache_aware, CacheAware) and cache_aware.options.cache_threshold == 0.9

    def config(*flags: str) -> RouterConfig:
        return config_from_args(build_parser().parse_args(["--model-path", str(model_dir), *flags]))

    # Defaults: prefill cache_aware, decode least_load, colocated cache_aware (decode's).
    pd = config("--prefill", "a:1", "--decode", "b:1")
    assert (pd.prefill_policy_spec.name, pd.decode_policy_spec.name) == (
        "cache_aware",
        "least_load",
    )
    assert config("--worker", "a:1").decode_policy_spec.name == "cache_aware"
    both = config("--worker", "a:1", "--policy", "round_robin", "--prefill-policy", "random")
    assert (both.prefill_policy_spec.name, both.decode_policy_spec.name) == (
        "random",
        "round_robin",
    )
    tuned = config(
        "--worker", "a:1", "--cache-threshold", "0.7", "--balance-abs-threshold", "8",
        "--balance-rel-threshold", "2", "--max-tree-size", "1000",
    )  # fmt: skip
    assert tuned.decode_policy_spec.cache_aware == CacheAwareOptions(0.7, 8, 2.0, 1000)
    assert CacheAwareOptions() == CacheAwareOptions(0.3, 64, 1.5, 1 << 20)
    with pytest.raises(ValueError, match="--cache-threshold must be in"):
        config("--worker", "a:1", "--cache-threshold", "1.5")
    with pytest.raises(ValueError, match="--balance-rel-threshold must be >="):
        config("--worker", "a:1", "--balance-rel-threshold", "0.5")
    with pytest.raises(ValueError, match="--decode-policy must be one of"):
        RouterConfig(str(model_dir), workers=("a:1",), decode_policy="fastest")


# ---- radix tree ----------------------------------------------------------------------------


def test_radix_tree_insert_and_match() -> None:
    tree: RadixTree[str] = RadixTree(max_tokens_per_tenant=10_000)
    assert tree.match([1, 2, 3]) == {}
    tree.insert([1, 2, 3, 4, 5], "a")
    assert tree.match([1, 2, 3, 4, 5, 6]) == {"a": 5}
    assert tree.match([1, 2, 9]) == {"a": 2}  # diverges inside a node
    assert tree.match([7]) == {}
    assert tree.match([]) == {}
    tree.insert([1, 2, 3, 9, 9], "b")  # splits a's node at 3 tokens
    assert tree.match([1, 2, 3, 4, 5]) == {"a": 5, "b": 3}
    assert tree.match([1, 2, 3, 9, 9, 9]) == {"a": 3, "b": 5}
    assert tree.size("a") == 5 and tree.size("b") == 5 and tree.size("c") == 0
    assert tree.num_nodes() == 3  # [1,2,3] -> [4,5], [9,9]
    tree.insert([1, 2], "a")  # a prefix of what a has: nothing new
    assert tree.size("a") == 5 and tree.num_nodes() == 4  # [1,2] split off [3]
    assert tree.match([1, 2, 3, 4, 5]) == {"a": 5, "b": 3}
    tree.insert([1, 2, 3, 4, 5], "b")
    assert tree.match([1, 2, 3, 4, 5]) == {"a": 5, "b": 5} and tree.size("b") == 7
    long = list(range(100, 2100))
    tree.insert(long, "c")
    for cut in (0, 1, 999, 1000, 1999):
        probe = [*long[:cut], -1]
        assert tree.match(probe) == ({"c": cut} if cut else {})


def test_radix_tree_evicts_least_recently_used_leaves_by_size() -> None:
    tree: RadixTree[str] = RadixTree(max_tokens_per_tenant=10)
    tree.insert([0, 1, 2, 3], "a")  # shared trunk [0, 1] after the next insert
    tree.insert([0, 1, 5, 6], "a")
    tree.insert([9, 9], "a")
    assert tree.size("a") == 8
    tree.insert([0, 1, 2, 3], "a")  # touch: [5, 6] and [9, 9] are now the oldest leaves
    tree.insert([7, 7, 7], "a")  # 11 > 10: the oldest leaf, [5, 6], goes
    assert tree.size("a") == 9
    assert tree.match([0, 1, 5, 6]) == {"a": 2}
    assert tree.match([9, 9]) == {"a": 2} and tree.match([0, 1, 2, 3]) == {"a": 4}
    tree.insert([8, 8, 8], "a")  # 12: [9, 9] goes (10 tokens left)
    assert tree.match([9, 9]) == {} and tree.size("a") == 10
    # The bound is per tenant: another tenant's inserts evict nothing of "a".
    tree.insert(list(range(100, 110)), "b")
    assert tree.size("a") == 10 and tree.size("b") == 10
    # A leaf shared with another tenant loses only this tenant's mark.
    tree.insert([0, 1, 2, 3], "b")  # b: 14 -> its oldest leaf, range(100, 110), goes
    assert tree.match(list(range(100, 110))) == {} and tree.size("b") == 4
    tree.insert([50] * 9, "a")  # a: 19 -> evicts [0,1,2,3] path's leaf [2,3] and more
    assert tree.size("a") <= 10
    assert tree.match([0, 1, 2, 3])["b"] == 4
    # One prompt longer than the bound keeps only what fits (its own oldest parts go last).
    small: RadixTree[str] = RadixTree(max_tokens_per_tenant=3)
    small.insert([1, 2, 3, 4, 5], "a")
    assert small.size("a") == 0 and small.match([1, 2]) == {} and small.num_nodes() == 0


def test_radix_tree_remove_tenant() -> None:
    tree: RadixTree[str] = RadixTree(max_tokens_per_tenant=100)
    tree.insert([1, 2, 3], "a")
    tree.insert([1, 2, 4], "b")
    tree.insert([5, 6], "a")
    tree.remove_tenant("a")
    assert tree.match([1, 2, 3]) == {"b": 2}
    assert tree.match([5, 6]) == {}
    assert tree.tenants() == ["b"] and tree.size("a") == 0
    assert tree.num_nodes() == 2  # [1, 2] -> [4]
    tree.remove_tenant("b")
    tree.remove_tenant("never-seen")
    assert tree.num_nodes() == 0 and tree.tenants() == []


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_radix_tree_random_against_brute_force() -> None:
    """Random prompts over a small alphabet (many shared prefixes and splits): with room for
    all, a tenant's match is the longest common prefix with any prompt it was sent; with a
    small bound, sizes stay bounded, matches never claim more than was sent, and the last
    prompt inserted is remembered whole."""
    rng = random.Random(3)
    trunks = [[rng.randrange(4) for _ in range(rng.randrange(1, 12))] for _ in range(6)]

    def random_prompt() -> list[int]:
        return rng.choice(trunks) + [rng.randrange(4) for _ in range(rng.randrange(0, 8))]

    for bound in (10_000, 40):
        tree: RadixTree[int] = RadixTree(max_tokens_per_tenant=bound)
        sent: dict[int, list[list[int]]] = {0: [], 1: [], 2: []}
        for _ in range(400):
            tenant = rng.randrange(3)
            prompt = random_prompt()
            tree.insert(prompt, tenant)
            sent[tenant].append(prompt)
            assert tree.size(tenant) <= bound
            if len(prompt) <= bound:
                assert tree.match(prompt)[tenant] == len(prompt)
            probe = random_prompt()
            matched = tree.match(probe)
            for t, prompts in sent.items():
                best = max((lcp(probe, q) for q in prompts), default=0)
                if bound == 10_000:
                    assert matched.get(t, 0) == best
                else:
                    assert matched.get(t, 0) <= best


# ---- cache aware ------------------------------------------------------------------------------


def prompt(conversation: int, length: int) -> list[int]:
    return [1000 * conversation + i for i in range(length)]


def test_cache_aware_prefix_hits_stick_to_a_worker() -> None:
    policy = CacheAware()
    first = {c: policy.pick(WORKERS, prompt(c, 20)) for c in range(4)}
    assert sorted(first.values()) == WORKERS  # misses spread over the workers
    for turn in range(1, 5):
        for c in range(4):
            # Each turn extends the conversation: the longest match is where it went before.
            assert policy.pick(WORKERS, prompt(c, 20 + 10 * turn)) == first[c]
    # A worker that is not a candidate (unhealthy, gone) is never picked for its cache.
    others = [w for w in WORKERS if w != first[0]]
    assert policy.pick(others, prompt(0, 80)) != first[0]


def test_cache_aware_threshold() -> None:
    policy = CacheAware(options=CacheAwareOptions(cache_threshold=0.5))
    shared = prompt(0, 10)
    home = policy.pick(["a", "b"], shared + prompt(1, 10))
    # 10 of 20 tokens match: 0.5 is not above the threshold, so a miss: the other, emptier
    # worker gets it.
    assert policy.pick(["a", "b"], shared + prompt(2, 10)) != home
    # 10 of 19: above it, so it goes where the shared prefix is... wherever the longest is.
    policy = CacheAware(options=CacheAwareOptions(cache_threshold=0.5))
    home = policy.pick(["a", "b"], shared + prompt(1, 10))
    assert policy.pick(["a", "b"], shared + prompt(2, 9)) == home
    # Empty prompts are misses and do not fail.
    assert policy.pick(["a", "b"], []) in ("a", "b")


def test_cache_aware_miss_goes_to_least_loaded() -> None:
    loads = Loads(w0=3, w1=1, w2=2, w3=1)
    policy = CacheAware(loads)
    first = policy.pick(WORKERS, prompt(0, 10))
    # Equal load: the smaller tree wins (it remembers less, so it has more room).
    second = policy.pick(WORKERS, prompt(1, 10))
    assert {first, second} == {"w1", "w3"}
    # A hit beats a lower load while the load is balanced (9 - 2 is not above 64).
    loads["w1"] = WorkerLoad(in_flight=9)
    loads["w3"] = WorkerLoad(in_flight=9)
    assert policy.pick(WORKERS, prompt(0, 30)) == first
    assert policy.pick(WORKERS, prompt(9, 10)) == "w2"


def test_cache_aware_imbalance_overrides_the_cache() -> None:
    loads = Loads(w0=0, w1=0)
    opts = CacheAwareOptions(balance_abs_threshold=32, balance_rel_threshold=1.5)
    policy = CacheAware(loads, opts)
    home = policy.pick(["w0", "w1"], prompt(0, 100))
    other = "w1" if home == "w0" else "w0"
    # Imbalanced needs both: more than 32 apart...
    loads[home] = WorkerLoad(in_flight=32)
    assert policy.pick(["w0", "w1"], prompt(0, 120)) == home
    # ... and max > 1.5 * min.
    loads[home] = WorkerLoad(in_flight=100)
    loads[other] = WorkerLoad(in_flight=67)
    assert policy.pick(["w0", "w1"], prompt(0, 140)) == home
    loads[other] = WorkerLoad(in_flight=66)
    assert policy.pick(["w0", "w1"], prompt(0, 160)) == other
    # The override also records the prompt under the worker that got it.
    assert policy.tree.match(prompt(0, 160))[other] == 160
    # Reported queues count as load too.
    policy.tree.insert(prompt(7, 100), home)
    loads[home] = WorkerLoad(in_flight=0, num_running=10, num_waiting=40)
    loads[other] = WorkerLoad(in_flight=1)
    assert policy.pick(["w0", "w1"], prompt(7, 110)) == other
    loads[home] = WorkerLoad(in_flight=0, num_running=10, num_waiting=20)  # 30 - 1: balanced
    policy.tree.insert(prompt(8, 100), home)
    assert policy.pick(["w0", "w1"], prompt(8, 110)) == home


def test_cache_aware_forgets_a_removed_worker() -> None:
    policy = CacheAware()
    home = policy.pick(["a", "b"], prompt(0, 50))
    policy.remove_worker(home)
    assert policy.tree.size(home) == 0 and policy.tree.match(prompt(0, 50)).get(home) is None
    # Any role works: the same policy object routes decode workers the same way.
    assert policy.pick(["a", "b"], prompt(0, 60)) in ("a", "b")


def test_cache_aware_tree_stays_bounded() -> None:
    policy = CacheAware(options=CacheAwareOptions(max_tree_size=500))
    for c in range(200):
        policy.pick(WORKERS, prompt(c, 50))
    assert all(policy.tree.size(w) <= 500 for w in WORKERS)
    assert policy.tree.num_nodes() <= 4 * 500 // 50
