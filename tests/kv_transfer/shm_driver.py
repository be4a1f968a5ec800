"""`IpcDriver` on POSIX shared memory, for testing the `cuda_ipc` backend without a GPU.

Everything of the backend but the CUDA calls runs for real on it: the exchange listener and
its connections, the region tables, the address arithmetic, the peer handling and the errors,
across real processes. An "allocation" is a `SharedMemory` segment (its name is the handle),
"device" memory is host memory, and a copy is a `memmove` (a batch is too, counted; set
`can_copy_batch` false to play a driver without the batch call); row copies run the
backend's own torch code, and kernel copies its Triton kernel (`kv_transfer/copy_kernel.py`)
under Triton's interpreter (tests/conftest.py sets `TRITON_INTERPRET=1` without CUDA), on
the CPU (set `can_copy_kernel` false to play a host without Triton). The byte-for-byte
check of the CUDA driver itself is tests/gpu/test_cuda_ipc.py, on a GPU host.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any, cast

from kv_transfer.cuda_ipc import (
    BATCH_UNAVAILABLE,
    KERNEL_UNAVAILABLE,
    Allocation,
    Copies,
    IpcError,
    RowCopy,
    run_row_copies,
)

# Segments this process created (and whose unlinking its resource tracker owns).
_CREATED_HERE: set[str] = set()


def view(segment: shared_memory.SharedMemory) -> memoryview:
    return cast(memoryview, segment.buf)  # None only after close()


def address_of(segment: shared_memory.SharedMemory) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view(segment)))


class SharedMemoryDriver:
    """Exports the segments given to `own`; opens other processes' by name."""

    def __init__(self) -> None:
        self.owned: list[tuple[int, shared_memory.SharedMemory]] = []
        self.opened: dict[int, shared_memory.SharedMemory] = {}
        self.opens = 0  # handles opened so far, to check one open per allocation
        self.closes = 0
        self.row_copies = 0  # region pairs copied as rows
        self.batches = 0  # batch calls
        self.kernel_launches = 0
        self.can_copy_batch = True
        self.can_copy_kernel = True
        self._copier: Any = None

    def own(self, size: int) -> tuple[shared_memory.SharedMemory, int]:
        """A new segment this process exports, and its address."""
        segment = shared_memory.SharedMemory(create=True, size=size)
        _CREATED_HERE.add(segment.name)
        view(segment)[:] = bytes(size)
        base = address_of(segment)
        self.owned.append((base, segment))
        return segment, base

    def export(self, addr: int) -> Allocation:
        for base, segment in self.owned:
            if base <= addr < base + segment.size:
                handle = segment.name.encode().ljust(64, b"\0")
                return Allocation(base, segment.size, handle, 0)
        raise IpcError(f"address {addr:#x} is in no shared segment")

    def device_of(self, addr: int) -> int:
        return 0

    def open(self, handle: bytes, device: int) -> int:
        segment = shared_memory.SharedMemory(name=handle.rstrip(b"\0").decode())
        # Python < 3.13 tracks attached segments too and unlinks them when this process
        # exits, under the owner's feet: only the creator's tracker should.
        if segment.name not in _CREATED_HERE:
            resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
        base = address_of(segment)
        self.opened[base] = segment
        self.opens += 1
        return base

    def close(self, mapped_base: int) -> None:
        self.opened.pop(mapped_base).close()
        self.closes += 1

    def copy(self, device: int, copies: Copies) -> None:
        for dst, src, length in copies.tuples():
            ctypes.memmove(dst, src, length)

    def copy_batch(self, device: int, copies: Copies) -> None:
        if not self.can_copy_batch:
            raise IpcError(BATCH_UNAVAILABLE)
        self.batches += 1
        self.copy(device, copies)

    def release(self) -> None:
        """Unlink the segments this process created."""
        for _, segment in self.owned:
            segment.close()
            segment.unlink()
        self.owned.clear()

    def tensor(self, addr: int, nbytes: int) -> Any:
        import torch

        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=torch.uint8)

    def copy_rows(self, device: int, rows: Sequence[RowCopy]) -> None:
        self.row_copies += len(rows)
        run_row_copies(rows, self.tensor, "cpu")

    def copy_kernel(self, device: int, copies: Copies) -> None:
        if not self.can_copy_kernel:
            raise IpcError(KERNEL_UNAVAILABLE)
        import torch

        from kv_transfer.copy_kernel import WriteCopier

        if self._copier is None:
            self._copier = WriteCopier(torch.device("cpu"))
        self.kernel_launches += 1
        self._copier.copy(copies.src, copies.dst, copies.length)
