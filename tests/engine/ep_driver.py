"""Runs an expert-parallel instance as N local processes for tests and benchmarks: gloo on the
CPU, NCCL with one GPU a rank (`device="cuda"`)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.device import rank_device
from engine.dp import ALL_RANKS, Command, Iteration, LockstepRank
from engine.engine import Engine
from engine.parallel import ParallelConfig, init_process_group
from engine.sampling import SamplingParams


def _rank_main(
    rank: int,
    world: int,
    port: int,
    config: EngineConfig,
    prompts: list[list[int]],
    sampling: SamplingParams,
    rebalance_after: int | None,
    queue: Any,
) -> None:
    try:
        parallel = ParallelConfig(world, rank, config.ep_num_redundant_experts)
        init_process_group(parallel, rank_device(config.device, rank), f"127.0.0.1:{port}", 60)
        engine = Engine(config, rank=rank)
        loop = LockstepRank(engine)
        if rank != 0:
            loop.serve_forever()
            return
        queue.put(("result", _drive(loop, world, prompts, sampling, rebalance_after)))
    except BaseException:
        queue.put(("error", f"rank {rank}: {traceback.format_exc()}"))


def _drive(
    loop: LockstepRank,
    world: int,
    prompts: list[list[int]],
    sampling: SamplingParams,
    rebalance_after: int | None,
) -> dict[str, Any]:
    # Requests go to ranks round robin (attention is data-parallel).
    commands = [
        Command(i, i % world, "add_request", (p, sampling, f"r{i}")) for i, p in enumerate(prompts)
    ]
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    done: set[str] = set()
    report: dict[str, Any] = {"loads": [], "rebalance": None}
    steps = 0
    it: Iteration = loop.iterate(commands)
    while True:
        for err in (r.error for r in it.results if r.error is not None):
            raise err
        for res in it.results:
            if isinstance(res.value, dict) and res.rank == 0:
                report["rebalance"] = res.value
        for _, out in it.outputs:
            tokens[out.request_id].append(out.token_id)
            if out.finished:
                done.add(out.request_id)
        report["loads"] = [vars(load) for load in it.loads]
        if len(done) == len(prompts):
            break
        steps += 1
        cmds = []
        if rebalance_after is not None and steps == rebalance_after:
            cmds.append(Command(10_000, ALL_RANKS, "rebalance_experts"))
        it = loop.iterate(cmds)
    loop.iterate(stop=True)
    report["tokens"] = [tokens[f"r{i}"] for i in range(len(prompts))]
    return report


def run_expert_parallel(
    model_dir: Path,
    world: int,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    num_redundant: int = 0,
    rebalance_after: int | None = None,
    timeout_s: float = 120,
    device: str = "cpu",
    **engine_kwargs: Any,
) -> dict[str, Any]:
    """Generate `prompts` on a `world`-rank instance on `device` (rank r on device r past
    the CPU); returns tokens per prompt and loads."""
    from tests.redis_server import free_port

    config = EngineConfig(
        model_path=str(model_dir),
        ep_size=world,
        ep_num_redundant_experts=num_redundant,
        device=device,
        **engine_kwargs,
    )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                r,
                world,
                port,
                config,
                [list(p) for p in prompts],
                sampling,
                rebalance_after,
                queue,
            ),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        kind, value = queue.get(timeout=timeout_s)
        if kind == "error":
            raise RuntimeError(value)
        return dict(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
