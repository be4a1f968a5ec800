"""The two processes of the end-to-end Mooncake tests (spawn targets, so a module of their own).

Each reports to `results` as `(role, "ok", details)` or `(role, "error", traceback)` and never
blocks without a timeout, so a broken peer fails the test instead of hanging it.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer import (
    MAX_WRITES_PER_CALL,
    KVLayout,
    KVPoolDescriptor,
    PageWriter,
    TransferEngine,
    build_write_batch,
    check,
    create_transfer_engine,
    descriptor_from_tensors,
)

LAYOUT = KVLayout("tiny-llama", "float32", page_size=4, num_layers=2, num_kv_heads=2, head_dim=8)
PEER_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Scenario:
    src_pages: list[int]
    dst_pages: list[int]
    num_pages: int = 16  # in each pool
    probe_dead_session: bool = False
    max_writes_per_call: int = MAX_WRITES_PER_CALL
    threads: int = 1  # sender threads writing disjoint slices of the pages at once

    @property
    def pool_shape(self) -> tuple[int, int, int, int]:
        return (self.num_pages, LAYOUT.page_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)


def sender_values(scenario: Scenario, layer: int, kind: int) -> torch.Tensor:
    """Distinct nonzero values, exact in float32 (< 2**24), for every element of the sender's
    pool."""
    shape = scenario.pool_shape
    offset = 1 + 10_000_000 * layer + 5_000_000 * kind
    return (torch.arange(math.prod(shape)) + offset).to(torch.float32).reshape(shape)


def _register_pool(
    engine: TransferEngine, k: list[torch.Tensor], v: list[torch.Tensor]
) -> KVPoolDescriptor:
    pool = descriptor_from_tensors(LAYOUT, k, v)
    for addr, length in pool.regions():
        check(engine.register_memory(addr, length), f"register_memory({addr:#x}, {length})")
    return pool


def receiver_main(
    scenario: Scenario, to_sender: mp.Queue[Any], to_receiver: mp.Queue[Any], results: mp.Queue[Any]
) -> None:
    """Register a zeroed pool, publish it, wait for the writes, check every page byte for byte."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        engine = create_transfer_engine("mooncake")
        k = [torch.zeros(scenario.pool_shape) for _ in range(LAYOUT.num_layers)]
        v = [torch.zeros(scenario.pool_shape) for _ in range(LAYOUT.num_layers)]
        to_sender.put((engine.session_id, _register_pool(engine, k, v)))

        message = to_receiver.get(timeout=PEER_TIMEOUT_S)
        assert message == "written", message
        src_of = dict(zip(scenario.dst_pages, scenario.src_pages, strict=True))
        problems = []
        for layer in range(LAYOUT.num_layers):
            for kind, tensors in enumerate((k, v)):
                got = tensors[layer].view(torch.uint8).reshape(scenario.num_pages, -1)
                want = sender_values(scenario, layer, kind)
                want = want.view(torch.uint8).reshape(scenario.num_pages, -1)
                zero = torch.zeros_like(got[0])
                for page in range(scenario.num_pages):
                    expected = want[src_of[page]] if page in src_of else zero
                    if not torch.equal(got[page], expected):
                        problems.append(f"layer {layer} {'KV'[kind]} page {page}")
        if problems:
            raise AssertionError(
                f"pages with wrong bytes: {problems[:20]} ({len(problems)} in all)"
            )
        results.put(("receiver", "ok", {"session_id": engine.session_id}))
    except BaseException:
        results.put(("receiver", "error", traceback.format_exc()))


def _timed(call: Callable[[], int]) -> tuple[int, float]:
    start = time.monotonic()
    rc = call()
    return rc, time.monotonic() - start


def _write_in_threads(
    writer: PageWriter,
    session_id: str,
    pool: KVPoolDescriptor,
    remote: KVPoolDescriptor,
    scenario: Scenario,
) -> int:
    """Split the pages into `scenario.threads` slices written at once; return the write count."""
    n = len(scenario.src_pages)
    bounds = [n * i // scenario.threads for i in range(scenario.threads + 1)]
    batches = [
        build_write_batch(pool, remote, scenario.src_pages[a:b], scenario.dst_pages[a:b])
        for a, b in itertools.pairwise(bounds)
    ]
    with ThreadPoolExecutor(max_workers=scenario.threads) as executor:
        futures = [executor.submit(writer.write, session_id, b) for b in batches]
        for future in futures:
            future.result(timeout=PEER_TIMEOUT_S)
    return sum(len(b) for b in batches)


def sender_main(
    scenario: Scenario, to_sender: mp.Queue[Any], to_receiver: mp.Queue[Any], results: mp.Queue[Any]
) -> None:
    """Fill a pool with known values, write the scenario's pages to the receiver, and probe how
    Mooncake answers bad writes."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        engine = create_transfer_engine("mooncake")
        k = [sender_values(scenario, layer, 0) for layer in range(LAYOUT.num_layers)]
        v = [sender_values(scenario, layer, 1) for layer in range(LAYOUT.num_layers)]
        pool = _register_pool(engine, k, v)
        session_id, remote = to_sender.get(timeout=PEER_TIMEOUT_S)
        assert isinstance(remote, KVPoolDescriptor)

        batch = build_write_batch(pool, remote, scenario.src_pages, scenario.dst_pages)
        writer = PageWriter(engine, max_writes_per_call=scenario.max_writes_per_call)
        written = _write_in_threads(writer, session_id, pool, remote, scenario)
        details: dict[str, Any] = {"writes": written, "bytes": batch.total_bytes}

        # A destination outside every registered region, and one that runs past a region's end.
        page = LAYOUT.page_bytes
        src = k[0].data_ptr()
        details["unregistered_rc"] = engine.transfer_sync_write(session_id, src, 4096, page)
        last_page = remote.k_page_addr(1, scenario.num_pages - 1)
        details["overrun_rc"] = engine.transfer_sync_write(session_id, src, last_page, 2 * page)
        to_receiver.put("written")

        if scenario.probe_dead_session:
            message = to_sender.get(timeout=PEER_TIMEOUT_S)
            assert message == "receiver gone", message
            args = (session_id, batch.srcs, batch.dsts, batch.lengths)
            details["dead_first"] = _timed(lambda: engine.batch_transfer_sync_write(*args))
            details["dead_second"] = _timed(lambda: engine.batch_transfer_sync_write(*args))
            fresh = create_transfer_engine("mooncake")  # never connected to the dead session
            dst = remote.k_base_addrs[0]
            details["dead_fresh"] = _timed(
                lambda: fresh.transfer_sync_write(session_id, src, dst, page)
            )
        results.put(("sender", "ok", details))
    except BaseException:
        results.put(("sender", "error", traceback.format_exc()))
