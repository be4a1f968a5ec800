"""The `cuda_ipc` backend's exchange, address arithmetic, peer handling and errors, without a
GPU: its driver calls run on POSIX shared memory (tests/kv_transfer/shm_driver.py), the rest
is the backend as it runs on a GPU host, over real sockets and across real processes. The
byte-for-byte check on CUDA memory is tests/gpu/test_cuda_ipc.py."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kv_transfer import KVLayout, KVPoolDescriptor, PageWriter, build_write_batch
from kv_transfer.cuda_ipc import (
    Copies,
    CudaIpcTransferEngine,
    IpcError,
    PeerTable,
    RegionIndex,
    plan_row_copies,
    rows_pay_off,
)
from kv_transfer.transfer_engine import TransferError, create_transfer_engine
from tests.kv_transfer.shm_driver import SharedMemoryDriver, view

LAYOUT = KVLayout(model="m", dtype="float32", page_size=4, num_layers=2, num_kv_heads=1,
                  head_dim=16)  # fmt: skip
PAGE = LAYOUT.k_page_bytes  # 256 bytes: MIN_ROW_BYTES, the narrowest rows
NUM_PAGES = 8
LAYER = NUM_PAGES * PAGE
TIMEOUT_S = 30


def pool_at(base: int) -> KVPoolDescriptor:
    """K and V of every layer back to back from `base`: K0 V0 K1 V1."""
    n = LAYOUT.num_layers
    return KVPoolDescriptor(
        LAYOUT,
        tuple(base + 2 * layer * LAYER for layer in range(n)),
        tuple(base + (2 * layer + 1) * LAYER for layer in range(n)),
        NUM_PAGES,
    )


class Receiver:
    """A receiving engine whose pool lives in one shared segment (one "allocation")."""

    def __init__(self, hostname: str = "127.0.0.1", register: str = "kv") -> None:
        self.driver = SharedMemoryDriver()
        self.segment, base = self.driver.own(2 * LAYOUT.num_layers * LAYER)
        self.pool = pool_at(base)
        self.engine = CudaIpcTransferEngine(self.driver)
        assert self.engine.initialize(hostname, "P2PHANDSHAKE", "tcp", "") == 0
        for layer in range(LAYOUT.num_layers):
            if "k" in register:
                assert self.engine.register_memory(self.pool.k_base_addrs[layer], LAYER) == 0
            if "v" in register:
                assert self.engine.register_memory(self.pool.v_base_addrs[layer], LAYER) == 0

    def page(self, which: str, layer: int, page: int) -> bytes:
        base = (2 * layer + (which == "v")) * LAYER + page * PAGE
        return bytes(view(self.segment)[base : base + PAGE])

    def close(self) -> None:
        self.engine.close()
        self.driver.release()


class Sender:
    """A writing engine and a source pool of distinct bytes, registered with the engine as a
    prefill worker's is (which lets it copy pages as rows)."""

    def __init__(
        self, copy_mode: str = "auto", can_batch: bool = True, can_kernel: bool = True
    ) -> None:
        self.driver = SharedMemoryDriver()
        self.driver.can_copy_batch = can_batch
        self.driver.can_copy_kernel = can_kernel
        self.engine = CudaIpcTransferEngine(self.driver, copy_mode)
        assert self.engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        size = 2 * LAYOUT.num_layers * LAYER
        segment, base = self.driver.own(size)
        view(segment)[:] = os.urandom(size)
        self.pool = pool_at(base)
        for addr, length in self.pool.regions():
            assert self.engine.register_memory(addr, length) == 0

    def page(self, which: str, layer: int, page: int) -> bytes:
        addr = (self.pool.v_page_addr if which == "v" else self.pool.k_page_addr)(layer, page)
        return ctypes.string_at(addr, PAGE)

    def close(self) -> None:
        self.engine.close()
        self.driver.release()

    def write(self, dest: Receiver | tuple[str, KVPoolDescriptor], src: list[int],
              dst: list[int]) -> None:  # fmt: skip
        session, pool = (dest.engine.session_id, dest.pool) if isinstance(dest, Receiver) else dest
        PageWriter(self.engine).write(session, build_write_batch(self.pool, pool, src, dst))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def sender() -> Iterator[Sender]:
    s = Sender()
    yield s
    s.close()


