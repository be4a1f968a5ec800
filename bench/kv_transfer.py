"""Throughput of one request's KV hand-off through Mooncake, beside plain memcpy of the same bytes.

A receiver process registers a KV pool and publishes its descriptor; this process writes one
prompt's pages into it with `batch_transfer_sync_write`, first with contiguous page ids (one
run: 2 writes per layer) and then with every other page (no run longer than one page), and
copies the same write list with `ctypes.memmove` into a local pool for comparison. Every
Mooncake case is checked page by page against the source afterwards.

    python -m bench.kv_transfer                      # Llama-3-8B-like: 32 layers, 8 KV heads,
                                                     # head_dim 128, bf16, 2,048-token prompt
    python -m bench.kv_transfer --pages 16 --reps 3  # a quick run
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer import (
    MAX_WRITES_PER_CALL,
    KVLayout,
    KVPoolDescriptor,
    TransferEngine,
    WriteBatch,
    build_write_batch,
    check,
    create_transfer_engine,
    descriptor_from_tensors,
    write_batch,
)

PEER_TIMEOUT_S = 60.0


def allocate_pool(
    layout: KVLayout, num_pages: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    dtype = getattr(torch, layout.dtype)
    shape = (num_pages, layout.page_size, layout.num_kv_heads, layout.head_dim)
    k = [torch.zeros(shape, dtype=dtype) for _ in range(layout.num_layers)]
    v = [torch.zeros(shape, dtype=dtype) for _ in range(layout.num_layers)]
    return k, v


def page_sums(tensors: Sequence[torch.Tensor], pages: Sequence[int]) -> list[int]:
    """One integer per (tensor, page): the sum of the page's bytes read as int16, to compare
    pools held by two processes without shipping them."""
    index = torch.tensor(list(pages), dtype=torch.long)
    sums: list[int] = []
    for t in tensors:
        raw = t.view(torch.uint8).reshape(t.shape[0], -1)[index]
        sums.extend(raw.view(torch.int16).sum(dim=1, dtype=torch.int64).tolist())
    return sums


def receiver_main(layout: KVLayout, num_pages: int, inbox: Any, outbox: Any) -> None:
    """Register a pool, publish it, answer checksum requests until told to stop."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    engine = create_transfer_engine("mooncake")
    k, v = allocate_pool(layout, num_pages)
    pool = descriptor_from_tensors(layout, k, v)
    for addr, length in pool.regions():
        check(engine.register_memory(addr, length), f"register_memory({addr:#x}, {length})")
    outbox.put((engine.session_id, pool))
    while True:
        message = inbox.get(timeout=PEER_TIMEOUT_S * 10)
        if message == "stop":
            return
        outbox.put(page_sums(k + v, message))


@dataclass(frozen=True)
class CaseResult:
    name: str
    pages: int
    bytes_per_handoff: int
    writes: int
    seconds: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def row(self) -> str:
        gbps = self.bytes_per_handoff / self.median_s / 1e9
        return (
            f"| {self.name} | {self.pages} | {self.bytes_per_handoff:,} | {self.writes:,} "
            f"| {gbps:.2f} | {self.median_s * 1e3:.1f} |"
        )


def time_handoffs(handoff: Callable[[], None], warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        handoff()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        handoff()
        seconds.append(time.perf_counter() - start)
    return seconds


def mooncake_handoff(
    engine: TransferEngine, session_id: str, batch: WriteBatch, max_writes_per_call: int
) -> None:
    write_batch(engine, session_id, batch, max_writes_per_call=max_writes_per_call)


def memcpy_handoff(batch: WriteBatch) -> None:
    for src, dst, length in zip(batch.srcs, batch.dsts, batch.lengths, strict=True):
        ctypes.memmove(dst, src, length)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--pages", type=int, default=128, help="pages per hand-off (the prompt)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--max-writes-per-call",
        type=int,
        default=MAX_WRITES_PER_CALL,
        help="writes per batch_transfer_sync_write call (Mooncake's TCP queue takes ~2,050)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    layout = KVLayout(
        "llama-3-8b-like", args.dtype, args.page_size, args.layers, args.kv_heads, args.head_dim
    )
    n = args.pages
    pool_pages = 2 * n  # room for the every-other-page case
    cases = {
        "contiguous": (list(range(n)), list(range(n))),
        "fragmented": (list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))),
    }

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    receiver = ctx.Process(
        target=receiver_main, args=(layout, pool_pages, inbox, outbox), daemon=True
    )
    receiver.start()
    try:
        engine = create_transfer_engine("mooncake")
        k, v = allocate_pool(layout, pool_pages)
        for t in k + v:
            t.view(torch.int16).random_()
        pool = descriptor_from_tensors(layout, k, v)
        for addr, length in pool.regions():
            check(engine.register_memory(addr, length), f"register_memory({addr:#x}, {length})")
        local_k, local_v = allocate_pool(layout, pool_pages)
        local = descriptor_from_tensors(layout, local_k, local_v)
        session_id, remote = outbox.get(timeout=PEER_TIMEOUT_S)
        assert isinstance(remote, KVPoolDescriptor)

        results: list[CaseResult] = []
        for name, (src_pages, dst_pages) in cases.items():
            batch = build_write_batch(pool, remote, src_pages, dst_pages)
            handoff = functools.partial(
                mooncake_handoff, engine, session_id, batch, args.max_writes_per_call
            )
            seconds = time_handoffs(handoff, args.warmup, args.reps)
            results.append(
                CaseResult(f"mooncake tcp, {name}", n, batch.total_bytes, len(batch), seconds)
            )
            inbox.put(dst_pages)
            if outbox.get(timeout=PEER_TIMEOUT_S) != page_sums(k + v, src_pages):
                raise RuntimeError(f"the receiver's pages differ from the sender's ({name})")
        for name, (src_pages, dst_pages) in cases.items():
            batch = build_write_batch(pool, local, src_pages, dst_pages)
            seconds = time_handoffs(
                functools.partial(memcpy_handoff, batch), args.warmup, args.reps
            )
            results.append(CaseResult(f"memcpy, {name}", n, batch.total_bytes, len(batch), seconds))
            if page_sums(local_k + local_v, dst_pages) != page_sums(k + v, src_pages):
                raise RuntimeError(f"memcpy produced different pages ({name})")
        inbox.put("stop")
        receiver.join(timeout=PEER_TIMEOUT_S)
    finally:
        if receiver.is_alive():
            receiver.kill()

    print(
        f"KV hand-off: {layout.describe()} ({layout.page_bytes // 1024} KiB pages), "
        f"{n} pages = {n * args.page_size:,} tokens; {args.reps} reps after {args.warmup} warm-up; "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"python {sys.version.split()[0]}, torch {torch.__version__}. Mooncake batches go out "
        f"as calls of at most {args.max_writes_per_call} writes; memcpy is ctypes.memmove of the "
        "same write list into a second pool in this process. GB = 1e9 bytes.\n"
    )
    columns = ("case", "pages", "bytes per transfer", "writes per batch", "GB/s (median)")
    print(f"| {' | '.join(columns)} | ms per hand-off (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()
