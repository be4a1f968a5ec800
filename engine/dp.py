"""The lockstep loop of a data-parallel, expert-parallel instance.

Every rank runs its own `Engine` (its requests, its KV pool, its share of the experts). Each
iteration, on every rank at once:

1. rank 0 broadcasts the commands it has queued (add a request to rank r, reserve pages for
   a transfer on rank r, abort, rebalance the experts, ...);
2. each rank runs the commands addressed to it (or to all);
3. if any rank has work, every rank steps; an idle rank runs the model on no tokens so that
   the MoE all-to-alls pair up;
4. rank 0 gathers every rank's command results, step outputs and load.

A rank that dies makes the next collective fail on the others (the group has a timeout), so
the instance stops instead of hanging.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.engine import Engine, StepOutput
from engine.eplb import plan_incremental, step_cost
from engine.layers.ep_moe import global_load

log = logging.getLogger(__name__)

ALL_RANKS = -1


@dataclass(frozen=True)
class Command:
    """`engine.<op>(*args)` on rank `rank` (or every rank for ALL_RANKS); `cid` names it."""

    cid: int
    rank: int
    op: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class CommandResult:
    cid: int
    rank: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class RankLoad:
    rank: int
    num_running: int
    num_waiting: int
    num_transferring: int
    num_free_pages: int
    num_total_pages: int
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0


@dataclass
class Iteration:
    """What rank 0 learns from one iteration (other ranks get an empty one)."""

    results: list[CommandResult] = field(default_factory=list)
    outputs: list[tuple[int, StepOutput]] = field(default_factory=list)  # (rank, output)
    loads: list[RankLoad] = field(default_factory=list)
    stop: bool = False


def _load(engine: Engine) -> RankLoad:
    s = engine.scheduler
    return RankLoad(
        rank=engine.parallel.rank,
        num_running=s.num_running,
        num_waiting=s.num_waiting,
        num_transferring=len(s.transferring),
        num_free_pages=engine.num_free_pages,
        num_total_pages=engine.pool.num_pages,
        prefix_hit_tokens=engine.cache.hit_tokens if engine.cache else 0,
        prefix_query_tokens=engine.cache.query_tokens if engine.cache else 0,
    )


def rebalance_experts(engine: Engine) -> dict[str, tuple[float, float]]:
    """EPLB on every MoE layer (a collective): from the routing counts since the last
    rebalance, `plan_incremental` moves a few experts so that the expected decode step cost
    (`step_cost`: each active expert slot is a full read of its weights, plus a little per
    token) evens out over the ranks; weights move between ranks; counters reset. Returns, per
    layer, the costliest rank's expected cost before and after, each over the mean rank cost
    before (so 1.0 is a perfectly even step, and after < before is a faster one)."""
    report = {}
    for name, layer in engine.runner.ep_layers.items():
        loads = global_load(layer)
        steps = int(layer.steps)
        before = step_cost(layer.placement, loads, steps)
        new = plan_incremental(layer.placement, loads, steps)
        after = step_cost(new, loads, steps)
        if new != layer.placement:
            layer.apply_placement(new)  # every rank decides alike: same loads, same plan
        layer.load.zero_()
        layer.steps.zero_()
        mean = before.mean or 1.0
        report[name] = (before.max / mean, after.max / mean)
    return report


def expert_imbalance(engine: Engine) -> dict[str, tuple[float, float]]:
    """Per MoE layer, the current placement's costliest rank over the mean rank (expected decode
    step cost, `step_cost`, since the last rebalance; a collective; the same number twice, in
    `rebalance_experts`' shape)."""
    report = {}
    for name, layer in engine.runner.ep_layers.items():
        cost = step_cost(layer.placement, global_load(layer), int(layer.steps))
        imbalance = cost.max / cost.mean if cost.mean else 1.0
        report[name] = (imbalance, imbalance)
    return report


def expert_loads(engine: Engine) -> dict[str, list[int]]:
    """Routing counts per logical expert of every MoE layer, over all ranks (a collective)."""
    return {name: global_load(layer) for name, layer in engine.runner.ep_layers.items()}


# Ops every rank must run together (they are collectives).
_GLOBAL_OPS: dict[str, Callable[[Engine], Any]] = {
    "rebalance_experts": rebalance_experts,
    "expert_loads": expert_loads,
    "expert_imbalance": expert_imbalance,
}


class LockstepRank:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rank = engine.parallel.rank
        self.world = engine.parallel.ep_size

    def iterate(
        self,
        commands: list[Command] | None = None,
        stop: bool = False,
        early: Callable[[list[CommandResult]], object] | None = None,
    ) -> Iteration:
        """One lockstep iteration (a collective). Rank 0 passes its commands; others None.
        `early` (rank 0): called with rank 0's command results before the step runs, so that
        a caller waiting on one (a hand-off's first token, an abort) need not wait for the
        step; the returned iteration lists them again."""
        message: list[Any] = [(commands or [], stop)] if self.rank == 0 else [None]
        if self.world > 1:
            dist.broadcast_object_list(message, src=0)
        cmds, stop = message[0]
        if stop:
            return Iteration(stop=True)
        results = [self._run(c) for c in cmds if c.rank in (self.rank, ALL_RANKS)]
        if early is not None and results and self.rank == 0:
            early(results)
        has_work = torch.tensor([int(self.engine.has_work())])
        if self.world > 1:
            # gloo reduces host tensors; NCCL and HCCL only their device's.
            if dist.get_backend() != "gloo":
                has_work = has_work.to(self.engine.device.torch_device)
            dist.all_reduce(has_work, op=dist.ReduceOp.MAX)
        outputs = self.engine.step(idle_forward=self.world > 1) if has_work.item() else []
        mine = (results, [(self.rank, o) for o in outputs], _load(self.engine))
        if self.world == 1:
            return Iteration(mine[0], mine[1], [mine[2]])
        gathered: list[Any] = [None] * self.world if self.rank == 0 else []
        dist.gather_object(mine, gathered if self.rank == 0 else None, dst=0)
        if self.rank != 0:
            return Iteration()
        it = Iteration()
        for res, outs, load in gathered:
            it.results.extend(res)
            it.outputs.extend(outs)
            it.loads.append(load)
        return it

    def _run(self, cmd: Command) -> CommandResult:
        try:
            if cmd.op in _GLOBAL_OPS:
                value = _GLOBAL_OPS[cmd.op](self.engine)
            else:
                value = getattr(self.engine, cmd.op)(*cmd.args)
            return CommandResult(cmd.cid, self.rank, value)
        except Exception as exc:  # travels back to the caller on rank 0
            return CommandResult(cmd.cid, self.rank, error=exc)

    def serve_forever(self) -> None:
        """Ranks other than 0: follow rank 0's iterations until it says stop."""
        while not self.iterate().stop:
            pass