def check_pages(
    get_dst: Any, sender: Sender, src: list[int], dst: list[int], untouched: list[int]
) -> None:
    for layer in range(LAYOUT.num_layers):
        for which in ("k", "v"):
            for s, d in zip(src, dst, strict=True):
                assert get_dst(which, layer, d) == sender.page(which, layer, s), (which, layer, d)
            for d in untouched:
                assert get_dst(which, layer, d) == bytes(PAGE), (which, layer, d)


# (copy mode, whether the driver has the batch call, whether Triton imports) -> (row copies,
# batch calls, kernel launches) of the three writes below.
MODE_CALLS = {
    ("memcpy", True, True): (0, 0, 0),
    ("rows", True, True): (3 * 2 * LAYOUT.num_layers, 0, 0),
    ("batch", True, True): (0, 3, 0),
    ("kernel", True, True): (0, 0, 3),
    ("auto", True, True): (0, 0, 3),  # short writes, all of them: one launch each, no batch
    ("auto", True, False): (2 * LAYOUT.num_layers, 0, 0),  # no Triton: rows where they pay
    ("auto", False, False): (2 * LAYOUT.num_layers, 0, 0),
}


@pytest.mark.parametrize(("mode", "can_batch", "can_kernel"), list(MODE_CALLS))
def test_pages_land_byte_for_byte_with_one_mapping_per_allocation(
    receiver: Receiver, mode: str, can_batch: bool, can_kernel: bool
) -> None:
    sender = Sender(mode, can_batch, can_kernel)
    try:
        src, dst = [0, 1, 2, 5, 6, 3], [3, 4, 5, 0, 1, 7]  # three runs
        sender.write(receiver, src, dst)
        check_pages(receiver.page, sender, src, dst, untouched=[2, 6])
        # Four registered regions in one allocation: opened once, kept for the next write.
        sender.write(receiver, [7], [2])
        assert sender.driver.opens == 1 and sender.driver.closes == 0
        check_pages(receiver.page, sender, [7], [2], untouched=[6])
        # Pages crossed over (a run's ends one apart, its middle not): rows, in the order given.
        src, dst = [0, 2, 1, 3, 4, 6, 5, 7], [0, 1, 2, 3, 4, 5, 6, 7]
        sender.write(receiver, src, dst)
        check_pages(receiver.page, sender, src, dst, untouched=[])
        # Without the kernel, 3 and 1 writes per region pair stay memcpy under auto; 8 go as
        # rows.
        d = sender.driver
        calls = (d.row_copies, d.batches, d.kernel_launches)
        assert calls == MODE_CALLS[(mode, can_batch, can_kernel)]
    finally:
        sender.close()


