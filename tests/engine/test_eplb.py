import math
import random
from collections import Counter

import pytest

from engine.eplb import (
    PAIR_COST,
    ExpertMove,
    ExpertPlacement,
    assign_replica,
    initial_placement,
    moves,
    plan_incremental,
    rebalance,
    step_cost,
)

ZIPF_16 = [1.0 / (e + 1) for e in range(16)]
ONE_HOT_16 = [100.0] + [1.0] * 15


def check_invariants(
    p: ExpertPlacement, num_logical: int, num_ranks: int, num_redundant: int
) -> None:
    assert p.num_logical == num_logical
    assert p.num_ranks == num_ranks
    assert p.slots_per_rank * num_ranks == num_logical + num_redundant == p.num_slots
    assert len(p.physical_to_logical) == p.num_slots
    assert all(len(p.local_slots(r)) == p.slots_per_rank for r in range(num_ranks))
    assert all(len(p.replicas(e)) >= 1 for e in range(num_logical))
    assert sorted(s for e in range(num_logical) for s in p.replicas(e)) == list(range(p.num_slots))


# --- ExpertPlacement and initial_placement ---


def test_initial_placement_is_contiguous() -> None:
    p = initial_placement(8, 4)
    assert (p.num_slots, p.slots_per_rank) == (8, 2)
    assert p.physical_to_logical == tuple(range(8))
    assert p.local_slots(1) == range(2, 4)
    assert [p.rank_of(s) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.logical_to_physical == tuple((e,) for e in range(8))


def test_initial_placement_redundant_slots_round_robin() -> None:
    p = initial_placement(6, 4, num_redundant=6)
    assert p.slots_per_rank == 3
    assert p.physical_to_logical == (0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5)
    assert p.replicas(0) == (0, 6)
    assert p.replicas(5) == (5, 11)
    check_invariants(p, 6, 4, 6)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((6, 4, 0), "6 \\+ 0.*num_ranks=4"),
        ((16, 4, 2), "16 \\+ 2.*num_ranks=4"),
        ((8, 4, -4), "num_redundant=-4"),
        ((8, 0, 0), "num_ranks=0"),
        ((0, 1, 0), "num_logical=0"),
    ],
)
def test_initial_placement_rejects_bad_shapes(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        initial_placement(*args)


def test_placement_validates_construction() -> None:
    with pytest.raises(ValueError, match="3 entries"):
        ExpertPlacement(2, 2, 2, (0, 1, 0))
    with pytest.raises(ValueError, match="logical expert 5"):
        ExpertPlacement(2, 1, 2, (0, 5))
    with pytest.raises(ValueError, match=r"\[1\] have no physical slot"):
        ExpertPlacement(2, 1, 2, (0, 0))


def test_placement_is_frozen_and_hashable() -> None:
    a = ExpertPlacement(2, 1, 2, [1, 0])  # type: ignore[arg-type]  # a list is accepted too
    b = ExpertPlacement(2, 1, 2, (1, 0))
    assert a == b and hash(a) == hash(b)
    assert a.replicas(1) == (0,)


def test_placement_rejects_out_of_range_queries() -> None:
    p = initial_placement(4, 2)
    with pytest.raises(ValueError, match="logical expert 4"):
        p.replicas(4)
    with pytest.raises(ValueError, match="physical slot -1"):
        p.rank_of(-1)
    with pytest.raises(ValueError, match="rank 2"):
        p.local_slots(2)
    with pytest.raises(ValueError, match="got 3 loads"):
        p.rank_loads([1.0, 1.0, 1.0])


def test_rank_loads_split_over_replicas() -> None:
    p = ExpertPlacement(3, 2, 2, (0, 1, 0, 2))
    assert p.rank_loads([4.0, 1.0, 3.0]) == [3.0, 5.0]
    assert p.imbalance([4.0, 1.0, 3.0]) == pytest.approx(5.0 / 4.0)
    assert p.imbalance([0.0, 0.0, 0.0]) == 1.0
    assert p.imbalance([2.0, 1.0, 1.0]) == 1.0


# --- rebalance ---


@pytest.mark.parametrize("loads", [ZIPF_16, ONE_HOT_16], ids=["zipf", "one_hot"])
def test_rebalance_lowers_imbalance_on_skewed_load(loads: list[float]) -> None:
    before = initial_placement(16, 4, num_redundant=4).imbalance(loads)
    placement = rebalance(loads, num_ranks=4, num_redundant=4)
    after = placement.imbalance(loads)
    print(f"imbalance before={before:.4f} after={after:.4f}")
    check_invariants(placement, 16, 4, 4)
    assert after < before


def test_rebalance_zipf_example_pinned() -> None:
    # Pins the exact output so that a change to the greedy's tie-breaking is noticed.
    placement = rebalance(ZIPF_16, num_ranks=4, num_redundant=4)
    assert placement.physical_to_logical == (
        *(2, 0, 7, 11, 15),
        *(0, 1, 4, 10, 14),
        *(0, 1, 5, 9, 13),
        *(0, 3, 6, 8, 12),
    )
    assert [len(placement.replicas(e)) for e in range(3)] == [4, 2, 1]


def test_hot_expert_gets_the_redundant_replicas_on_distinct_ranks() -> None:
    placement = rebalance(ONE_HOT_16, num_ranks=4, num_redundant=4)
    hot = placement.replicas(0)
    assert len(hot) == 5
    assert {placement.rank_of(s) for s in hot} == {0, 1, 2, 3}


def test_rebalance_without_redundancy_only_permutes() -> None:
    placement = rebalance(ZIPF_16, num_ranks=4, num_redundant=0)
    assert sorted(placement.physical_to_logical) == list(range(16))
    assert placement.imbalance(ZIPF_16) < initial_placement(16, 4).imbalance(ZIPF_16)


def test_rebalance_is_deterministic() -> None:
    first = rebalance(ZIPF_16, 4, 4)
    assert rebalance(tuple(ZIPF_16), 4, 4) == first
    assert rebalance(list(ZIPF_16), 4, 4) == first


def test_rebalance_ties_go_to_lowest_ids() -> None:
    placement = rebalance([1.0, 1.0, 1.0, 1.0], num_ranks=2, num_redundant=2)
    # Extra replicas go to experts 0 and 1; packed in (load desc, expert, replica) order.
    assert placement.physical_to_logical == (2, 0, 1, 3, 0, 1)
    # With no load at all every extra replica goes to expert 0, spread over the ranks.
    idle = rebalance([0.0] * 4, num_ranks=2, num_redundant=2)
    assert len(idle.replicas(0)) == 3
    assert {idle.rank_of(s) for s in idle.replicas(0)} == {0, 1}


@pytest.mark.parametrize(
    ("loads", "num_ranks", "num_redundant", "match"),
    [
        ([1.0, 2.0, 3.0], 2, 0, "3 \\+ 0.*num_ranks=2"),
        ([1.0, -1.0], 1, 0, "expert 1.*-1.0"),
        ([1.0, float("nan")], 1, 0, "expert 1.*nan"),
        ([1.0, float("inf")], 1, 0, "expert 1.*inf"),
        ([], 1, 0, "num_logical=0"),
        ([1.0, 1.0], 2, -2, "num_redundant=-2"),
        ([1.0, 1.0], 0, 0, "num_ranks=0"),
    ],
)
def test_rebalance_rejects_bad_input(
    loads: list[float], num_ranks: int, num_redundant: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        rebalance(loads, num_ranks, num_redundant)


def test_greedy_can_lose_to_initial_placement() -> None:
    # A known limit of the greedy, kept visible. The initial placement (ranks {0, 1}, {2, 3},
    # {0, 1}) balances these loads perfectly. Rebalance gives expert 0 three copies (the tie
    # with expert 3 at 1.0 per replica goes to the lower id); its third copy must then go to
    # the one rank without it, rank 0, which already holds expert 3.
    loads = [2.0, 0.0, 0.0, 1.0]
    assert initial_placement(4, 3, num_redundant=2).imbalance(loads) == 1.0
    placement = rebalance(loads, num_ranks=3, num_redundant=2)
    assert placement.physical_to_logical == (3, 0, 0, 1, 0, 2)
    assert placement.imbalance(loads) == pytest.approx(5.0 / 3.0)


def random_case(rng: random.Random) -> tuple[list[float], int, int]:
    num_ranks = rng.choice([1, 2, 3, 4, 8])
    num_logical = rng.randint(1, 24)
    num_redundant = rng.choice(
        [r for r in range(3 * num_ranks) if (num_logical + r) % num_ranks == 0]
    )
    kind = rng.choice(["uniform", "zipf", "hot", "small_ints"])
    if kind == "uniform":
        loads = [rng.random() for _ in range(num_logical)]
    elif kind == "zipf":
        loads = [1.0 / (e + 1) ** rng.uniform(0.5, 2.0) for e in range(num_logical)]
        rng.shuffle(loads)
    elif kind == "hot":
        loads = [rng.random() for _ in range(num_logical)]
        loads[rng.randrange(num_logical)] *= 50
    else:
        loads = [float(rng.randint(0, 5)) for _ in range(num_logical)]
    return loads, num_ranks, num_redundant


def test_rebalance_properties_on_random_loads() -> None:
    rng = random.Random(20240611)
    cases = worse = 0
    sum_before = sum_after = 0.0
    for _ in range(400):
        loads, num_ranks, num_redundant = random_case(rng)
        num_logical = len(loads)
        placement = rebalance(loads, num_ranks, num_redundant)
        check_invariants(placement, num_logical, num_ranks, num_redundant)
        assert rebalance(loads, num_ranks, num_redundant) == placement
        if num_redundant == 0:
            assert sorted(placement.physical_to_logical) == list(range(num_logical))

        rank_loads = placement.rank_loads(loads)
        assert sum(rank_loads) == pytest.approx(sum(loads))

        # Step 1 is greedy by load per replica: no expert could take one of another's extra
        # replicas and end up with a higher load per replica than that other expert had.
        counts = [len(placement.replicas(e)) for e in range(num_logical)]
        for b in range(num_logical):
            if counts[b] > 1:
                limit = loads[b] / (counts[b] - 1)
                assert all(loads[a] / counts[a] <= limit for a in range(num_logical))

        # LPT-style bound: the busiest rank exceeds the mean by at most one replica's load.
        # Observed on every case here, not proven under the slot and no-duplicate rules.
        mean = sum(rank_loads) / num_ranks
        biggest = max(loads[e] / counts[e] for e in range(num_logical))
        assert max(rank_loads) <= mean + biggest + 1e-9

        before = initial_placement(num_logical, num_ranks, num_redundant).imbalance(loads)
        after = placement.imbalance(loads)
        cases += 1
        worse += after > before + 1e-9
        sum_before += before
        sum_after += after
    # The greedy is not always at least as good as the initial placement (see
    # test_greedy_can_lose_to_initial_placement), with or without num_redundant >= num_ranks;
    # it loses rarely and by little, and wins by a lot on average.
    print(
        f"{cases} cases: worse in {worse}, mean imbalance {sum_before / cases:.3f} -> "
        f"{sum_after / cases:.3f}"
    )
    assert worse <= cases // 10
    assert sum_after < sum_before


# --- moves and assign_replica ---


def apply_moves(old: ExpertPlacement, plan: list[ExpertMove]) -> tuple[int, ...]:
    slots = list(old.physical_to_logical)
    for slot, expert, source in plan:
        assert old.physical_to_logical[source] == expert
        slots[slot] = expert
    return tuple(slots)


def check_moves(old: ExpertPlacement, new: ExpertPlacement) -> None:
    plan = moves(old, new)
    changed = [
        s for s in range(old.num_slots) if old.physical_to_logical[s] != new.physical_to_logical[s]
    ]
    assert [m.slot for m in plan] == changed
    assert apply_moves(old, plan) == new.physical_to_logical
    for slot, expert, source in plan:
        assert expert == new.physical_to_logical[slot]
        local = [s for s in old.replicas(expert) if old.rank_of(s) == new.rank_of(slot)]
        assert source == (local[0] if local else old.replicas(expert)[0])


def test_moves_from_initial_to_rebalanced() -> None:
    old = initial_placement(16, 4, num_redundant=4)
    new = rebalance(ZIPF_16, 4, 4)
    check_moves(old, new)
    assert moves(old, old) == []
    assert moves(new, new) == []


def test_moves_prefer_a_source_on_the_same_rank() -> None:
    old = ExpertPlacement(3, 2, 2, (0, 1, 2, 0))
    new = ExpertPlacement(3, 2, 2, (0, 0, 2, 1))
    # Slot 1 (rank 0) takes expert 0 from slot 0, not 3; slot 3 (rank 1) takes expert 1 from
    # slot 1, the only copy, on the other rank.
    assert moves(old, new) == [(1, 0, 0), (3, 1, 1)]
    assert moves(new, old) == [(1, 1, 3), (3, 0, 0)]


def test_moves_on_random_placements() -> None:
    rng = random.Random(7)
    for _ in range(200):
        loads, num_ranks, num_redundant = random_case(rng)
        old = initial_placement(len(loads), num_ranks, num_redundant)
        new = rebalance(loads, num_ranks, num_redundant)
        check_moves(old, new)
        check_moves(new, old)
        check_moves(new, rebalance(loads[::-1], num_ranks, num_redundant))


def test_moves_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        moves(initial_placement(8, 4), initial_placement(8, 2))


def test_assign_replica_round_robin() -> None:
    replicas = (3, 7, 12)
    assert [assign_replica(t, replicas) for t in range(7)] == [3, 7, 12, 3, 7, 12, 3]
    spread = Counter(assign_replica(t, replicas) for t in range(300))
    assert spread == {3: 100, 7: 100, 12: 100}
    assert assign_replica(5, [9]) == 9
    with pytest.raises(ValueError, match="none"):
        assign_replica(0, [])
    with pytest.raises(ValueError, match="-1"):
        assign_replica(-1, replicas)


# -- the step-cost planner --------------------------------------------------------------------


def zipf_loads(num_experts: int, steps: int, pairs_per_step: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    rank = list(range(num_experts))
    rng.shuffle(rank)
    weights = [1 / (rank[e] + 1) ** 1.2 for e in range(num_experts)]
    total = sum(weights)
    return [steps * pairs_per_step * w / total for w in weights]


def test_step_cost_counts_expert_reads_not_only_tokens() -> None:
    """Two ranks with equal tokens: four lukewarm experts (one pair per step each) cost more
    reads than one hot expert (four pairs per step) and three idle ones."""
    placement = initial_placement(8, 2)
    loads = [10.0, 10.0, 10.0, 10.0, 40.0, 0.0, 0.0, 0.0]  # over 10 steps
    assert placement.imbalance(loads) == 1.0  # token-balanced
    cost = step_cost(placement, loads, steps=10)
    assert cost.rank_costs[0] == pytest.approx(4 * (1 - math.exp(-1)) + 4 * PAIR_COST)
    assert cost.rank_costs[1] == pytest.approx(1 - math.exp(-4) + 4 * PAIR_COST)
    # The token packer sees nothing to fix; the step-cost planner moves experts.
    new = plan_incremental(placement, loads, steps=10)
    assert step_cost(new, loads, 10).max < cost.max
    assert len(moves(placement, new)) <= placement.num_slots // 4


@pytest.mark.parametrize(
    "num_experts,num_ranks,redundant", [(8, 2, 2), (64, 4, 4), (128, 8, 8), (256, 8, 32)]
)
def test_plan_incremental_lowers_step_cost_with_few_copies(
    num_experts: int, num_ranks: int, redundant: int
) -> None:
    loads = zipf_loads(num_experts, 100, 64, seed=num_experts)
    current = initial_placement(num_experts, num_ranks, redundant)
    new = plan_incremental(current, loads, 100)
    before, after = step_cost(current, loads, 100), step_cost(new, loads, 100)
    assert after.max < before.max
    assert len(moves(current, new)) <= current.num_slots // 4
    # No rank holds two copies of one expert; every expert keeps a replica (the constructor).
    for r in range(num_ranks):
        held = [new.physical_to_logical[p] for p in new.local_slots(r)]
        assert len(held) == len(set(held))
    assert plan_incremental(current, loads, 100) == new  # deterministic
    # Planning again from the result: nothing left that helps, or only a smaller gain.
    again = plan_incremental(new, loads, 100)
    assert step_cost(again, loads, 100).max <= after.max


def test_plan_incremental_keeps_a_balanced_placement_and_respects_the_budget() -> None:
    current = initial_placement(16, 4)
    assert plan_incremental(current, [5.0] * 16, 10) is current
    loads = zipf_loads(16, 10, 32, seed=1)
    assert plan_incremental(current, loads, 10, max_copies=0) is current
    one_swap = plan_incremental(current, loads, 10, max_copies=2)
    assert len(moves(current, one_swap)) <= 2
    with pytest.raises(ValueError, match="max_copies"):
        plan_incremental(current, loads, 10, max_copies=-1)
    with pytest.raises(ValueError, match="loads"):
        plan_incremental(current, loads[:3], 10)
