"""All writes of a KV hand-off in one Triton kernel launch (the `cuda_ipc` copy mode `kernel`).

A scattered hand-off is many short writes (131,072 of 2 KB for a 2,048-token Llama-3-8B
prompt in 1-token pages): one driver call per write (memcpy), or per copy inside the batch
call, costs microseconds each, and a torch gather and scatter per region pair moves the
bytes twice. Here the writes go to the device as one int64 table `[3, n]` (source address,
destination address, length in bytes) and one launch copies them all: program `(w, p)`
copies blocks `p, p + P, p + 2P, ...` of write `w` (P programs per write; one for short
writes), reading and writing through the addresses cast to pointers. The destination
addresses are the peer's memory mapped into this process (CUDA IPC): plain device pointers
here, as are the sources.

The word a launch moves per element is the widest of 16, 8, 4, 2 and 1 bytes that divides
every address and length of the hand-off (16 for any KV pool: pages are whole rows of
`head_dim` values); with 16, each thread loads and stores 16 bytes at a time (the pointers
and counts carry that divisibility as compiler hints). Each write's last partial block is
masked. Empty writes are left out.

Runs wherever Triton does: compiled on CUDA, and on host memory under Triton's interpreter
(`TRITON_INTERPRET=1`, which is how the CPU tests check it byte for byte).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import triton
import triton.language as tl

# Bytes a program copies per loop step. With 4 warps and 16-byte words, 16 KB is eight
# 16-byte loads in flight per thread: enough to cover the latency of a read from HBM.
BLOCK_BYTES = 16 << 10
# Elements per step at most: narrower words take smaller blocks (16 elements a thread; with
# 16 KB of bytes, each thread would hold 128 and spill its registers).
MAX_BLOCK = 2048
NUM_WARPS = 4
# Programs a launch aims for (the H200 has 132 SMs: some tens of resident programs each);
# long writes are split into up to this many programs in all, short ones take one each.
TARGET_PROGRAMS = 8192
# CUDA's limit on a grid's second dimension.
_MAX_GRID_Y = 65535

# word bytes -> (element type, element bytes)
ELEMENTS = {16: (tl.int64, 8), 8: (tl.int64, 8), 4: (tl.int32, 4), 2: (tl.int16, 2),
             1: (tl.uint8, 1)}  # fmt: skip


@triton.jit
def copy_writes_kernel(
    writes,  # int64 [3, n]: source addresses, destination addresses, lengths in bytes
    n,
    ELEM: tl.constexpr,  # the element type loads and stores move
    ELEM_BYTES: tl.constexpr,
    WORD: tl.constexpr,  # bytes dividing every address and length (a multiple of ELEM_BYTES)
    BLOCK: tl.constexpr,  # elements per loop step
):
    w = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    src = tl.multiple_of(tl.load(writes + w).to(tl.pointer_type(ELEM)), WORD)
    dst = tl.multiple_of(tl.load(writes + n + w).to(tl.pointer_type(ELEM)), WORD)
    count = tl.multiple_of(tl.load(writes + 2 * n + w) // ELEM_BYTES, WORD // ELEM_BYTES)
    offs = tl.arange(0, BLOCK)
    whole = count - count % BLOCK  # elements in whole blocks: copied without masks
    for start in range(part * BLOCK, whole, parts * BLOCK):
        tl.store(dst + start + offs, tl.load(src + start + offs))
    if part == parts - 1:  # the last partial block
        at = whole + offs
        inside = at < count
        tl.store(dst + at, tl.load(src + at, mask=inside), mask=inside)


def word_bytes(src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> int:
    """The widest word (16, 8, 4, 2 or 1 bytes) dividing every address and length."""
    bits = int(np.bitwise_or.reduce(src | dst | length)) if len(src) else 0
    for word in (16, 8, 4, 2):
        if bits % word == 0:
            return word
    return 1


def block_elements(elem_bytes: int) -> int:
    """Elements a program copies per loop step, for elements of `elem_bytes`."""
    return min(BLOCK_BYTES // elem_bytes, MAX_BLOCK)


def launch_shape(length: np.ndarray, elem_bytes: int) -> tuple[int, int]:
    """`(elements per block, programs per write)` for writes of `length` bytes (non-empty)."""
    block = block_elements(elem_bytes)
    blocks = -(-int(length.max()) // (block * elem_bytes))
    wanted = -(-TARGET_PROGRAMS // len(length))
    return block, max(1, min(blocks, wanted, _MAX_GRID_Y))


class WriteCopier:
    """Copies writes on one device (or the host, under the interpreter) with
    `copy_writes_kernel`, on the current torch stream. The write table goes up through a
    pinned buffer kept for the next call (on CUDA). One call at a time: `copy` holds a lock
    until the caller's `done` (the stream synchronised), so the buffer is not overwritten
    while a copy from it may still be in flight."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lock = threading.Lock()
        self._pinned: torch.Tensor | None = None
        self._table: torch.Tensor | None = None

    def _upload(self, src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> torch.Tensor:
        """The write table `[3, n]` on the device, written once into the pinned buffer (grown
        to a power of two) and copied up from there on the current stream."""
        n = len(length)
        if self.device.type != "cuda":
            return torch.from_numpy(np.concatenate([src, dst, length]).astype(np.int64))
        if self._pinned is None or self._table is None or len(self._pinned) < 3 * n:
            cap = triton.next_power_of_2(3 * n)
            self._pinned = torch.empty(cap, dtype=torch.int64, pin_memory=True)
            self._table = torch.empty(cap, dtype=torch.int64, device=self.device)
        host = self._pinned[: 3 * n].numpy().reshape(3, n)
        host[0], host[1], host[2] = src, dst, length
        table = self._table[: 3 * n]
        table.copy_(self._pinned[: 3 * n], non_blocking=True)
        return table

    def copy(self, src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> None:
        """Launch the copy of `length[i]` bytes from `src[i]` to `dst[i]` (int64 arrays of
        addresses this device can reach) on the current stream; the caller holds `lock`
        and waits for the stream before releasing it."""
        keep = length > 0
        if not keep.all():
            src, dst, length = src[keep], dst[keep], length[keep]
        n = len(length)
        if not n:
            return
        word = word_bytes(src, dst, length)
        elem, elem_bytes = ELEMENTS[word]
        block, parts = launch_shape(length, elem_bytes)
        table = self._upload(src, dst, length)
        copy_writes_kernel[(n, parts)](
            table, n, ELEM=elem, ELEM_BYTES=elem_bytes, WORD=word, BLOCK=block,
            num_warps=NUM_WARPS,
        )  # fmt: skip
