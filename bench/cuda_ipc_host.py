"""Host time of one `cuda_ipc` KV hand-off: everything `CudaIpcTransferEngine` does in Python
for a batch of writes (translating destinations into the mapping, planning, choosing the copy
mode), with a driver whose copy calls do no device work: they are counted.

The shapes are bench/kv_transfer_gpu.py's on the H200: Llama-3-8B (32 layers, K and V each,
8 KV heads x 128 dims, bfloat16), a 2,048-token prompt (268 MB), pools of twice the prompt's
pages, each K and V tensor its own allocation and registered region (64 per side), the write
list from `build_write_batch`: 16-token pages to contiguous destination pages (64 writes),
and 64-, 16- and 1-token pages to every other destination page (2,048, 8,192 and 131,072
writes). Each hand-off goes through `PageWriter`, as the prefill worker's do.

What a copy call costs on a GPU is not here: `memcpy` issues one ctypes `cuMemcpyDtoDAsync`
per counted call (the table's last column prices them, and each batch call, at a ctypes call
of the same shape into libc, timed here: a lower bound, the driver's own work per call is not
in it), `batch` one `cuMemcpyBatchAsync` for all writes (the driver here plays one that has
it, as the H200's CUDA 13 driver does), `rows` one gather and one scatter with torch per
region pair, `kernel` one Triton launch for all writes (the write table's upload and the
launch are not in it). After the timed runs, one more
hand-off is recorded and checked: the copies issued move every byte of the batch once, to
the mapped address of its destination.

    python -m bench.cuda_ipc_host                    # the H200 cases, median of 5
    python -m bench.cuda_ipc_host --layers 2 --prompt-tokens 64 --reps 1   # a smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kv_transfer import KVLayout, KVPoolDescriptor, PageWriter, WriteBatch, build_write_batch
from kv_transfer.cuda_ipc import (
    COPY_MODES,
    Allocation,
    Copies,
    CudaIpcTransferEngine,
    IpcError,
    RowCopy,
)

# Fake device addresses: allocations 2 MiB-aligned from here; a peer's allocation is "mapped"
# this far above its own address, so translation is not the identity.
_FIRST_ALLOCATION = 1 << 40
_MAPPED_OFFSET = 1 << 44
_ALIGN = 2 << 20


class CountingDriver:
    """`IpcDriver` with fake allocations and no device: copies are counted, not done. With
    `record` set, it also keeps what each copy call was given, for `check_coverage`."""

    def __init__(self) -> None:
        self._allocations: list[tuple[int, int]] = []
        self._next = _FIRST_ALLOCATION
        self.memcpy_calls = 0
        self.row_pairs = 0
        self.batch_calls = 0
        self.kernel_launches = 0
        self.can_copy_batch = True  # as on the H200's CUDA 13 driver
        self.can_copy_kernel = True  # Triton, as with torch's CUDA wheels
        self.record = False
        self.recorded: list[tuple[int, int, int]] = []

    def allocate(self, size: int) -> int:
        """A new allocation of `size` bytes; its base address."""
        base = self._next
        self._allocations.append((base, size))
        self._next += -(-size // _ALIGN) * _ALIGN + _ALIGN  # a gap: no two allocations touch
        return base

    def export(self, addr: int) -> Allocation:
        for base, size in self._allocations:
            if base <= addr < base + size:
                return Allocation(base, size, base.to_bytes(8, "little").ljust(64, b"\0"), 0)
        raise IpcError(f"address {addr:#x} is in no allocation")

    def device_of(self, addr: int) -> int:
        return 0

    def open(self, handle: bytes, device: int) -> int:
        return int.from_bytes(handle[:8], "little") + _MAPPED_OFFSET

    def close(self, mapped_base: int) -> None:
        pass

    def copy(self, device: int, copies: Copies) -> None:
        self.memcpy_calls += len(copies)
        if self.record:
            self.recorded.extend(copies.tuples())

    def copy_batch(self, device: int, copies: Copies) -> None:
        self.batch_calls += 1
        if self.record:
            self.recorded.extend(copies.tuples())

    def copy_kernel(self, device: int, copies: Copies) -> None:
        self.kernel_launches += 1
        if self.record:
            self.recorded.extend(copies.tuples())

    def copy_rows(self, device: int, rows: Sequence[RowCopy]) -> None:
        self.row_pairs += len(rows)
        if self.record:
            for r in rows:
                u = r.unit
                self.recorded.extend(
                    zip(
                        (r.dst_addr + r.dst_rows * u).tolist(),
                        (r.src_addr + r.src_rows * u).tolist(),
                        [u] * len(r.src_rows),
                        strict=True,
                    )
                )


def canonical(copies: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """`(dst, src, length)` rows sorted by destination, empty ones dropped, and those that
    continue the previous one in both destination and source merged: two lists of copies
    move the same bytes to the same places iff their canonical forms are equal."""
    if not copies:
        return np.zeros((0, 3), dtype=np.int64)
    c = np.asarray(copies, dtype=np.int64)
    c = c[c[:, 2] > 0]
    c = c[np.argsort(c[:, 0], kind="stable")]
    ends = c[:, :2] + c[:, 2:3]
    starts_run = np.ones(len(c), dtype=bool)
    starts_run[1:] = ~((ends[:-1, 0] == c[1:, 0]) & (ends[:-1, 1] == c[1:, 1]))
    run = np.cumsum(starts_run) - 1
    lengths = np.bincount(run, weights=c[:, 2]).astype(np.int64)
    return np.column_stack([c[starts_run, 0], c[starts_run, 1], lengths])


def check_coverage(batch: WriteBatch, recorded: Sequence[tuple[int, int, int]]) -> None:
    """Raise unless `recorded` moves exactly the batch's bytes to their mapped destinations."""
    writes = zip(batch.srcs, batch.dsts, batch.lengths, strict=True)
    want = canonical([(d + _MAPPED_OFFSET, s, n) for s, d, n in writes])
    got = canonical(recorded)
    if want.shape != got.shape or not np.array_equal(want, got):
        raise AssertionError(
            f"the copies issued ({len(recorded)}, {int(got[:, 2].sum())} bytes) are not the "
            f"batch's ({len(batch)} writes, {batch.total_bytes} bytes) at mapped addresses"
        )


