"""One MoE layer in decode: FusedExperts (EP 1) beside ExpertParallelExperts over N CPU processes.

    python -m bench.moe                                  # hidden 1024, moe_intermediate 512,
                                                         # 32 experts, top-8; EP 1, 2, 4
    python -m bench.moe --ep-sizes 1,2 --batch-sizes 16 --steps 20    # a quick run

Each EP size runs as that many spawned processes (gloo over 127.0.0.1, one torch thread each);
EP 1 is one process calling `FusedExperts` directly. Every rank decodes B tokens per step (B is
per rank, so an EP N step carries N * B tokens). Inputs are seeded: step s draws the same
hidden states and router logits for the same global token rows whatever the EP size, routed by
`select_experts` (softmax top-k, renormalised) outside the timed call. Weights are float32,
seeded per logical expert, so every placement holds the same experts.

1. Layer time: the median (and p90) of `--steps` forward calls after `--warmup`, on rank 0,
   each after a barrier. All-to-all traffic is counted by wrapping `dist.all_to_all_single` in
   the rank processes during the timed calls: the bytes each rank sends to and receives from
   other ranks (its own chunk is a local copy), split into hidden-state rows (dispatch and
   combine) and the small tensors (counts, slot ids, routing weights). The EP N output of one
   step, gathered to rank 0, is checked against FusedExperts on the same N * B tokens.
2. EPLB: a Zipf-skewed router (`--skew`) on EP 2 and 4 with N and 2N redundant slots. K steps
   accumulate `load`; `engine.dp.rebalance_experts` runs on the layer (rebalance, then
   `apply_placement` if the plan lowers the imbalance); K more steps follow. Rows per rank are
   measured from the dispatch (each rank's received (token, expert) rows).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.args import int_list
from engine.device import resolve_device
from engine.dp import rebalance_experts
from engine.engine import Engine
from engine.eplb import ExpertPlacement, initial_placement, moves
from engine.layers.ep_moe import ExpertParallelExperts, global_load
from engine.layers.moe import FusedExperts, select_experts
from engine.parallel import ParallelConfig, init_process_group

RESULT_TIMEOUT_S = 900.0
CHECK_ATOL = 1e-5


@dataclass(frozen=True)
class MoEShape:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    seed: int

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "experts", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")

    @property
    def row_bytes(self) -> int:
        return self.hidden * torch.finfo(torch.float32).bits // 8


@dataclass(frozen=True)
class StepInputs:
    x: torch.Tensor  # [T, H]
    weights: torch.Tensor  # [T, k]
    ids: torch.Tensor  # [T, k]


def zipf_bias(shape: MoEShape, skew: float) -> torch.Tensor:
    """Router-logit bias `-skew * log(popularity rank + 1)`; the ranks are a seeded shuffle, so
    the hot experts sit anywhere in the initial placement."""
    perm = torch.randperm(shape.experts, generator=torch.Generator().manual_seed(shape.seed))
    bias = torch.empty(shape.experts)
    bias[perm] = -skew * torch.log(torch.arange(1, shape.experts + 1, dtype=torch.float32))
    return bias


def step_inputs(
    shape: MoEShape, step: int, num_tokens: int, rows: slice, skew: float
) -> StepInputs:
    """Step `step`'s `rows` out of `num_tokens` global tokens (the same draw for every EP size
    as long as `num_tokens` is the same)."""
    g = torch.Generator().manual_seed(shape.seed * 1_000_003 + step)
    x = torch.randn(num_tokens, shape.hidden, generator=g)
    logits = torch.randn(num_tokens, shape.experts, generator=g)
    if skew:
        logits += zipf_bias(shape, skew)
    weights, ids = select_experts(logits[rows], shape.top_k, renormalize=True)
    return StepInputs(x[rows].contiguous(), weights, ids)


def load_experts(experts: FusedExperts, shape: MoEShape, logical: Sequence[int]) -> None:
    """Slot s of `experts` gets logical expert `logical[s]`'s seeded weights."""
    for s, e in enumerate(logical):
        g = torch.Generator().manual_seed(shape.seed * 1_000_003 + 500_000 + e)
        w13 = torch.randn(2 * shape.intermediate, shape.hidden, generator=g)
        w2 = torch.randn(shape.hidden, shape.intermediate, generator=g)
        experts.w13[s].copy_(w13 / math.sqrt(shape.hidden))
        experts.w2[s].copy_(w2 / math.sqrt(shape.intermediate))


