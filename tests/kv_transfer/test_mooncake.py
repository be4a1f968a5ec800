"""End to end through the real Mooncake transfer engine: two processes, TCP on 127.0.0.1."""

from __future__ import annotations

import multiprocessing as mp
import queue
from typing import Any

import pytest

try:
    import mooncake.engine  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the host
    pytest.skip(f"Mooncake's transfer engine cannot be imported: {e}", allow_module_level=True)

from kv_transfer import MAX_WRITES_PER_CALL, MooncakeTransferEngine
from tests.kv_transfer.mooncake_peers import LAYOUT, Scenario, receiver_main, sender_main

pytestmark = pytest.mark.timeout(120)

RESULT_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 15.0
DEAD_SESSION_BOUND_S = 10.0


def run_pair(scenario: Scenario) -> dict[str, Any]:
    """Run receiver and sender to the end; return each one's details, killing both on failure."""
    ctx = mp.get_context("spawn")
    to_sender: mp.Queue[Any] = ctx.Queue()
    to_receiver: mp.Queue[Any] = ctx.Queue()
    results: mp.Queue[Any] = ctx.Queue()
    args = (scenario, to_sender, to_receiver, results)
    receiver = ctx.Process(target=receiver_main, args=args, daemon=True)
    sender = ctx.Process(target=sender_main, args=args, daemon=True)
    reports: dict[str, Any] = {}
    try:
        receiver.start()
        sender.start()
        while len(reports) < 2:
            try:
                role, status, details = results.get(timeout=RESULT_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"no report within {RESULT_TIMEOUT_S} s; so far: {reports}")
            if status != "ok":
                pytest.fail(f"the {role} failed:\n{details}")
            reports[role] = details
            if role == "receiver" and scenario.probe_dead_session:
                receiver.join(timeout=JOIN_TIMEOUT_S)
                assert receiver.exitcode == 0, f"receiver exit code {receiver.exitcode}"
                to_sender.put("receiver gone")
        return reports
    finally:
        for process in (sender, receiver):
            process.join(timeout=JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join(timeout=JOIN_TIMEOUT_S)


def test_fragmented_pages_land_byte_exact() -> None:
    sender = run_pair(Scenario(src_pages=[3, 4, 5, 9], dst_pages=[0, 1, 2, 7]))["sender"]
    # runs (3->0, 3 pages) and (9->7, 1 page), per layer, per K/V
    assert sender["writes"] == 2 * 2 * LAYOUT.num_layers
    assert sender["bytes"] == 4 * LAYOUT.page_bytes * 2 * LAYOUT.num_layers
    # Mooncake refuses destinations outside the receiver's registered regions.
    assert sender["unregistered_rc"] < 0
    assert sender["overrun_rc"] < 0


def test_batch_beyond_the_tcp_queue_goes_through_in_chunks() -> None:
    """Every other page of 1,200: 2,400 one-page writes, more than Mooncake's TCP transport
    takes in one call (about 2,050); the writer splits them."""
    src = list(range(0, 1200, 2))
    scenario = Scenario(src_pages=src, dst_pages=[p + 1 for p in src], num_pages=1200)
    sender = run_pair(scenario)["sender"]
    assert sender["writes"] == 600 * 2 * LAYOUT.num_layers > 4 * MAX_WRITES_PER_CALL


def test_concurrent_batches_to_one_peer_stay_within_the_tcp_queue() -> None:
    """8 threads x 400 writes at once to one peer: unserialized, Mooncake fails them all."""
    src = list(range(0, 1600, 2))
    scenario = Scenario(src, [p + 1 for p in src], num_pages=1600, threads=8)
    sender = run_pair(scenario)["sender"]
    assert sender["writes"] == 800 * 2 * LAYOUT.num_layers


def test_write_to_a_dead_session_fails_fast() -> None:
    scenario = Scenario(list(range(8)), list(range(8, 16)), probe_dead_session=True)
    sender = run_pair(scenario)["sender"]
    for case in ("dead_first", "dead_second", "dead_fresh"):
        rc, elapsed_s = sender[case]
        assert rc < 0, f"{case}: a write to a dead session returned {rc}"
        assert elapsed_s < DEAD_SESSION_BOUND_S, f"{case}: took {elapsed_s:.3f} s"


def test_session_id_needs_initialize() -> None:
    with pytest.raises(RuntimeError, match="before initialize"):
        _ = MooncakeTransferEngine().session_id
