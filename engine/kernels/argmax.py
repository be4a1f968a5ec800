"""Greedy sampling's argmax over a vocabulary row, split over many programs.

`logits.argmax(dim=-1)` runs one block per row: at batch 1 a 128,256-token row is one block
reading 500 KB on one SM, 27 µs on the H200, on the critical path between two decode steps.
Here each row is cut into chunks of whole `block`-element tiles; a first launch writes one
(max value, first index) partial per chunk from programs spread over the whole GPU (126 of them
at batch 1 for that vocabulary), a second reduces each row's partials to its token.

The result is torch.argmax's on CUDA exactly: the first index of the maximum; a NaN counts as
the maximum (the first NaN's index wins); a row of -inf gives 0. The reductions only take
min and max of values with the NaNs taken out first, so they give the same answer compiled
(where max ignores NaNs) and under Triton's interpreter (where it propagates them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl

BLOCK = 1024  # elements a program loads at once: 8 float32 a thread with 4 warps
MAX_TILES_PER_CHUNK = 8
# At batch 1 a chunk is one tile, which puts ~126 programs on the H200's 132 SMs for a
# 128k vocabulary; larger batches take up to MAX_TILES_PER_CHUNK tiles a chunk once there are
# more than this many tiles in all (fewer, longer programs; fewer partials to reduce).
_PROGRAMS_BEFORE_LONGER_CHUNKS = 1024
# Above any index: a row holds fewer elements (checked in `argmax`).
_NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _first_max(vals, idxs):
    """(value, index) of the first maximum of `vals` at `idxs`, NaN the greatest: the lowest
    index among the NaNs if there is one, else among the maxima. Padding given -inf and an
    index above every real one never wins (if -inf is the maximum, every real entry is -inf)."""
    is_nan = vals != vals
    nan_idx = tl.min(tl.where(is_nan, idxs, _NO_INDEX), 0)
    top = tl.max(tl.where(is_nan, float("-inf"), vals), 0)
    top_idx = tl.min(tl.where(vals == top, idxs, _NO_INDEX), 0)
    has_nan = nan_idx < _NO_INDEX
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, nan_idx, top_idx)


@triton.jit
def _argmax_partials_kernel(
    x_ptr,
    part_val_ptr,
    part_idx_ptr,
    stride_x,
    n,
    chunk,
    num_chunks,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    # x: [B, n], rows `stride_x` apart; partials: [B, num_chunks]. `chunk`: a multiple of BLOCK.
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    # Each lane keeps the first maximum of the positions it visits, in increasing order: a
    # later value replaces it only when greater, or when NaN over a non-NaN. The lane's first
    # position is its index until then (so a lane of -inf keeps its first one).
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = c * chunk + lanes
    for off in range(0, chunk, BLOCK):
        pos = c * chunk + off + lanes
        x = tl.load(x_ptr + row * stride_x + pos, mask=pos < n, other=float("-inf"))
        x = x.to(tl.float32)
        take = (x > best) | ((x != x) & (best == best))
        best = tl.where(take, x, best)
        best_idx = tl.where(take, pos, best_idx)
    # Lanes past the row's end hold -inf at their own position, after every real one.
    val, idx = _first_max(best, best_idx)
    tl.store(part_val_ptr + row * num_chunks + c, val)
    tl.store(part_idx_ptr + row * num_chunks + c, idx)


@triton.jit
def _argmax_combine_kernel(
    part_val_ptr, part_idx_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr, PDL: tl.constexpr
):
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    valid = cs < num_chunks
    vals = tl.load(part_val_ptr + row * num_chunks + cs, mask=valid, other=float("-inf"))
    idxs = tl.load(part_idx_ptr + row * num_chunks + cs, mask=valid, other=_NO_INDEX)
    _, idx = _first_max(vals, idxs)
    tl.store(out_ptr + row, idx.to(tl.int64))


def chunk_size(rows: int, n: int, block: int = BLOCK) -> int:
    """Elements of a row one program reduces: one tile while that leaves at most
    `_PROGRAMS_BEFORE_LONGER_CHUNKS` programs, else more tiles (up to MAX_TILES_PER_CHUNK)."""
    tiles = rows * triton.cdiv(n, block)
    per_chunk = min(MAX_TILES_PER_CHUNK, max(1, tiles // _PROGRAMS_BEFORE_LONGER_CHUNKS))
    return per_chunk * block


def argmax(logits: torch.Tensor, *, block: int = BLOCK, chunk: int | None = None) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for `logits` `[B, V]` (floating point, on a CUDA device or, under
    Triton's interpreter, the CPU), as int64 `[B]` on its device, without a host sync.

    `block` (a power of two) and `chunk` (a multiple of it; default `chunk_size`) set how a row
    is cut; tests pass small ones to exercise the chunk boundaries at small vocabularies."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"argmax takes floating [B, V] logits, got {logits.dtype} {logits.shape}")
    rows, n = logits.shape
    if block <= 0 or block & (block - 1):
        raise ValueError(f"argmax's block must be a power of two, got {block}")
    if chunk is None:
        chunk = chunk_size(rows, n, block)
    if chunk <= 0 or chunk % block:
        raise ValueError(f"argmax's chunk must be a multiple of block {block}, got {chunk}")
    # Positions are int32, up to the end of the row's last chunk.
    if n == 0 or n + chunk >= _NO_INDEX.value:
        raise ValueError(f"argmax takes rows of 1 to 2**31 - 1 - chunk elements, got {n}")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    num_chunks = triton.cdiv(n, chunk)
    part_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=x.device)
    _argmax_partials_kernel[(rows, num_chunks)](
        x, part_val, part_idx, x.stride(0), n, chunk, num_chunks,
        BLOCK=block, num_warps=4, **pdl.launch_args(x),
    )  # fmt: skip
    block_c = max(16, triton.next_power_of_2(num_chunks))
    _argmax_combine_kernel[(rows,)](
        part_val, part_idx, out, num_chunks,
        BLOCK_C=block_c, num_warps=1 if block_c <= 256 else 4, **pdl.launch_args(x),
    )  # fmt: skip
    return out