def full_experts(shape: MoEShape) -> FusedExperts:
    experts = FusedExperts(shape.experts, shape.hidden, shape.intermediate)
    load_experts(experts, shape, range(shape.experts))
    return experts


def ep_layer(shape: MoEShape, parallel: ParallelConfig) -> ExpertParallelExperts:
    placement = initial_placement(shape.experts, parallel.ep_size, parallel.num_redundant_experts)
    layer = ExpertParallelExperts(
        shape.experts, shape.hidden, shape.intermediate, parallel, placement
    )
    mine = placement.local_slots(parallel.rank)
    load_experts(layer.local, shape, [placement.physical_to_logical[p] for p in mine])
    return layer


@dataclass
class Traffic:
    """What one rank's all-to-alls did over some forward calls."""

    calls: int = 0
    hidden_bytes: int = 0  # hidden-state rows to and from other ranks
    small_bytes: int = 0  # counts, slot ids, routing weights to and from other ranks
    a2a_s: float = 0.0  # wall time inside all_to_all_single, waiting for peers included
    compute_s: float = 0.0  # time in the layer's local expert computation
    rows_per_step: list[int] = field(default_factory=list)  # (token, expert) pairs received
    slot_ids: list[torch.Tensor] = field(default_factory=list)  # per step, the local slot ids

    @property
    def slots_per_step(self) -> list[int]:
        """Local slots that ran at least one row, per step: in decode each is a full read of
        that expert's weights."""
        return [int(s[s >= 0].unique().numel()) for s in self.slot_ids]


