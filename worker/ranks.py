"""The ranks of an expert-parallel instance: rank 0 lives in the worker's process and serves
gRPC; ranks 1..N-1 are child processes started here (the role's ranks module, `python -m
decode_worker.ranks`, which runs `main`), each with its own engine, KV pool and transfer
engine, stepping in lockstep with rank 0.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

from engine.device import rank_device
from engine.dp import LockstepRank
from engine.engine import START_ERRORS, Engine
from engine.parallel import ParallelConfig, init_process_group
from kv_transfer import (
    KVPoolDescriptor,
    TransferEngine,
    create_transfer_engine,
    descriptor_from_tensors,
)
from worker.args import build_parser, configure_mooncake, model_name, worker_engine_config
from worker.convert import engine_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankTransfer:
    """What the prefill side needs to write into one rank's pool."""

    session_id: str
    pool: KVPoolDescriptor


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def register_pool(engine: Engine, transfer: TransferEngine, model: str) -> KVPoolDescriptor:
    """Register every layer's K and V tensor with the transfer engine."""
    kv = engine.runner.kv_cache
    for tensor in (*kv.k, *kv.v):
        rc = transfer.register_memory(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if rc != 0:
            raise RuntimeError(f"registering {tensor.numel()} KV elements failed: rc={rc}")
    return descriptor_from_tensors(engine_layout(engine, model), kv.k, kv.v)


def start_children(
    module: str, argv: list[str], world: int, master: str
) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1..world-1 (`python -m module`) with the same engine flags as rank 0."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--rank",
                str(rank),
                "--master",
                master,
                *argv,
            ],
        )
        for rank in range(1, world)
    ]


def join_instance(
    engine: Engine, transfer: TransferEngine | None, model: str
) -> list[RankTransfer] | None:
    """Every rank: register its pool, then share (session, pool) with rank 0 (a collective).
    Rank 0 gets the list for all ranks; the others get None."""
    mine = (
        RankTransfer(transfer.session_id, register_pool(engine, transfer, model))
        if transfer is not None
        else None
    )
    world = engine.parallel.ep_size
    if world == 1:
        return [mine] if mine is not None else []
    gathered: list[RankTransfer | None] = [None] * world
    dist.gather_object(mine, gathered if engine.parallel.rank == 0 else None, dst=0)
    if engine.parallel.rank != 0:
        return None
    return [g for g in gathered if g is not None]


def main(modes: Sequence[str], argv: list[str] | None = None) -> int:
    """A rank 1..N-1 process: the flags of rank 0 (whose role serves ``modes``), plus its rank
    and where rank 0 waits."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(message)s")
    parser = build_parser(modes)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--master", required=True, help="host:port of rank 0's rendezvous")
    args = parser.parse_args(argv)
    config = worker_engine_config(args)
    try:
        device = rank_device(config.device, args.rank)
        parallel = ParallelConfig(config.ep_size, args.rank, config.ep_num_redundant_experts)
        init_process_group(parallel, device, args.master)
        engine = Engine(config, rank=args.rank)
    except START_ERRORS as exc:  # as rank 0 reports them
        raise SystemExit(f"rank {args.rank} cannot start: {exc}") from None
    transfer = None
    if args.disaggregation_mode != "null":
        configure_mooncake(args.transfer_timeout)
        transfer = create_transfer_engine(args.transfer_backend, hostname=args.host)
    join_instance(engine, transfer, model_name(args, config))
    LockstepRank(engine).serve_forever()
    return 0
