"""The sending side's fence: a revoked transfer is written no more, and a revocation waits for
the write call in flight."""

from __future__ import annotations

import threading
import time

import pytest

from kv_transfer import TransferRevoked, WriteFence, build_write_batch, write_batch
from tests.kv_transfer.test_writer import DST, SRC, RecordingEngine


def test_revoked_transfer_writes_nothing_more() -> None:
    fence = WriteFence()
    engine = RecordingEngine()
    batch = build_write_batch(SRC, DST, [0, 2, 4], [0, 2, 4])  # 12 writes
    write_batch(engine, "decode:1", batch, max_writes_per_call=5, fence=fence, transfer_id=7)
    assert len(engine.calls) == 3
    assert not fence.revoke(7)  # nothing in flight
    with pytest.raises(TransferRevoked, match="transfer 7 was revoked"):
        write_batch(engine, "decode:1", batch, fence=fence, transfer_id=7)
    assert len(engine.calls) == 3
    write_batch(engine, "decode:1", batch, fence=fence, transfer_id=8)  # others go on
    assert len(engine.calls) == 4


def test_revoke_mid_batch_stops_after_the_call_in_flight() -> None:
    fence = WriteFence()
    engine = RecordingEngine(call_s=0.2)
    batch = build_write_batch(SRC, DST, [0, 2, 4], [0, 2, 4])  # 12 writes: 3 calls of 4
    errors: list[BaseException] = []

    def run() -> None:
        try:
            write_batch(
                engine, "decode:1", batch, max_writes_per_call=4, fence=fence, transfer_id=3
            )
        except TransferRevoked as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.05)  # the first call is running
    assert fence.revoke(3)  # a write is in flight
    start = time.monotonic()
    assert fence.wait_idle(3, timeout_s=5)
    assert time.monotonic() - start > 0.1  # waited for the call to end
    thread.join(5)
    assert len(engine.calls) == 1 and len(errors) == 1


def test_wait_idle_times_out_and_tombstones_expire() -> None:
    now = [0.0]
    fence = WriteFence(tombstone_s=10, max_tombstones=2, clock=lambda: now[0])
    with fence.writing(1):
        assert fence.revoke(1)
        assert not fence.wait_idle(1, timeout_s=0.05)
    assert fence.wait_idle(1, timeout_s=0)
    fence.revoke(2)
    fence.revoke(3)  # over max_tombstones: the oldest (1) goes
    assert not fence.is_revoked(1) and fence.is_revoked(2)
    now[0] = 11.0
    assert not fence.is_revoked(2) and len(fence) == 0
    with pytest.raises(ValueError, match="tombstone_s"):
        WriteFence(tombstone_s=0)
