"""Write batches through an engine: split into calls, one call in flight per peer."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from kv_transfer import (
    KVLayout,
    KVPoolDescriptor,
    PageWriter,
    TransferEngine,
    TransferError,
    build_write_batch,
    write_batch,
)

LAYOUT = KVLayout("tiny-llama", "float32", page_size=4, num_layers=2, num_kv_heads=2, head_dim=8)
SRC = KVPoolDescriptor(LAYOUT, (0x10000, 0x20000), (0x30000, 0x40000), num_pages=16)
DST = KVPoolDescriptor(LAYOUT, (0x100000, 0x200000), (0x300000, 0x400000), num_pages=16)


class RecordingEngine(TransferEngine):
    """Records batch writes and the most calls ever in flight per peer; fails call `fail_at`."""

    def __init__(self, fail_at: int | None = None, call_s: float = 0.0) -> None:
        self.calls: list[tuple[str, list[int], list[int], list[int]]] = []
        self.fail_at = fail_at
        self.call_s = call_s
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()

    def initialize(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str
    ) -> int:
        return 0

    def get_rpc_port(self) -> int:
        return 1

    def register_memory(self, addr: int, length: int) -> int:
        return 0

    def unregister_memory(self, addr: int) -> int:
        return 0

    def transfer_sync_write(self, session_id: str, src: int, dst: int, length: int) -> int:
        return self.batch_transfer_sync_write(session_id, [src], [dst], [length])

    def batch_transfer_sync_write(
        self, session_id: str, srcs: list[int], dsts: list[int], lengths: list[int]
    ) -> int:
        with self._lock:
            index = len(self.calls)
            self.calls.append((session_id, srcs, dsts, lengths))
            self.in_flight[session_id] += 1
            self.max_in_flight[session_id] = max(
                self.max_in_flight[session_id], self.in_flight[session_id]
            )
        time.sleep(self.call_s)
        with self._lock:
            self.in_flight[session_id] -= 1
        return -1 if index == self.fail_at else 0

    @property
    def session_id(self) -> str:
        return "127.0.0.1:1"


def test_write_batch_splits_into_calls() -> None:
    batch = build_write_batch(SRC, DST, [0, 2, 4], [0, 2, 4])  # 3 runs x 4 = 12 writes
    engine = RecordingEngine()
    write_batch(engine, "decode:123", batch, max_writes_per_call=5)
    assert [len(srcs) for _, srcs, _, _ in engine.calls] == [5, 5, 2]
    assert {session for session, *_ in engine.calls} == {"decode:123"}
    assert [a for _, srcs, _, _ in engine.calls for a in srcs] == batch.srcs


def test_write_batch_stops_at_the_first_failed_call() -> None:
    batch = build_write_batch(SRC, DST, [0, 2, 4], [0, 2, 4])
    engine = RecordingEngine(fail_at=1)
    with pytest.raises(TransferError, match=r"5 writes \(1280 bytes\) to decode:123 failed .* -1"):
        write_batch(engine, "decode:123", batch, max_writes_per_call=5)
    assert len(engine.calls) == 2


def test_page_writer_keeps_one_call_in_flight_per_peer() -> None:
    engine = RecordingEngine(call_s=0.01)
    writer = PageWriter(engine, max_writes_per_call=4)
    batch = build_write_batch(SRC, DST, [0, 2], [0, 2])  # 8 writes: 2 calls each
    threads = [
        threading.Thread(target=writer.write, args=(peer, batch))
        for peer in ("decode-a:1", "decode-b:1")
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(engine.calls) == 16
    assert engine.max_in_flight == {"decode-a:1": 1, "decode-b:1": 1}


def test_page_writer_validates_its_limit() -> None:
    with pytest.raises(ValueError, match="max_writes_per_call must be >= 1, got 0"):
        PageWriter(RecordingEngine(), max_writes_per_call=0)