def test_a_kernel_that_fails_leaves_auto_on_rows(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Triton imports but its kernel cannot compile or launch here: `auto` copies that hand-off
    and every later one as rows; mode `kernel` fails the write, with the reason logged."""
    attempts = []

    def broken(device: int, copies: Copies) -> None:
        attempts.append(len(copies))
        raise IpcError("the copy kernel (8 writes) failed: CompilationError: no C compiler")

    for mode in ("auto", "kernel"):
        sender = Sender(mode)
        sender.driver.copy_kernel = broken  # type: ignore[method-assign]
        attempts.clear()
        try:
            src, dst = [0, 2, 4, 6], [1, 3, 5, 7]
            with caplog.at_level(logging.WARNING):
                if mode == "kernel":
                    with pytest.raises(TransferError):
                        sender.write(receiver, src, dst)
                    assert "no C compiler" in caplog.text and attempts == [16]
                    continue
                sender.write(receiver, src, dst)
                check_pages(receiver.page, sender, src, dst, untouched=[0, 2, 4, 6])
                sender.write(receiver, [1, 3], [0, 2])
                check_pages(receiver.page, sender, [1, 3], [0, 2], untouched=[4, 6])
            assert "the copy kernel failed, auto copies as rows" in caplog.text
            assert attempts == [16]  # tried once, not again
            # The first write's 4 pages per region pair as rows; the second's 2 by memcpy.
            assert sender.driver.row_copies == 2 * LAYOUT.num_layers
        finally:
            sender.close()


def copies_of(*writes: tuple[int, int, int]) -> Copies:
    """`Copies` of `(dst, src, length)` writes."""
    return Copies.of([w[0] for w in writes], [w[1] for w in writes], [w[2] for w in writes])


def test_row_plan_arithmetic() -> None:
    src = RegionIndex([(1000, 4096), (9000, 4096)])
    dst = RegionIndex([(50_000, 8192)])
    page = 512
    copies = copies_of(
        (50_000 + 3 * page, 1000 + 0 * page, 2 * page),  # a run of two pages
        (50_000 + 0 * page, 1000 + 5 * page, page),
        (50_000 + 9 * page, 9000 + 1 * page, page),  # another source region: its own pair
        (50_000, 70_000, page),  # a source outside registered memory: copied on its own
    )
    rows, single = plan_row_copies(copies, src, dst)
    assert list(single.tuples()) == [(50_000, 70_000, page)]
    assert [(r.src_addr, r.dst_addr, r.unit) for r in rows] == [(1000, 50_000, page),
                                                                 (9000, 50_000, page)]  # fmt: skip
    assert [(r.src_len, r.dst_len) for r in rows] == [(4096, 8192), (4096, 8192)]
    assert rows[0].src_rows.tolist() == [0, 1, 5] and rows[0].dst_rows.tolist() == [3, 4, 0]
    assert rows[1].src_rows.tolist() == [1] and rows[1].dst_rows.tolist() == [9]
    # Rows are as wide as every offset and length allow: two pages here.
    rows, _ = plan_row_copies(copies_of((50_000 + 2 * page, 1000, 2 * page)), src, dst)
    assert rows[0].unit == 2 * page and rows[0].dst_rows.tolist() == [1]
    # Rows narrower than MIN_ROW_BYTES: one by one instead, after the unpaired writes.
    rows, single = plan_row_copies(
        copies_of((50_000, 70_000, page), (50_000 + 8, 1000 + 16, 8), (50_000, 9000, page)),
        src,
        dst,
    )
    assert [(r.src_addr, r.src_rows.tolist()) for r in rows] == [(9000, [0])]
    assert list(single.tuples()) == [(50_000, 70_000, page), (50_000 + 8, 1000 + 16, 8)]
    rows, single = plan_row_copies(copies_of((50_000, 1000, 0)), src, dst)
    assert rows == [] and len(single) == 0
    assert src.find(1000 + 4000, 96) == (1000, 4096) and src.find(1000 + 4000, 97) is None


def test_pairs_interleaved_are_grouped_in_order_of_first_write() -> None:
    src = RegionIndex([(1000, 4096), (9000, 4096)])
    dst = RegionIndex([(50_000, 8192)])
    page = 256
    writes = copies_of(
        (50_000 + 4 * page, 9000, page),
        (50_000, 1000, page),
        (50_000 + 5 * page, 9000 + page, page),
        (50_000 + page, 1000 + 2 * page, page),
    )
    rows, single = plan_row_copies(writes, src, dst)
    assert len(single) == 0
    assert [(r.src_addr, r.src_rows.tolist(), r.dst_rows.tolist()) for r in rows] == [
        (9000, [0, 1], [4, 5]),
        (1000, [0, 2], [0, 1]),
    ]


def test_region_index_matches_a_walk_over_every_region() -> None:
    """Nested, overlapping and repeated regions: `find_all` picks what a plain scan picks
    (the holding region that starts last, the longest of those)."""
    rng = np.random.default_rng(0)
    starts, lengths = rng.integers(0, 1000, 40).tolist(), rng.integers(1, 300, 40).tolist()
    regions = list(zip(starts, lengths, strict=True))
    regions += [(0, 2000), (100, 50), (100, 50), (100, 400)]
    index = RegionIndex(regions)
    addrs = rng.integers(-10, 2100, 5000)
    lengths = rng.integers(0, 200, 5000)

    def scan(addr: int, length: int) -> tuple[int, int] | None:
        holding = [r for r in regions if r[0] <= addr and addr + length <= r[0] + r[1]]
        return max(holding) if holding else None

    found = index.find_all(addrs, lengths)
    for a, n, i in zip(addrs.tolist(), lengths.tolist(), found.tolist(), strict=True):
        assert (index.regions[i] if i >= 0 else None) == scan(a, n), (a, n)
    assert RegionIndex([]).find_all(np.array([5]), np.array([1])).tolist() == [-1]


def test_auto_takes_rows_for_many_short_writes_per_pair_only() -> None:
    mb = 1 << 20
    # The H200 cases: 64 regions a side, a 2,048-token Llama-3-8B prompt (268 MB).
    assert not rows_pay_off(64, 64, 268 * mb)  # 16-token pages, contiguous: 4 MB writes
    assert rows_pay_off(8192, 64, 268 * mb)  # 16-token pages scattered: 32 KB writes
    assert rows_pay_off(131_072, 64, 268 * mb)  # 1-token pages
    assert rows_pay_off(2048, 64, 268 * mb)  # 64-token pages: 128 KB writes
    assert not rows_pay_off(3 * 64, 64, 64 * mb)  # three writes a pair
    assert not rows_pay_off(16 * 64, 64, 1024 * mb)  # many, but 1 MB each


def test_bad_writes_are_refused_before_any_peer_is_asked(caplog: pytest.LogCaptureFixture) -> None:
    engine = CudaIpcTransferEngine(SharedMemoryDriver())
    with caplog.at_level(logging.ERROR):
        assert engine.batch_transfer_sync_write("nowhere:1", [1 << 63], [4096], [8]) == -1
        assert engine.batch_transfer_sync_write("nowhere:1", [4096], [1 << 62], [8]) == -1
        assert engine.batch_transfer_sync_write("nowhere:1", [1, 2], [3, 4], [8, -2]) == -1
    assert "source is not an int of 64 bits" in caplog.text
    assert "destination is out of range" in caplog.text
    assert "lengths[1] = -2" in caplog.text and "cannot reach" not in caplog.text


def receiver_main(inbox: Any, outbox: Any) -> None:
    r = Receiver()
    outbox.put((r.engine.session_id, r.pool))
    while (message := inbox.get(timeout=TIMEOUT_S)) != "stop":
        outbox.put([r.page(w, layer, p) for w, layer, p in message])
    r.close()


def test_handoff_across_processes(sender: Sender) -> None:
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=receiver_main, args=(inbox, outbox))
    proc.start()
    try:
        session, pool = outbox.get(timeout=TIMEOUT_S)
        src, dst = [4, 5, 6, 7, 0], [0, 1, 2, 3, 6]
        sender.write((session, pool), src, dst)
        keys = [(w, layer, p) for w in "kv" for layer in range(2) for p in range(NUM_PAGES)]
        inbox.put(keys)
        pages = dict(zip(keys, outbox.get(timeout=TIMEOUT_S), strict=True))
        check_pages(lambda w, layer, p: pages[(w, layer, p)], sender, src, dst, [4, 5, 7])
    finally:
        inbox.put("stop")
        proc.join(TIMEOUT_S)
    # The receiver is gone: the next write fails (and drops the mapping) instead of landing
    # in memory nobody reads.
    with pytest.raises(TransferError, match="return code -1"):
        sender.write((session, pool), [0], [0])
    assert sender.driver.closes == 1


def test_unregistered_destination_fails_and_writes_nothing(
    sender: Sender, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(register="k")  # V is in the same allocation, but not registered
    try:
        v0 = receiver.pool.v_base_addrs[0]
        k_src, k_dst = sender.pool.k_base_addrs[0], receiver.pool.k_base_addrs[0]
        session = receiver.engine.session_id
        with caplog.at_level(logging.ERROR):
            rc = sender.engine.batch_transfer_sync_write(
                session, [k_src, k_src], [k_dst, v0], [PAGE, PAGE]
            )
        assert rc == -1
        assert "is not inside memory registered by the cuda_ipc session" in caplog.text
        assert receiver.page("k", 0, 0) == bytes(PAGE)  # the valid write did not run either
        # A write running past the end of a registered region fails the same way.
        last_k = receiver.pool.k_page_addr(0, NUM_PAGES - 1)
        rc = sender.engine.transfer_sync_write(session, k_src, last_k, 2 * PAGE)
        assert rc == -1
        # Registered later, V is found: the writer asks for the table again on a miss.
        for layer in range(LAYOUT.num_layers):
            assert receiver.engine.register_memory(receiver.pool.v_base_addrs[layer], LAYER) == 0
        sender.write(receiver, [1, 2], [0, 5])
        check_pages(receiver.page, sender, [1, 2], [0, 5], untouched=[1, 4])
        # Unregistered again: this writer's table still lists it until its next miss; a new
        # writer's does not.
        assert receiver.engine.unregister_memory(receiver.pool.v_base_addrs[0]) == 0
        fresh = Sender()
        with pytest.raises(TransferError):
            fresh.write(receiver, [0], [0])
        fresh.close()
    finally:
        receiver.close()


def test_a_receiver_restarted_on_the_same_port_is_a_new_peer(sender: Sender) -> None:
    first = Receiver()
    port = first.engine.get_rpc_port()
    sender.write(first, [0], [0])
    first.close()
    second = Receiver(hostname=f"127.0.0.1:{port}")
    try:
        assert second.engine.session_id == f"127.0.0.1:{port}"
        sender.write(second, [3, 4], [6, 7])
        check_pages(second.page, sender, [3, 4], [6, 7], untouched=[0])
        assert sender.driver.opens == 2 and sender.driver.closes == 1
    finally:
        second.close()


def test_a_receiver_on_another_host_is_refused(
    receiver: Receiver, sender: Sender, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.engine._boot_id = "another-boot-id"
    with caplog.at_level(logging.ERROR), pytest.raises(TransferError):
        sender.write(receiver, [0], [0])
    assert "runs on another host" in caplog.text and "--transfer-backend mooncake" in caplog.text
    assert sender.driver.opens == 0


def test_bad_calls_fail_with_a_code(
    receiver: Receiver, sender: Sender, caplog: pytest.LogCaptureFixture
) -> None:
    e, session = sender.engine, receiver.engine.session_id
    src, dst = sender.pool.k_base_addrs[0], receiver.pool.k_base_addrs[0]
    with caplog.at_level(logging.ERROR):
        assert e.batch_transfer_sync_write(session, [src], [dst, dst], [PAGE]) == -1
        assert e.batch_transfer_sync_write(session, [src], [dst], [-1]) == -1
        assert e.batch_transfer_sync_write(session, [], [], []) == 0
        assert e.transfer_sync_write("no-port", src, dst, PAGE) == -1
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed = f"127.0.0.1:{s.getsockname()[1]}"
        assert e.transfer_sync_write(closed, src, dst, PAGE) == -1
        assert receiver.engine.register_memory(src, PAGE) == -1  # not exportable memory
        assert receiver.engine.register_memory(dst, 0) == -1
        assert receiver.engine.unregister_memory(12345) == -1
        assert receiver.engine.initialize("127.0.0.1", "", "", "") == -1
    for needle in ("must match", "negative", "'host:port'", "cannot reach", "in no shared",
                   "not registered", "initialize called twice"):  # fmt: skip
        assert needle in caplog.text, needle
    with pytest.raises(RuntimeError, match="before initialize"):
        _ = CudaIpcTransferEngine(SharedMemoryDriver()).session_id


def test_the_exchange_answers_unknown_requests_with_an_error(receiver: Receiver) -> None:
    host, port = receiver.engine.session_id.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        reader = s.makefile("rb")
        s.sendall(b"hello\n")
        assert b"unknown request" in reader.readline()
        s.sendall(b'{"op": "regions"}\n')
        table = PeerTable.from_json(reader.readline())
    assert table.pid == os.getpid() and len(table.regions) == 2 * LAYOUT.num_layers
    assert {r.alloc_base for r in table.regions} == {receiver.pool.k_base_addrs[0]}


def test_malformed_tables_are_refused() -> None:
    with pytest.raises(IpcError, match="malformed region table"):
        PeerTable.from_json(b'{"instance": "x"}')
    region = {"addr": 100, "length": 50, "alloc_base": 120, "alloc_size": 64, "handle": "00",
              "device": 0}  # fmt: skip
    line = PeerTable("x", "b", 1, ()).to_json().replace(b'"regions": []', b'"regions": [%s]' % (
        str(region).replace("'", '"').encode()))  # fmt: skip
    with pytest.raises(IpcError, match="not inside its allocation"):
        PeerTable.from_json(line)


def test_without_a_cuda_driver_the_error_names_the_fix() -> None:
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this host has the CUDA driver")
    except OSError:
        pass
    with pytest.raises(IpcError, match="use --transfer-backend mooncake"):
        create_transfer_engine("cuda_ipc")


def test_an_ipc_handle_keeps_all_its_64_bytes() -> None:
    """The driver's handle struct round-trips bytes with NULs in them (a c_char field cut
    them at the first NUL: the H200 run's handles arrived as 4 bytes)."""
    from kv_transfer.cuda_ipc import _IpcMemHandle

    raw = bytes([7, 1, 2, 3, 0, 0, 9] + [0] * 50 + [255] * 7)
    handle = _IpcMemHandle()
    ctypes.memmove(handle.reserved, raw, 64)
    assert bytes(handle.reserved) == raw
    assert ctypes.sizeof(_IpcMemHandle) == 64
