"""Expert-parallel load balancing (EPLB): which rank holds which MoE expert; no device code.

With expert parallelism each of `num_ranks` ranks holds `slots_per_rank` physical expert slots.
Every logical expert of the model has at least one slot; the spare slots hold redundant copies
of hot experts so that their tokens can be spread over several ranks. `rebalance` turns the
observed per-expert load into a new placement, `moves` says which weights to copy to get there,
and `assign_replica` picks the copy a token is routed to. Everything here is plain Python and
deterministic, so every rank computes the same placement from the same loads.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple


@dataclass(frozen=True)
class ExpertPlacement:
    """Where every physical expert slot lives and which logical expert it holds.

    `num_ranks` ranks each hold `slots_per_rank` physical slots; physical slot p lives on rank
    p // slots_per_rank and holds logical expert physical_to_logical[p]. Every logical expert
    has at least one slot; the extra `num_slots - num_logical` slots are redundant copies.
    Construction validates all of this and raises `ValueError` naming the bad value.
    """

    num_logical: int
    num_ranks: int
    slots_per_rank: int
    physical_to_logical: tuple[int, ...]

    def __post_init__(self) -> None:
        # A list passed by the caller would make the frozen placement unhashable.
        object.__setattr__(self, "physical_to_logical", tuple(self.physical_to_logical))
        if self.num_logical < 1:
            raise ValueError(
                f"need at least one logical expert, got num_logical={self.num_logical}"
            )
        if self.num_ranks < 1:
            raise ValueError(f"need at least one rank, got num_ranks={self.num_ranks}")
        if self.slots_per_rank < 1:
            raise ValueError(f"need at least one slot per rank, got {self.slots_per_rank=}")
        if len(self.physical_to_logical) != self.num_ranks * self.slots_per_rank:
            raise ValueError(
                f"physical_to_logical has {len(self.physical_to_logical)} entries, expected "
                f"num_ranks * slots_per_rank = {self.num_ranks} * {self.slots_per_rank}"
            )
        for p, e in enumerate(self.physical_to_logical):
            if not 0 <= e < self.num_logical:
                raise ValueError(
                    f"slot {p} holds logical expert {e}, outside [0, {self.num_logical})"
                )
        missing = set(range(self.num_logical)) - set(self.physical_to_logical)
        if missing:
            raise ValueError(f"logical experts {sorted(missing)} have no physical slot")

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots_per_rank

    @cached_property
    def logical_to_physical(self) -> tuple[tuple[int, ...], ...]:
        """For each logical expert, the physical slots holding it, ascending."""
        slots: list[list[int]] = [[] for _ in range(self.num_logical)]
        for p, e in enumerate(self.physical_to_logical):
            slots[e].append(p)
        return tuple(tuple(s) for s in slots)

    def replicas(self, logical: int) -> tuple[int, ...]:
        """The physical slots holding logical expert `logical`, ascending."""
        if not 0 <= logical < self.num_logical:
            raise ValueError(f"logical expert {logical} outside [0, {self.num_logical})")
        return self.logical_to_physical[logical]

    def rank_of(self, physical: int) -> int:
        if not 0 <= physical < self.num_slots:
            raise ValueError(f"physical slot {physical} outside [0, {self.num_slots})")
        return physical // self.slots_per_rank

    def local_slots(self, rank: int) -> range:
        """The physical slots that live on `rank`."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} outside [0, {self.num_ranks})")
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def rank_loads(self, logical_loads: Sequence[float]) -> list[float]:
        """Expected load per rank, each logical expert's load split evenly over its replicas."""
        _check_loads(logical_loads)
        if len(logical_loads) != self.num_logical:
            raise ValueError(
                f"got {len(logical_loads)} loads for a placement of {self.num_logical} experts"
            )
        per_replica = [
            logical_loads[e] / len(self.logical_to_physical[e]) for e in range(self.num_logical)
        ]
        loads = [0.0] * self.num_ranks
        for p, e in enumerate(self.physical_to_logical):
            loads[p // self.slots_per_rank] += per_replica[e]
        return loads

    def imbalance(self, logical_loads: Sequence[float]) -> float:
        """max(rank load) / mean(rank load): 1.0 is perfect balance, and so is no load at all."""
        loads = self.rank_loads(logical_loads)
        total = sum(loads)
        if total == 0:
            return 1.0
        return max(loads) / (total / self.num_ranks)


class ExpertMove(NamedTuple):
    """Copy `logical_expert`'s weights from `source_slot` of the old placement into `slot`."""

    slot: int
    logical_expert: int
    source_slot: int


def initial_placement(num_logical: int, num_ranks: int, num_redundant: int = 0) -> ExpertPlacement:
    """The placement before any load is known: logical expert e in slot e, then the redundant
    slots holding experts 0, 1, 2, ... round robin."""
    _check_shape(num_logical, num_ranks, num_redundant)
    num_slots = num_logical + num_redundant
    return ExpertPlacement(
        num_logical=num_logical,
        num_ranks=num_ranks,
        slots_per_rank=num_slots // num_ranks,
        physical_to_logical=tuple(p % num_logical for p in range(num_slots)),
    )


def rebalance(
    logical_loads: Sequence[float], num_ranks: int, num_redundant: int
) -> ExpertPlacement:
    """A placement for `len(logical_loads)` experts that spreads the given loads over the ranks.

    1. Replicas: every expert starts with one; each of the `num_redundant` extra replicas goes,
       one at a time, to the expert with the highest load per replica (ties: lowest expert id).
    2. Packing: the replicas, each carrying load / replicas, sorted by that load descending
       (ties: expert id, then replica index), go one by one to the least-loaded rank with a free
       slot that does not already hold the expert; only when every rank with a free slot holds
       it does a rank get a second copy (ties: lowest rank). A rank's slots are in assignment
       order.

    Greedy, so not optimal: the result can be less balanced than `initial_placement` for some
    loads (see tests/engine/test_eplb.py). Deterministic: same loads, same placement.
    """
    _check_loads(logical_loads)
    num_logical = len(logical_loads)
    _check_shape(num_logical, num_ranks, num_redundant)
    slots_per_rank = (num_logical + num_redundant) // num_ranks

    counts = [1] * num_logical
    for _ in range(num_redundant):
        # max() keeps the first of equal keys, which is the lowest expert id.
        hottest = max(range(num_logical), key=lambda e: logical_loads[e] / counts[e])
        counts[hottest] += 1

    items = sorted(
        (
            (logical_loads[e] / counts[e], e, r)
            for e in range(num_logical)
            for r in range(counts[e])
        ),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    rank_experts: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    for load, e, _ in items:
        open_ranks = [r for r in range(num_ranks) if len(rank_experts[r]) < slots_per_rank]
        fresh = [r for r in open_ranks if e not in rank_experts[r]]
        rank = min(fresh or open_ranks, key=lambda r: (rank_load[r], r))
        rank_experts[rank].append(e)
        rank_load[rank] += load

    return ExpertPlacement(
        num_logical=num_logical,
        num_ranks=num_ranks,
        slots_per_rank=slots_per_rank,
        physical_to_logical=tuple(e for experts in rank_experts for e in experts),
    )


# A (token, expert) pair costs this fraction of one read of an expert's weights: the pair's
# matmul FLOPs over the device's FLOP rate, against the weights' bytes over its memory
# bandwidth (6 H I of each: the ridge point, about 200 on an H200), plus its all-to-all bytes.
PAIR_COST = 1 / 100


@dataclass(frozen=True)
class StepCost:
    """The planner's model of one decode step, per rank, in units of one expert weight read.

    A slot costs `P(active) + PAIR_COST * pairs` per step, where its replica receives `pairs =
    load / steps / replicas` pairs on average (tokens spread evenly over an expert's replicas)
    and `P(active) = 1 - exp(-pairs)` (Poisson arrivals) is the chance it gets any, i.e. that
    the step reads its weights. A rank's cost is the sum over its slots; the step waits for the
    costliest rank. With no step count (`steps == 0`) every slot counts as active.
    """

    rank_costs: tuple[float, ...]

    @property
    def max(self) -> float:
        return max(self.rank_costs)

    @property
    def mean(self) -> float:
        return sum(self.rank_costs) / len(self.rank_costs)


def _slot_cost(load: float, replicas: int, steps: int) -> float:
    if steps <= 0:
        return 1.0 + PAIR_COST * load / replicas
    pairs = load / steps / replicas
    return -math.expm1(-pairs) + PAIR_COST * pairs


def step_cost(placement: ExpertPlacement, logical_loads: Sequence[float], steps: int) -> StepCost:
    """`StepCost` of `placement` for `logical_loads` counted over `steps` steps."""
    _check_loads(logical_loads)
    if len(logical_loads) != placement.num_logical:
        raise ValueError(
            f"got {len(logical_loads)} loads for a placement of {placement.num_logical} experts"
        )
    costs = [0.0] * placement.num_ranks
    for p, e in enumerate(placement.physical_to_logical):
        replicas = len(placement.logical_to_physical[e])
        costs[placement.rank_of(p)] += _slot_cost(logical_loads[e], replicas, steps)
    return StepCost(tuple(costs))


def plan_incremental(
    current: ExpertPlacement,
    logical_loads: Sequence[float],
    steps: int,
    max_copies: int | None = None,
) -> ExpertPlacement:
    """A placement near `current` with a lower expected step cost (`step_cost`), reached by at
    most `max_copies` slot weight copies (default: a quarter of the slots).

    Local search from `current`, one move at a time, each the best of:
    - swap the experts of a slot on the costliest rank and a slot on one of the two cheapest
      ranks (2 copies);
    - re-point a redundant replica (of an expert with two or more) at another expert that is
      not on that rank yet (1 copy): a hot expert gains a replica, a cool one gives it up.
    A move is taken only if it lowers the costliest rank's cost, or keeps it and lowers the
    sum of squared rank costs; no move puts two copies of an expert on one rank. Returns
    `current` itself when nothing helps. Deterministic: every rank plans alike.
    """
    _check_loads(logical_loads)
    if len(logical_loads) != current.num_logical:
        raise ValueError(
            f"got {len(logical_loads)} loads for a placement of {current.num_logical} experts"
        )
    budget = current.num_slots // 4 if max_copies is None else max_copies
    if budget < 0:
        raise ValueError(f"max_copies must be >= 0, got {max_copies}")
    spr, num_ranks = current.slots_per_rank, current.num_ranks
    experts = list(current.physical_to_logical)  # slot -> logical expert, edited in place
    slots_of: list[list[int]] = [list(r) for r in current.logical_to_physical]
    # Copies of each expert per rank (a placement may start with two on one rank).
    on_rank = [Counter(experts[r * spr : (r + 1) * spr]) for r in range(num_ranks)]

    def cost_of(e: int, n: int) -> float:
        return _slot_cost(logical_loads[e], n, steps)

    def rank_costs() -> list[float]:
        costs = [0.0] * num_ranks
        for p, e in enumerate(experts):
            costs[p // spr] += cost_of(e, len(slots_of[e]))
        return costs

    def score(costs: list[float]) -> tuple[float, float]:
        return (max(costs), sum(c * c for c in costs))

    def swap_trial(costs: list[float], a: int, b: int) -> list[float] | None:
        ea, eb, ra, rb = experts[a], experts[b], a // spr, b // spr
        if ra == rb or ea == eb or on_rank[ra][eb] or on_rank[rb][ea]:
            return None
        ca, cb = cost_of(ea, len(slots_of[ea])), cost_of(eb, len(slots_of[eb]))
        trial = list(costs)
        trial[ra] += cb - ca
        trial[rb] += ca - cb
        return trial

    def repoint_trial(costs: list[float], slot: int, new: int) -> list[float]:
        old, rank = experts[slot], slot // spr
        n_old, n_new = len(slots_of[old]), len(slots_of[new])
        trial = list(costs)
        before, after = cost_of(old, n_old), cost_of(old, n_old - 1)
        for p in slots_of[old]:
            trial[p // spr] += -before if p == slot else after - before
        before, after = cost_of(new, n_new), cost_of(new, n_new + 1)
        for p in slots_of[new]:
            trial[p // spr] += after - before
        trial[rank] += after
        return trial

    copies = 0
    costs = rank_costs()
    while copies < budget:
        best: tuple[tuple[float, float], str, int, int] | None = None
        hot = max(range(num_ranks), key=lambda r: (costs[r], -r))
        # Swap partners on the two cheapest ranks only: it keeps a plan for hundreds of slots
        # under a second and loses little (the hot rank's cost must go somewhere cheap).
        cool = sorted(range(num_ranks), key=lambda r: (costs[r], r))[:2]
        partners = [b for r in cool if r != hot for b in range(r * spr, (r + 1) * spr)]
        if copies + 2 <= budget:
            for a in range(hot * spr, (hot + 1) * spr):
                for b in partners:
                    trial = swap_trial(costs, a, b)
                    if trial is not None and (best is None or score(trial) < best[0]):
                        best = (score(trial), "swap", a, b)
        # The experts most worth another replica: the highest load per replica.
        targets = sorted(
            range(current.num_logical), key=lambda e: (-logical_loads[e] / len(slots_of[e]), e)
        )[:8]
        for slot in range(current.num_slots):
            if len(slots_of[experts[slot]]) < 2:
                continue
            for new in targets:
                if new == experts[slot] or on_rank[slot // spr][new]:
                    continue
                trial = repoint_trial(costs, slot, new)
                if best is None or score(trial) < best[0]:
                    best = (score(trial), "repoint", slot, new)
        if best is None or not _better(best[0], score(costs)):
            break
        _, kind, x, y = best
        if kind == "swap":
            ex, ey = experts[x], experts[y]
            _move(experts, slots_of, on_rank, spr, x, ey)
            _move(experts, slots_of, on_rank, spr, y, ex)
            copies += 2
        else:
            _move(experts, slots_of, on_rank, spr, x, y)
            copies += 1
        costs = rank_costs()
    if tuple(experts) == current.physical_to_logical:
        return current
    return ExpertPlacement(current.num_logical, num_ranks, spr, tuple(experts))


def _move(
    experts: list[int],
    slots_of: list[list[int]],
    on_rank: list[Counter[int]],
    spr: int,
    slot: int,
    new: int,
) -> None:
    """Put logical expert `new` in `slot`, keeping the indexes in step."""
    old, rank = experts[slot], slot // spr
    slots_of[old].remove(slot)
    on_rank[rank][old] -= 1
    experts[slot] = new
    slots_of[new].append(slot)
    slots_of[new].sort()
    on_rank[rank][new] += 1


def _better(new: tuple[float, float], old: tuple[float, float]) -> bool:
    """Lower max, or the same max (to rounding) and a lower sum of squares."""
    tol = 1e-9 * max(1.0, old[0])
    if new[0] < old[0] - tol:
        return True
    return new[0] <= old[0] + tol and new[1] < old[1] - tol * max(1.0, old[1])


def moves(old: ExpertPlacement, new: ExpertPlacement) -> list[ExpertMove]:
    """The weight copies that turn `old` into `new`, one per slot whose logical expert changes,
    in slot order.

    Each source slot holds the expert in `old` (preferring one on the destination's rank, then
    the lowest slot). A source may itself be overwritten by another move, so copy from a
    snapshot of the old weights (or stage all copies before writing any).
    """
    if (old.num_logical, old.num_ranks, old.slots_per_rank) != (
        new.num_logical,
        new.num_ranks,
        new.slots_per_rank,
    ):
        raise ValueError(
            "placements differ in shape: old has (num_logical, num_ranks, slots_per_rank) = "
            f"{(old.num_logical, old.num_ranks, old.slots_per_rank)}, new has "
            f"{(new.num_logical, new.num_ranks, new.slots_per_rank)}"
        )
    result = []
    for slot, (before, after) in enumerate(
        zip(old.physical_to_logical, new.physical_to_logical, strict=True)
    ):
        if before == after:
            continue
        sources = old.replicas(after)
        rank = new.rank_of(slot)
        local = [s for s in sources if old.rank_of(s) == rank]
        result.append(ExpertMove(slot, after, (local or list(sources))[0]))
    return result


def assign_replica(token_index: int, replicas: Sequence[int]) -> int:
    """The physical slot token `token_index` is routed to among an expert's `replicas`:
    round robin, so consecutive tokens spread evenly and every rank agrees."""
    if not replicas:
        raise ValueError("an expert needs at least one replica, got none")
    if token_index < 0:
        raise ValueError(f"token_index must be >= 0, got {token_index}")
    return replicas[token_index % len(replicas)]


def _check_shape(num_logical: int, num_ranks: int, num_redundant: int) -> None:
    if num_logical < 1:
        raise ValueError(f"need at least one logical expert, got num_logical={num_logical}")
    if num_ranks < 1:
        raise ValueError(f"need at least one rank, got num_ranks={num_ranks}")
    if num_redundant < 0:
        raise ValueError(f"num_redundant must be >= 0, got num_redundant={num_redundant}")
    if (num_logical + num_redundant) % num_ranks != 0:
        raise ValueError(
            f"num_logical + num_redundant = {num_logical} + {num_redundant} slots do not split "
            f"evenly over num_ranks={num_ranks}"
        )


def _check_loads(logical_loads: Sequence[float]) -> None:
    for e, load in enumerate(logical_loads):
        if not (math.isfinite(load) and load >= 0):
            raise ValueError(f"load of expert {e} must be finite and >= 0, got {load}")