@contextmanager
def instrumented(layer: ExpertParallelExperts, traffic: Traffic) -> Iterator[None]:
    """Count and time `dist.all_to_all_single` and the layer's `_compute` (this process only)."""
    original_a2a, original_compute = dist.all_to_all_single, layer._compute
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden_size = layer.local.w13.shape[2]

    def a2a(
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
        group: Any = None,
        async_op: bool = False,
    ) -> Any:
        start = time.perf_counter()
        result = original_a2a(
            output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
        )
        traffic.a2a_s += time.perf_counter() - start
        sent = input_split_sizes or [input.shape[0] // world] * world
        received = output_split_sizes or [output.shape[0] // world] * world
        row_bytes = input.element_size() * math.prod(input.shape[1:])
        remote = (sum(sent) - sent[rank] + sum(received) - received[rank]) * row_bytes
        traffic.calls += 1
        if input.is_floating_point() and input.dim() == 2 and input.shape[1] == hidden_size:
            traffic.hidden_bytes += remote
        else:
            traffic.small_bytes += remote
        return result

    def compute(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = original_compute(rows, slots, weights)
        traffic.compute_s += time.perf_counter() - start
        traffic.slot_ids.append(slots)
        # A received row carries its token's choices on this rank (-1 elsewhere).
        traffic.rows_per_step.append(int((slots >= 0).sum()))
        return out

    with (
        mock.patch.object(dist, "all_to_all_single", a2a),
        mock.patch.object(layer, "_compute", compute),
    ):
        yield


def dedup_rows(layer: ExpertParallelExperts, ids: torch.Tensor) -> int:
    """Hidden rows this rank sends if each token goes once to each other rank that holds one of
    its experts (routing as the layer does: replica by token index offset by rank)."""
    num_tokens, top_k = ids.shape
    flat = ids.flatten()
    token_of = torch.arange(num_tokens).repeat_interleave(top_k)
    spread = token_of + layer.parallel.rank
    slot = layer.replica_table[flat, spread % layer.replica_count[flat]]
    dest = slot // layer.placement.slots_per_rank
    pairs = torch.unique(token_of * layer.parallel.ep_size + dest)
    return int((pairs % layer.parallel.ep_size != layer.parallel.rank).sum())


Forward = Callable[[StepInputs], torch.Tensor]


def timed_steps(forward: Forward, inputs: Sequence[StepInputs], world: int) -> list[float]:
    seconds = []
    for step in inputs:
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        forward(step)
        seconds.append(time.perf_counter() - start)
    return seconds


def check_against_reference(
    layer: ExpertParallelExperts,
    reference: FusedExperts | None,
    shape: MoEShape,
    step: int,
    num_tokens: int,
    batch: int,
    skew: float,
) -> float | None:
    """Max |EP output - FusedExperts output| over one step's N * B tokens (rank 0; else None)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = step_inputs(shape, step, num_tokens, slice(rank * batch, (rank + 1) * batch), skew)
    out = layer(mine.x, mine.weights, mine.ids)
    gathered = [torch.empty_like(out) for _ in range(world)] if rank == 0 else None
    dist.gather(out, gathered, dst=0)
    if gathered is None or reference is None:
        return None
    every = step_inputs(shape, step, num_tokens, slice(0, world * batch), skew)
    expected = reference(every.x, every.weights, every.ids)
    return float((torch.cat(gathered) - expected).abs().max())


@dataclass(frozen=True)
class TimingRow:
    ep: int
    batch: int
    seconds: list[float]  # rank 0's forward calls
    a2a_ms: float  # rank 0, mean per step
    experts_ms: float  # rank 0, mean per step
    slots: float  # expert slots run per rank per step, mean
    calls: float  # all-to-all calls per step
    hidden_bytes: float  # per step per rank, mean over ranks
    dedup_bytes: float  # hidden bytes when rows go once per (token, rank), combined likewise
    small_bytes: float
    max_err: float | None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1e3

    @property
    def p90_ms(self) -> float:
        return sorted(self.seconds)[int(0.9 * (len(self.seconds) - 1))] * 1e3

    def row(self) -> str:
        tokens = self.ep * self.batch
        check = "ref" if self.max_err is None else "ok" if self.max_err <= CHECK_ATOL else "FAIL"
        err = "" if self.max_err is None else f" ({self.max_err:.0e})"
        mean_ms = statistics.mean(self.seconds) * 1e3
        rest = mean_ms - self.a2a_ms - self.experts_ms
        split = f"{self.a2a_ms:.1f} / {self.experts_ms:.1f} / {rest:.1f}"
        return (
            f"| {self.ep} | {self.batch} | {tokens} | {self.median_ms:.2f} | {self.p90_ms:.2f} "
            f"| {tokens / self.median_ms * 1e3:,.0f} | {split} | {self.slots:.1f} "
            f"| {self.calls:.0f} | {self.hidden_bytes / 1024:,.1f} "
            f"| {self.dedup_bytes / 1024:,.1f} | {self.small_bytes / 1024:,.2f} "
            f"| {check}{err} |"
        )


@dataclass(frozen=True)
class TimingJob:
    shape: MoEShape
    batches: tuple[int, ...]
    steps: int
    warmup: int
    max_ep: int

    def inputs(self, rank: int, batch: int) -> list[StepInputs]:
        mine = slice(rank * batch, (rank + 1) * batch)
        return [
            step_inputs(self.shape, s, self.max_ep * batch, mine, 0.0)
            for s in range(self.warmup + self.steps)
        ]

    def run(self, rank: int, world: int) -> list[TimingRow] | None:
        if world == 1:
            return self._run_fused()
        layer = ep_layer(self.shape, ParallelConfig(world, rank))
        reference = full_experts(self.shape) if rank == 0 else None
        rows: list[TimingRow] = []
        for batch in self.batches:
            inputs = self.inputs(rank, batch)
            err = check_against_reference(
                layer, reference, self.shape, 0, self.max_ep * batch, batch, 0.0
            )

            def forward(step: StepInputs) -> torch.Tensor:
                return layer(step.x, step.weights, step.ids)

            timed_steps(forward, inputs[: self.warmup], world)
            traffic = Traffic()
            with instrumented(layer, traffic):
                seconds = timed_steps(forward, inputs[self.warmup :], world)
            dedup = sum(dedup_rows(layer, step.ids) for step in inputs[self.warmup :])
            mine = (traffic.hidden_bytes, traffic.small_bytes, dedup, sum(traffic.slots_per_step))
            per_rank: list[Any] = [None] * world if rank == 0 else []
            dist.gather_object(mine, per_rank if rank == 0 else None, dst=0)
            if rank != 0:
                continue
            hidden, small, dedup_total, slots = (sum(col) for col in zip(*per_rank, strict=True))
            n = self.steps * world
            rows.append(
                TimingRow(
                    ep=world,
                    batch=batch,
                    seconds=seconds,
                    a2a_ms=traffic.a2a_s / self.steps * 1e3,
                    experts_ms=traffic.compute_s / self.steps * 1e3,
                    slots=slots / n,
                    calls=traffic.calls / self.steps,
                    hidden_bytes=hidden / n,
                    # Dispatch and combine, each counted by the sender and by the receiver.
                    dedup_bytes=4 * dedup_total * self.shape.row_bytes / n,
                    small_bytes=small / n,
                    max_err=err,
                )
            )
        return rows if rank == 0 else None

    def _run_fused(self) -> list[TimingRow]:
        experts = full_experts(self.shape)
        rows = []
        for batch in self.batches:
            inputs = self.inputs(0, batch)

            def forward(step: StepInputs) -> torch.Tensor:
                return experts(step.x, step.weights, step.ids)

            timed_steps(forward, inputs[: self.warmup], 1)
            seconds = timed_steps(forward, inputs[self.warmup :], 1)
            slots = statistics.mean(s.ids.unique().numel() for s in inputs[self.warmup :])
            mean_ms = statistics.mean(seconds) * 1e3
            rows.append(TimingRow(1, batch, seconds, 0, mean_ms, slots, 0, 0, 0, 0, None))
        return rows


@dataclass(frozen=True)
class Window:
    """K skewed steps under one placement."""

    seconds: list[float]
    rank_rows: list[list[int]]  # [rank][step] (token, expert) rows received
    rank_slots: list[list[int]]  # [rank][step] local expert slots that ran
    expected: float  # placement.imbalance(this window's loads)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1e3

    @property
    def measured(self) -> float:
        """max/mean over ranks of the rows each received over the whole window."""
        totals = [sum(r) for r in self.rank_rows]
        return max(totals) / statistics.mean(totals)

    @property
    def measured_per_step(self) -> float:
        """Mean over steps of max/mean over ranks (the straggler a decode step waits for)."""
        steps = zip(*self.rank_rows, strict=True)
        return statistics.mean(max(s) / statistics.mean(s) for s in steps)

    @property
    def slots(self) -> tuple[float, float]:
        """Expert slots run per step: (busiest rank's, mean rank's), averaged over steps."""
        steps = list(zip(*self.rank_slots, strict=True))
        return statistics.mean(max(s) for s in steps), statistics.mean(map(statistics.mean, steps))


@dataclass(frozen=True)
class EplbRow:
    ep: int
    redundant: int
    slots_per_rank: int
    moved: tuple[int, int]  # slots whose expert changed: copied from another rank, same rank
    rebalance_ms: float
    planned: tuple[float, float]  # rebalance_experts' report: expected before, after (window 1)
    before: Window
    after: Window
    max_err: float | None

    def row(self) -> str:
        b, a = self.before, self.after
        check = "-" if self.max_err is None else "ok" if self.max_err <= CHECK_ATOL else "FAIL"
        return (
            f"| {self.ep} | {self.redundant} | {self.slots_per_rank} "
            f"| {self.planned[0]:.3f} → {self.planned[1]:.3f} "
            f"| {self.moved[0]} + {self.moved[1]} | {self.rebalance_ms:.0f} "
            f"| {b.measured:.3f} → {a.measured:.3f} "
            f"| {b.measured_per_step:.3f} → {a.measured_per_step:.3f} "
            f"| {b.expected:.3f} → {a.expected:.3f} "
            f"| {b.slots[0]:.1f} / {b.slots[1]:.1f} → {a.slots[0]:.1f} / {a.slots[1]:.1f} "
            f"| {b.median_ms:.2f} → {a.median_ms:.2f} | {check} |"
        )


@dataclass(frozen=True)
class EplbJob:
    shape: MoEShape
    batch: int
    steps: int
    warmup: int
    max_ep: int
    skew: float

    def run(self, rank: int, world: int) -> list[EplbRow] | None:
        reference = full_experts(self.shape) if rank == 0 else None
        rows = []
        for redundant in (world, 2 * world):
            row = self._one(rank, world, redundant, reference)
            if row is not None:
                rows.append(row)
        return rows if rank == 0 else None

    def _one(
        self, rank: int, world: int, redundant: int, reference: FusedExperts | None
    ) -> EplbRow | None:
        parallel = ParallelConfig(world, rank, redundant)
        layer = ep_layer(self.shape, parallel)
        num_tokens = self.max_ep * self.batch
        mine = slice(rank * self.batch, (rank + 1) * self.batch)
        k, w = self.steps, self.warmup
        # Warm-up steps come from outside both windows and are not counted in `load`.
        inputs = [
            step_inputs(self.shape, 10_000 + s, num_tokens, mine, self.skew)
            for s in range(w + 2 * k)
        ]

        def forward(step: StepInputs) -> torch.Tensor:
            return layer(step.x, step.weights, step.ids)

        timed_steps(forward, inputs[:w], world)
        layer.load.zero_()
        layer.steps.zero_()
        before, old = self._window(layer, forward, inputs[w : w + k]), layer.placement
        start = time.perf_counter()
        # The lockstep loop's EPLB, on an engine whose one MoE layer is this one.
        shim = SimpleNamespace(runner=SimpleNamespace(ep_layers={"moe": layer}), parallel=parallel)
        planned = rebalance_experts(cast(Engine, shim))["moe"]
        rebalance_ms = (time.perf_counter() - start) * 1e3
        new = layer.placement
        remote = sum(old.rank_of(m.source_slot) != new.rank_of(m.slot) for m in moves(old, new))
        moved = (remote, len(moves(old, new)) - remote)
        after = self._window(layer, forward, inputs[w + k :])
        err = check_against_reference(
            layer, reference, self.shape, 10_000 + w, num_tokens, self.batch, self.skew
        )
        if rank != 0:
            return None
        return EplbRow(
            world,
            redundant,
            old.slots_per_rank,
            moved,
            rebalance_ms,
            planned,
            before,
            after,
            err,
        )

    def _window(
        self, layer: ExpertParallelExperts, forward: Forward, inputs: Sequence[StepInputs]
    ) -> Window:
        traffic = Traffic()
        with instrumented(layer, traffic):
            seconds = timed_steps(forward, inputs, dist.get_world_size())
        placement: ExpertPlacement = layer.placement
        expected = placement.imbalance(global_load(layer))
        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (traffic.rows_per_step, traffic.slots_per_step))
        return Window(seconds, [r for r, _ in per_rank], [s for _, s in per_rank], expected)


Job = TimingJob | EplbJob


def rank_main(rank: int, world: int, port: int, job: Job, queue: Any) -> None:
    try:
        torch.set_num_threads(1)
        if world > 1:
            parallel = ParallelConfig(world, rank)
            init_process_group(parallel, resolve_device("cpu"), f"127.0.0.1:{port}", 120)
        with torch.inference_mode():
            result = job.run(rank, world)
        if rank == 0:
            queue.put(("result", result))
    except BaseException:
        queue.put(("error", f"rank {rank}: {traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world: int, job: Job) -> Any:
    """Run `job` on `world` spawned processes; returns rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, job, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        kind, value = queue.get(timeout=RESULT_TIMEOUT_S)
        if kind == "error":
            raise RuntimeError(value)
        return value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


TIMING_HEADER = (
    "| EP | B/rank | tokens/step | median ms | p90 ms | tokens/s "
    "| mean ms: a2a / experts / rest | experts run/rank/step | a2a calls/step "
    "| hidden KiB/step/rank | hidden KiB if dedup | small KiB/step/rank | EP N = EP 1 |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
)
EPLB_HEADER = (
    "| EP | redundant | slots/rank | planned step cost max/mean (window 1) | moved: remote + local "
    "| rebalance ms "
    "| measured rows max/mean | per-step max/mean | expected max/mean (own window) "
    "| experts run/step: busiest / mean rank | median ms | EP = EP 1 |\n"
    "| ---: | ---: | ---: | --- | --- | ---: | --- | --- | --- | --- | --- | --- |"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep-sizes", type=int_list, default=(1, 2, 4))
    parser.add_argument("--batch-sizes", type=int_list, default=(1, 16, 64), help="per rank")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="timed calls per configuration")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eplb-ep-sizes", type=int_list, default=(2, 4), help="EP sizes of the EPLB table"
    )
    parser.add_argument("--eplb-batch", type=int, default=16, help="tokens per rank per step")
    parser.add_argument(
        "--eplb-steps", type=int, default=50, help="K: steps before and after the rebalance"
    )
    parser.add_argument(
        "--skew", type=float, default=1.5, help="Zipf exponent of the EPLB router bias"
    )
    parser.add_argument("--skip-eplb", action="store_true")
    args = parser.parse_args(argv)
    if min(args.steps, args.eplb_steps, args.eplb_batch) < 1 or args.warmup < 0:
        parser.error("--steps, --eplb-steps and --eplb-batch must be >= 1, --warmup >= 0")
    for n in (*args.ep_sizes, *args.eplb_ep_sizes):
        if args.experts % n:
            parser.error(f"--experts {args.experts} does not split over EP size {n}")
    if 1 in args.eplb_ep_sizes:
        parser.error("--eplb-ep-sizes needs sizes >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    shape = MoEShape(args.hidden, args.intermediate, args.experts, args.top_k, args.seed)
    # Every rank one thread: the spawned children inherit this before torch starts.
    os.environ["OMP_NUM_THREADS"] = "1"
    cpus = os.cpu_count() or 1
    began = time.perf_counter()
    start_load = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    timing: list[TimingRow] = []
    max_ep = max(args.ep_sizes)
    for ep in args.ep_sizes:
        job = TimingJob(shape, args.batch_sizes, args.steps, args.warmup, max_ep)
        timing.extend(run_ranks(ep, job))
    eplb: list[EplbRow] = []
    if not args.skip_eplb:
        max_eplb = max(args.eplb_ep_sizes)
        for ep in args.eplb_ep_sizes:
            job_eplb = EplbJob(
                shape, args.eplb_batch, args.eplb_steps, args.warmup, max_eplb, args.skew
            )
            eplb.extend(run_ranks(ep, job_eplb))

    expert_mib = 3 * shape.hidden * shape.intermediate * 4 / 2**20
    print(
        f"MoE layer: hidden {shape.hidden}, moe_intermediate {shape.intermediate}, "
        f"{shape.experts} experts ({expert_mib:.0f} MiB each), top-{shape.top_k}, float32 "
        f"(hidden row {shape.row_bytes} B). {cpus} CPUs ({platform.processor() or 'unknown'}, "
        f"{platform.machine()}), python {sys.version.split()[0]}, torch {torch.__version__}; "
        "one process per rank, 1 thread each, gloo over 127.0.0.1."
    )
    crowded = sorted({n for n in (*args.ep_sizes, *args.eplb_ep_sizes) if n > cpus})
    if crowded:
        print(
            f"EP {', '.join(map(str, crowded))} oversubscribes this {cpus}-CPU machine: ranks "
            "share cores, so their times (and rank 0's waits) include being descheduled."
        )
    print(
        f"\n## MoE layer per decode step ({args.steps} timed calls after {args.warmup} warm-up; "
        "random routing)\n"
    )
    print(TIMING_HEADER)
    for r in timing:
        print(r.row())
    print(
        "\nB is per rank; tokens/s = EP * B / median step. Times on rank 0 after a barrier "
        "(the layer's forward only; routing is precomputed). Mean ms split on rank 0: inside "
        "all_to_all_single (peer waits included) / the local expert matmuls (`_compute`; "
        "the whole FusedExperts call for EP 1) / the rest of forward (routing tables, sorts, "
        ".tolist(), gathers, index_add). experts run: expert slots with at least one row per "
        "rank and step, each a full read of its weights. KiB are the bytes a rank sends "
        "to plus receives from other ranks per step, mean over ranks; 'if dedup' is the hidden "
        "traffic when each token goes once to each other rank holding one of its experts and "
        "comes back summed, which is what the layer does (the two columns match). "
        "Check: EP N output on one step gathered to rank 0 vs FusedExperts on the "
        f"same tokens, max abs difference <= {CHECK_ATOL:g}."
    )
    if eplb:
        print(
            f"\n## EPLB on a skewed router (Zipf exponent {args.skew}, B = {args.eplb_batch} per "
            f"rank, K = {args.eplb_steps} steps before and after)\n"
        )
        print(EPLB_HEADER)
        for e in eplb:
            print(e.row())
        print(
            "\nplanned: rebalance_experts' report on window-1 loads: the expected step cost "
            "(engine.eplb.step_cost: expert reads plus tokens) of the costliest rank over the "
            "mean rank's before, then after. measured: (token, expert) rows each rank received by "
            "all-to-all, summed over the window, max/mean over ranks; per-step: the same per "
            "step, averaged. expected (own window): placement.imbalance of the placement in use "
            "on that window's loads. Window 2 draws new steps from the same distribution. "
            "moved: slots whose expert changed, copied by broadcast from another rank + copied "
            "on the same rank. experts run: slots with at least one row per step, on the "
            "busiest rank / the mean rank (averaged over steps)."
        )
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\nwall time {time.perf_counter() - began:.0f} s; load average at start {start_load}, "
        f"at end {load} (other work on the machine shows up in the times)."
    )


if __name__ == "__main__":
    main()