def pool(driver: CountingDriver, layout: KVLayout, num_pages: int) -> KVPoolDescriptor:
    """K and V of every layer, each its own allocation (as torch allocates large tensors)."""
    size = num_pages * layout.k_page_bytes
    k = tuple(driver.allocate(size) for _ in range(layout.num_layers))
    v = tuple(driver.allocate(size) for _ in range(layout.num_layers))
    return KVPoolDescriptor(layout, k, v, num_pages)


def register(engine: CudaIpcTransferEngine, kv: KVPoolDescriptor) -> None:
    for addr, length in kv.regions():
        if engine.register_memory(addr, length) != 0:
            raise RuntimeError(f"register_memory({addr:#x}, {length}) failed")


def ctypes_call_us(calls: int = 200_000) -> float:
    """Microseconds of one ctypes call shaped like `cuMemcpyDtoDAsync_v2(u64, u64, size_t,
    void*)`, into libc's `memset` (length 0: no work), looked up once."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    fn = libc.memset
    fn.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_size_t]
    fn.restype = ctypes.c_void_p
    buf = ctypes.create_string_buffer(8)
    addr = ctypes.addressof(buf)
    start = time.perf_counter()
    for _ in range(calls):
        fn(addr, 0, 0)
    return (time.perf_counter() - start) / calls * 1e6


@dataclass(frozen=True)
class Row:
    page_tokens: int
    pattern: str
    writes: int
    mode: str
    host_ms: float
    memcpy_calls: int
    row_pairs: int
    batch_calls: int
    kernel_launches: int


def run_case(
    layout: KVLayout, prompt_tokens: int, pattern: str, modes: Sequence[str], warmup: int,
    reps: int,
) -> list[Row]:  # fmt: skip
    """Every copy mode's host time for one hand-off of `prompt_tokens` tokens' pages to
    contiguous or every other destination page."""
    prompt_pages = -(-prompt_tokens // layout.page_size)
    src_pages = list(range(prompt_pages))
    step = 1 if pattern == "contiguous" else 2
    dst_pages = list(range(0, step * prompt_pages, step))
    receiver_driver = CountingDriver()
    receiver = CudaIpcTransferEngine(receiver_driver, "auto")
    if receiver.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("the receiver's initialize failed")
    rows = []
    try:
        dst_pool = pool(receiver_driver, layout, 2 * prompt_pages)
        register(receiver, dst_pool)
        for mode in modes:
            driver = CountingDriver()
            sender = CudaIpcTransferEngine(driver, mode)
            try:
                src_pool = pool(driver, layout, 2 * prompt_pages)
                register(sender, src_pool)
                batch = build_write_batch(src_pool, dst_pool, src_pages, dst_pages)
                writer = PageWriter(sender)
                for _ in range(warmup):
                    writer.write(receiver.session_id, batch)
                driver.memcpy_calls = driver.row_pairs = driver.batch_calls = 0
                driver.kernel_launches = 0
                seconds = []
                for _ in range(reps):
                    start = time.perf_counter()
                    writer.write(receiver.session_id, batch)
                    seconds.append(time.perf_counter() - start)
                rows.append(Row(layout.page_size, pattern, len(batch), mode,
                                statistics.median(seconds) * 1e3, driver.memcpy_calls // reps,
                                driver.row_pairs // reps, driver.batch_calls // reps,
                                driver.kernel_launches // reps))  # fmt: skip
                driver.record = True
                writer.write(receiver.session_id, batch)
                check_coverage(batch, driver.recorded)
            finally:
                sender.close()
    finally:
        receiver.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["16:contiguous", "64:every-other", "16:every-other", "1:every-other"],
        help="PAGE_TOKENS:contiguous or PAGE_TOKENS:every-other",
    )
    parser.add_argument("--modes", nargs="+", default=list(COPY_MODES), choices=COPY_MODES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    cases = []
    for case in args.cases:
        tokens, _, pattern = case.partition(":")
        if not tokens.isdigit() or int(tokens) < 1 or pattern not in ("contiguous", "every-other"):
            parser.error(f"a case is PAGE_TOKENS:contiguous or :every-other, got {case!r}")
        cases.append((int(tokens), pattern))
    call_us = ctypes_call_us()
    print(
        f"CPU: {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
        f"{args.layers} layers, {args.kv_heads} KV heads, head_dim {args.head_dim}, "
        f"{args.dtype}, {args.prompt_tokens}-token prompt; median of {args.reps}; one ctypes "
        f"call of cuMemcpyDtoDAsync's shape: {call_us:.2f} µs here"
    )
    print("\n| page tokens | dst pages | writes | mode | host ms | µs per write | memcpy calls | "
          "row-copy pairs | batch calls | kernel launches | + ctypes ms (est.) |")  # fmt: skip
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for page_tokens, pattern in cases:
        layout = KVLayout("bench", args.dtype, page_tokens, args.layers, args.kv_heads,
                          args.head_dim)  # fmt: skip
        for r in run_case(layout, args.prompt_tokens, pattern, args.modes, args.warmup, args.reps):
            cells = [r.page_tokens, r.pattern, f"{r.writes:,}", r.mode, f"{r.host_ms:.2f}",
                     f"{1e3 * r.host_ms / r.writes:.2f}", f"{r.memcpy_calls:,}",
                     f"{r.row_pairs:,}", f"{r.batch_calls:,}", f"{r.kernel_launches:,}",
                     f"{(r.memcpy_calls + r.batch_calls) * call_us / 1e3:.2f}"]  # fmt: skip
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    print("\nevery case checked: the copies issued move each byte of the batch once, to its "
          "destination's mapped address")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
