"""Fused mixture-of-experts in Triton: align, two grouped GEMMs, combine.

A step's T tokens each chose `top_k` experts: `N = T * top_k` (token, expert) pairs, pair
`i` being token `i // top_k`'s `i % top_k`-th choice. The layer runs these kernels, none of
which waits on the host, and every buffer's size depends only on T (so a decode step can be
captured in a CUDA graph at a fixed batch size):

1. Align: sort the pairs by expert into blocks of `BLOCK_M` rows, each block holding pairs of
   a single expert, each expert's run padded to a whole block: `sorted_pairs` `[max_rows]`
   (pair index, or N for padding), `block_expert` `[max_blocks]` (the block's expert, -1 past
   the end) and `num_rows` `[1]` (rows in use). One program (`align_kernel`) for a decode
   step's few pairs; for more, kernels over chunks of pairs: two up to
   `FOLDED_OFFSETS_MAX_CHUNKS` chunks (count per chunk; then each program sums the counts
   itself and scatters), three beyond (count, prefix sums per expert in one program,
   scatter). Where this module also routes (`fused_moe_routed`, `fused_moe_grouped_routed`),
   the routing kernel counts its chunk too (`route_count_kernel`): one launch fewer.
2. `grouped_gemm_kernel` with `GATE_UP`: for every block, `x[pair // top_k] @ w13[e].T`, the
   gate and up halves in two accumulators, stored as `silu(gate) * up` `[N, I]`.
3. `grouped_gemm_kernel` without it: `act[pair] @ w2[e].T` `[N, H]`, in the pair's row.
   With a configuration's `tma`, `grouped_gemm_tma_kernel` runs both GEMMs instead: the
   weight tiles come through the tensor-memory accelerator, and the activation is stored in
   the sorted rows' order (`[max_rows, I]`), so that the down GEMM loads each block's rows
   as one slab that way too.
4. `combine_kernel`: `out[t] = sum_j weight[t, j] * y[t * top_k + j]` in float32.

Up to `SMALL_BATCH_PAIRS` pairs (or one token), `engine.kernels.fused_moe_small` computes the
same in two launches instead (no align, gate-up, then down and combine in one);
`fused_moe_routed` and `fused_moe_grouped_routed` also fold softmax top-k or DeepSeek's grouped
routing into that path's gate-up kernel.

Shared experts can ride along as extra experts (SGLang's "shared-expert fusion"): stacked after
the routed ones in `w13`/`w2`, every token choosing each of them with weight 1.0
(`fused_moe_grouped_routed`'s `num_shared`). Their outputs then join the combine's float32 sum
and the layer's output is rounded once, where a separate MLP rounds its output and the sum.

The weights are `w13` `[E, 2I, H]` (gate rows, then up rows) and `w2` `[E, H, I]`, the layout
of `engine.layers.moe.FusedExperts`. Expert ids outside `[0, E)` are not computed and add
nothing (expert parallelism marks the pairs another rank computes that way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
import triton
import triton.language as tl

from engine.kernels import pdl, tma
from engine.kernels.fused_moe_configs import MoEKernelConfig, kernel_config
from engine.kernels.fused_moe_small import (
    ROUTE_GROUPED,
    ROUTE_SOFTMAX,
    Routing,
    small_batch_moe,
    small_batch_moe_grouped_routed,
    small_batch_moe_routed,
)
from engine.kernels.moe_routing import grouped_topk, route_rows, softmax_topk
from engine.kernels.sms import H200_SHARED_MEMORY, shared_memory
from engine.layers.pending import PendingSum


@triton.jit
def align_kernel(
    topk_ids,  # [N] int (any integer dtype), the flattened [T, top_k] choices
    sorted_pairs,  # [max_rows] int32 out
    block_expert,  # [max_blocks] int32 out
    num_rows,  # [1] int32 out
    num_pairs,
    num_experts,
    max_rows,
    max_blocks,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,  # a power of two > num_experts: bin num_experts holds the strays
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    experts = tl.arange(0, E_POW2)
    lanes = tl.arange(0, CHUNK)
    # Pass 1: pairs per expert. A one-hot sum rather than atomics: deterministic, and it runs
    # the same under the interpreter.
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        idx = start + lanes
        e = tl.load(topk_ids + idx, mask=idx < num_pairs, other=num_experts).to(tl.int32)
        e = tl.where((e >= 0) & (e < num_experts), e, num_experts)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    counts = tl.where(experts < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded  # [E_POW2] first row of each expert's run
    total = tl.sum(padded, axis=0)
    tl.store(num_rows, total)

    # Each block's expert: the number of runs that end at or before the block's first row.
    for start in range(0, max_blocks, CHUNK):
        b = start + lanes
        first = b * BLOCK_M
        owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        owner = tl.where(first < total, owner, -1)
        tl.store(block_expert + b, owner, mask=b < max_blocks)

    for start in range(0, max_rows, CHUNK):
        r = start + lanes
        tl.store(sorted_pairs + r, tl.full([CHUNK], 0, tl.int32) + num_pairs, mask=r < max_rows)
    # The padding stores above and the scatter below may touch the same rows from different
    # threads of this program.
    tl.debug_barrier()

    # Pass 2: scatter each pair to its expert's next free row. A pair's rank within its expert
    # is the count of that expert's pairs in earlier chunks (`seen`) plus those before it in
    # its own chunk.
    seen = tl.zeros([E_POW2], dtype=tl.int32)
    earlier = lanes[None, :] < lanes[:, None]  # [CHUNK, CHUNK]: column j comes before row i
    for start in range(0, num_pairs, CHUNK):
        idx = start + lanes
        valid = idx < num_pairs
        e = tl.load(topk_ids + idx, mask=valid, other=num_experts).to(tl.int32)
        e = tl.where((e >= 0) & (e < num_experts), e, num_experts)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E_POW2]
        base = tl.sum(onehot * (starts + seen)[None, :], axis=1)
        same = (e[:, None] == e[None, :]) & earlier
        rank = tl.sum(same.to(tl.int32), axis=1)
        keep = valid & (e < num_experts)
        tl.store(sorted_pairs + base + rank, idx.to(tl.int32), mask=keep)
        seen += tl.sum(onehot, axis=0)


@triton.jit
def align_count_kernel(
    topk_ids,  # [N] int
    chunk_counts,  # [num_chunks, E_POW2] int32 out: pairs per expert in each chunk
    rank_in_chunk,  # [N] int32 out: a pair's rank among its expert's pairs in its chunk
    sorted_pairs,  # [max_rows] int32 out: filled with padding (N) here, scattered later
    num_pairs,
    num_experts,
    max_rows,
    FILL: tl.constexpr,  # rows of sorted_pairs each program pads
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    chunk = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    idx = chunk * CHUNK + lanes
    e = tl.load(topk_ids + idx, mask=idx < num_pairs, other=num_experts).to(tl.int32)
    e = tl.where((e >= 0) & (e < num_experts), e, num_experts)
    _count_chunk(
        e, idx, idx < num_pairs, chunk, chunk_counts, rank_in_chunk, sorted_pairs, num_pairs,
        max_rows, E_POW2, FILL,
    )  # fmt: skip


@triton.jit
def _count_chunk(
    e,  # [LANES] int32: each lane's expert in pair order, E for a stray or an empty lane
    pair,  # [LANES] each lane's pair index
    keep,  # [LANES] the lanes that hold a pair
    chunk,
    chunk_counts,
    rank_in_chunk,
    sorted_pairs,
    num_pairs,
    max_rows,
    E_POW2: tl.constexpr,
    FILL: tl.constexpr,
):
    """A chunk's part of the chunked align's first stage (`align_count_kernel`,
    `route_count_kernel`): its pairs per expert into `chunk_counts`' row `chunk`, each kept
    pair's rank among the earlier lanes of its expert into `rank_in_chunk`, and this program's
    FILL rows of `sorted_pairs` padded with N."""
    experts = tl.arange(0, E_POW2)
    counts = tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_counts + chunk * E_POW2 + experts, counts)
    lanes = tl.arange(0, e.shape[0])
    same = (e[:, None] == e[None, :]) & (lanes[None, :] < lanes[:, None])
    tl.store(rank_in_chunk + pair, tl.sum(same.to(tl.int32), axis=1), mask=keep)
    rows = chunk * FILL + tl.arange(0, FILL)
    tl.store(sorted_pairs + rows, tl.full([FILL], 0, tl.int32) + num_pairs, mask=rows < max_rows)


@triton.jit
def route_count_kernel(
    router_logits,  # [T, E_ROUTED]
    correction_bias,  # [E_ROUTED] with ROUTE_GROUPED, else unused
    topk_weights,  # [T, WIDTH] out (float32 grouped, else the logits' dtype)
    topk_ids,  # [T, WIDTH] int64 out
    chunk_counts,  # [num_chunks, E_POW2] int32 out: pairs per expert in each chunk
    rank_in_chunk,  # [N] int32 out: a pair's rank among its expert's pairs in its chunk
    sorted_pairs,  # [max_rows] int32 out: filled with padding (N) here, scattered later
    num_tokens,
    num_routed,  # E_ROUTED: the experts the router chooses from
    num_experts,  # E: the stacked experts (the routed ones, then any shared ones)
    stride_lt,
    scaling,  # ROUTE_GROUPED: the routed weights' scaling factor
    max_rows,
    WIDTH: tl.constexpr,  # pairs a token: the routed choices, then the shared experts
    K_POW2: tl.constexpr,
    L_POW2: tl.constexpr,  # ROUTE_SOFTMAX: a power of two >= E_ROUTED
    E_POW2: tl.constexpr,  # a power of two > E: bin E holds the strays
    BLOCK_T: tl.constexpr,  # tokens a program (a chunk: BLOCK_T * WIDTH pairs)
    FILL: tl.constexpr,  # rows of sorted_pairs each program pads
    ROUTE: tl.constexpr,  # fused_moe_small.ROUTE_SOFTMAX or ROUTE_GROUPED
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
    PDL: tl.constexpr,
):
    """The routing kernel (`softmax_topk_kernel` or `grouped_topk_kernel`, by the same row
    functions) and `align_count_kernel` in one launch: each program routes BLOCK_T tokens,
    stores their choices, and counts its chunk of pairs (theirs) as the count kernel does.
    The align's scatter follows (`chunk_pairs` = BLOCK_T * WIDTH)."""
    pdl.start(PDL)
    chunk = tl.program_id(0)
    tokens = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    # Rows past the last token route it again (their results are not stored).
    rows = tl.minimum(tokens, num_tokens - 1)
    chosen_w, chosen_id = route_rows(
        router_logits,
        rows,
        stride_lt,
        correction_bias,
        num_routed,
        scaling,
        ROUTE,
        WIDTH,
        K_POW2,
        L_POW2,
        RENORMALIZE,
        NUM_GROUPS,
        PER_GROUP,
        TOPK_GROUPS,
        NUM_SHARED,
        G_POW2,
        P_POW2,
    )
    slots = tl.arange(0, K_POW2)[None, :]
    keep = (tokens[:, None] < num_tokens) & (slots < WIDTH)  # [BLOCK_T, K_POW2]
    pair = tokens.to(tl.int64)[:, None] * WIDTH + slots
    tl.store(topk_weights + pair, chosen_w.to(topk_weights.dtype.element_ty), mask=keep)
    tl.store(topk_ids + pair, chosen_id, mask=keep)
    # The count, lanes in pair order (token-major, as `pair` is).
    ok = keep & (chosen_id >= 0) & (chosen_id < num_experts)
    _count_chunk(
        tl.reshape(tl.where(ok, chosen_id, num_experts).to(tl.int32), [BLOCK_T * K_POW2]),
        tl.reshape(pair, [BLOCK_T * K_POW2]),
        tl.reshape(keep, [BLOCK_T * K_POW2]),
        chunk, chunk_counts, rank_in_chunk, sorted_pairs, num_tokens * WIDTH, max_rows,
        E_POW2, FILL,
    )  # fmt: skip


@triton.jit
def align_offsets_kernel(
    chunk_counts,  # [num_chunks, E_POW2] int32; overwritten by each chunk's first row per expert
    expert_start,  # [E_POW2] int32 out: first row of each expert's run
    expert_end,  # [E_POW2] int32 out: one past its padded run
    num_rows,  # [1] int32 out
    num_chunks,
    num_experts,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    CHUNK_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    experts = tl.arange(0, E_POW2)
    seen = tl.zeros([E_POW2], dtype=tl.int32)
    # Exclusive prefix sums down the chunks, per expert, CHUNK_BLOCK chunks at a time.
    for c0 in range(0, num_chunks, CHUNK_BLOCK):
        rows = c0 + tl.arange(0, CHUNK_BLOCK)
        ptr = chunk_counts + rows[:, None] * E_POW2 + experts[None, :]
        tile = tl.load(ptr, mask=rows[:, None] < num_chunks, other=0)
        tl.store(
            ptr, tl.cumsum(tile, axis=0) - tile + seen[None, :], mask=rows[:, None] < num_chunks
        )
        seen += tl.sum(tile, axis=0)
    counts = tl.where(experts < num_experts, seen, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(expert_start + experts, ends - padded)
    tl.store(expert_end + experts, ends)
    tl.store(num_rows, tl.sum(padded, axis=0))


@triton.jit
def align_scatter_kernel(
    topk_ids,  # [N] int
    chunk_offsets,  # [num_chunks, E_POW2] int32: each chunk's first row within each expert
    rank_in_chunk,  # [N] int32
    expert_start,  # [E_POW2] int32
    expert_end,  # [E_POW2] int32
    num_rows,  # [1] int32
    sorted_pairs,  # [max_rows] int32 out
    block_expert,  # [max_blocks] int32 out
    num_pairs,
    num_experts,
    max_blocks,
    chunk_pairs,  # pairs a chunk: CHUNK, or fewer (the routing-and-count kernel's chunks)
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCKS_PER_CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    chunk = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    idx = chunk * chunk_pairs + lanes
    valid = (lanes < chunk_pairs) & (idx < num_pairs)
    e = tl.load(topk_ids + idx, mask=valid, other=num_experts).to(tl.int32)
    keep = valid & (e >= 0) & (e < num_experts)
    e = tl.where(keep, e, 0)
    row = (
        tl.load(expert_start + e)
        + tl.load(chunk_offsets + chunk * E_POW2 + e)
        + tl.load(rank_in_chunk + idx, mask=valid, other=0)
    )
    tl.store(sorted_pairs + row, idx.to(tl.int32), mask=keep)
    # This program's share of the blocks: each block's expert, -1 past the rows in use.
    b = chunk * BLOCKS_PER_CHUNK + tl.arange(0, BLOCKS_PER_CHUNK)
    first = b * BLOCK_M
    ends = tl.load(expert_end + tl.arange(0, E_POW2))
    owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
    owner = tl.where(first < tl.load(num_rows), owner, -1)
    tl.store(block_expert + b, owner, mask=b < max_blocks)


@triton.jit
def align_scatter_folded_kernel(
    topk_ids,  # [N] int
    chunk_counts,  # [num_chunks, E_POW2] int32: pairs per expert in each chunk, only read
    rank_in_chunk,  # [N] int32
    sorted_pairs,  # [max_rows] int32 out
    block_expert,  # [max_blocks] int32 out
    num_rows,  # [1] int32 out, stored by program 0
    num_pairs,
    num_experts,
    num_chunks,
    max_blocks,
    chunk_pairs,  # as align_scatter_kernel's
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCKS_PER_CHUNK: tl.constexpr,
    CHUNK_BLOCK: tl.constexpr,  # chunks per tile of the counts' sums
    PDL: tl.constexpr,
):
    """`align_offsets_kernel` and `align_scatter_kernel` in one launch, for up to
    `FOLDED_OFFSETS_MAX_CHUNKS` chunks: every program sums all the chunks' counts itself (the
    totals give each expert's run, the chunks before its own its first row within them), then
    scatters its chunk and stores its share of `block_expert` as `align_scatter_kernel` does.
    The same rows as the three-kernel path; one launch less, the single-program offsets
    kernel that sat between the others.
    No program writes what another reads (the counts stay raw, the padding was stored by the
    launch before), so none waits on another."""
    pdl.start(PDL)
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    seen = tl.zeros([E_POW2], dtype=tl.int32)  # pairs per expert in all the chunks
    before = tl.zeros([E_POW2], dtype=tl.int32)  # ... in the chunks before this one
    for c0 in range(0, num_chunks, CHUNK_BLOCK):
        rows = c0 + tl.arange(0, CHUNK_BLOCK)
        ptr = chunk_counts + rows[:, None] * E_POW2 + experts[None, :]
        tile = tl.load(ptr, mask=rows[:, None] < num_chunks, other=0)
        seen += tl.sum(tile, axis=0)
        before += tl.sum(tl.where(rows[:, None] < chunk, tile, 0), axis=0)
    counts = tl.where(experts < num_experts, seen, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    if chunk == 0:
        tl.store(num_rows, total)

    lanes = tl.arange(0, CHUNK)
    idx = chunk * chunk_pairs + lanes
    valid = (lanes < chunk_pairs) & (idx < num_pairs)
    e = tl.load(topk_ids + idx, mask=valid, other=num_experts).to(tl.int32)
    keep = valid & (e >= 0) & (e < num_experts)
    e = tl.where(keep, e, 0)
    # This chunk's first row in each expert's run, picked per pair.
    row = tl.gather(ends - padded + before, e, axis=0)
    row += tl.load(rank_in_chunk + idx, mask=valid, other=0)
    tl.store(sorted_pairs + row, idx.to(tl.int32), mask=keep)
    # This program's share of the blocks: each block's expert, -1 past the rows in use.
    b = chunk * BLOCKS_PER_CHUNK + tl.arange(0, BLOCKS_PER_CHUNK)
    first = b * BLOCK_M
    owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
    owner = tl.where(first < total, owner, -1)
    tl.store(block_expert + b, owner, mask=b < max_blocks)


@triton.jit
def _grouped_block(
    num_rows,
    block_expert,
    N_OUT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """This program's (row block, column tile, expert) in both grouped GEMMs; expert -1 for a
    block past the rows in use or one of no expert. Programs walk GROUP_M row blocks down one
    column of tiles before moving right, so the weight tiles of neighbouring blocks (often the
    same expert) are reused from L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(tl.load(num_rows), BLOCK_M)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    per_group = GROUP_M * num_n
    group_first = pid // per_group * GROUP_M
    group_size = tl.minimum(num_m - group_first, GROUP_M)
    in_use = group_size > 0
    size = tl.maximum(group_size, 1)
    pid_m = group_first + (pid % per_group) % size
    pid_n = (pid % per_group) // size
    expert = tl.load(block_expert + pid_m, mask=in_use, other=-1)
    return pid_m, pid_n, expert


@triton.jit
def _dot(a, b, acc, EXACT_FP32: tl.constexpr):
    """acc + a @ b: exact in float32 (the reference checks), the tensor cores' own otherwise."""
    return tl.dot(a, b, acc, input_precision="ieee" if EXACT_FP32 else None)


@triton.jit
def grouped_gemm_kernel(
    a,  # GATE_UP: x [T, K]; else act [N, K]
    w,  # GATE_UP: w13 [E, 2 * N_OUT, K]; else w2 [E, N_OUT, K]
    c,  # [N, N_OUT] out, in a's dtype
    sorted_pairs,  # [max_rows] int32
    block_expert,  # [max_blocks] int32
    num_rows,  # [1] int32
    num_pairs,
    N_OUT,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_cm,
    TOP_K: tl.constexpr,  # rows of `a` are pair // TOP_K (GATE_UP) or the pair itself
    GATE_UP: tl.constexpr,
    EXACT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    pid_m, pid_n, expert = _grouped_block(num_rows, block_expert, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return  # a block past the rows in use (the grid is sized for the worst case)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs + rows)  # [BLOCK_M]
    row_ok = pair < num_pairs
    # 64-bit offsets: pairs times a row's width can pass 2^31 in a long prefill.
    pair = pair.to(tl.int64)
    a_row = tl.where(row_ok, pair // TOP_K, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)
    a_ptr = a + a_row[:, None] * stride_am + ks[None, :]  # [BLOCK_M, BLOCK_K]
    # The weight tile read transposed: [BLOCK_K, BLOCK_N] of w[expert, cols, ks].
    w_ptr = w + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a_tile = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = tl.load(w_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a_tile, w_tile, acc, EXACT_FP32)
        if GATE_UP:
            # The up rows sit N_OUT rows below the gate rows.
            u_tile = tl.load(
                w_ptr + N_OUT * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0
            )
            acc_up = _dot(a_tile, u_tile, acc_up, EXACT_FP32)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up  # SiLU(gate) * up
    c_ptr = c + pair[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptr, acc.to(c.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_gemm_tma_kernel(
    a,  # GATE_UP: x [T, K] (pointer loads: its rows are gathered); else its descriptor:
    # act [max_rows, K] in sorted-row order, [BLOCK_M, BLOCK_K] blocks
    w_desc,  # [E * W_ROWS, K], [BLOCK_N, BLOCK_K] blocks: w13 or w2 with its experts stacked
    c,  # GATE_UP: act [max_rows, N_OUT] in sorted-row order; else [N, N_OUT] in pair order
    sorted_pairs,  # [max_rows] int32
    block_expert,  # [max_blocks] int32
    num_rows,  # [1] int32
    num_pairs,
    N_OUT,
    K,
    stride_am,
    stride_cm,
    TOP_K: tl.constexpr,
    GATE_UP: tl.constexpr,
    EXACT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr,
):
    """`grouped_gemm_kernel` with the weight tiles (and the down GEMM's activation tiles)
    loaded by the tensor-memory accelerator. The gate-up GEMM writes its activation in the
    sorted rows' order, so that each block of the down GEMM reads one contiguous
    `[BLOCK_M, K]` slab of it; the down GEMM writes each row at its pair, as the other kernel
    does. Tiles past an expert's last column read the next expert's rows (the 2-D view
    stacks them): those columns are never stored. Past K the loads fill zeros."""
    pdl.start(PDL)
    pid_m, pid_n, expert = _grouped_block(num_rows, block_expert, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return  # a block past the rows in use (the grid is sized for the worst case)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs + rows)
    row_ok = pair < num_pairs
    pair = pair.to(tl.int64)
    w_rows = 2 * N_OUT if GATE_UP else N_OUT
    w_row = expert * w_rows + pid_n * BLOCK_N
    ks = tl.arange(0, BLOCK_K)
    if GATE_UP:
        a_row = tl.where(row_ok, pair // TOP_K, 0)
        a_ptr = a + a_row[:, None] * stride_am + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if GATE_UP:
            a_tile = tl.load(a_ptr, mask=row_ok[:, None] & (ks[None, :] < K - k0), other=0.0)
            a_ptr += BLOCK_K
        else:
            a_tile = a.load([pid_m * BLOCK_M, k0])
        w_tile = w_desc.load([w_row, k0])  # [BLOCK_N, BLOCK_K]
        acc = _dot(a_tile, tl.trans(w_tile), acc, EXACT_FP32)
        if GATE_UP:
            u_tile = w_desc.load([w_row + N_OUT, k0])
            acc_up = _dot(a_tile, tl.trans(u_tile), acc_up, EXACT_FP32)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up  # SiLU(gate) * up
        # Every row of the block, padding included (zeros: its x rows were masked), so that
        # the down GEMM's slab is defined throughout.
        c_ptr = c + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
        tl.store(c_ptr, acc.to(c.dtype.element_ty), mask=col_ok[None, :])
    else:
        c_ptr = c + pair[:, None] * stride_cm + cols[None, :]
        tl.store(c_ptr, acc.to(c.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def combine_kernel(
    y,  # [T * TOP_K, H]
    topk_weights,  # [T, TOP_K]
    topk_ids,  # [T, TOP_K]
    out,  # [T, H]
    H,
    num_experts,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(TOP_K):
        e = tl.load(topk_ids + t * TOP_K + j)
        if (e >= 0) & (e < num_experts):
            weight = tl.load(topk_weights + t * TOP_K + j).to(tl.float32)
            row = tl.load(y + (t * TOP_K + j).to(tl.int64) * H + cols, mask=ok, other=0.0)
            acc += weight * row.to(tl.float32)
    tl.store(out + t.to(tl.int64) * H + cols, acc.to(out.dtype.element_ty), mask=ok)


# Up to this many pairs one program aligns them all (one launch: a small decode batch);
# beyond, two or three kernels over chunks of pairs. On the H200 the one program took 7.5 µs
# for 8 pairs and 46 µs for 512 (Qwen3-30B-A3B at batch 64: 12% of the step), walking its
# chunks one after another.
SINGLE_PROGRAM_PAIRS = 128
PARALLEL_CHUNK = 128

# Up to this many pairs (one token of Qwen3-30B-A3B's top-8 or Moonlight's top-6) `fused_moe`
# takes the two-launch path of `fused_moe_small`, routing folded into its first kernel. Its
# launches are what it saves; what it loses grows with the pairs: each pair reads its
# expert's rows itself and its products run on the CUDA cores. Measured on the H200 at
# Qwen3-30B-A3B's shape (`bench.moe_kernel --path grouped|small|routed --tokens 1,2,4,8`, µs
# per layer, routing included: the grouped path's routing launch takes 4.0-4.6 µs):
# grouped 35.1 / 57.0 / 94.4 / 145.0, routed 32.6 / 63.1 / 106.8 / 145.8 at 1 / 2 / 4 / 8
# tokens: the small path pays at one token only. One token takes it whatever its pairs
# (DeepSeek-V3's top-8 plus a fused shared expert: 9).
SMALL_BATCH_PAIRS = 8


def takes_small_path(num_tokens: int, pairs_per_token: int) -> bool:
    """Whether `fused_moe` computes this many tokens on the two-launch path by default."""
    return num_tokens * pairs_per_token <= SMALL_BATCH_PAIRS or num_tokens == 1


def align_chunk(e_pow2: int, num_pairs: int | None = None) -> int:
    """Pairs per step of the one-program align: its one-hot tile is [chunk, E_POW2] (kept
    within the registers of 8 warps: bench/compile_kernels.py shows no spill), no wider than
    the pairs need (16 for a batch-1 step's top-k)."""
    widest = 64 if e_pow2 >= 256 else 128
    if num_pairs is None:
        return widest
    return max(16, min(widest, triton.next_power_of_2(max(1, num_pairs))))


# The most int32 elements in one tile of `align_offsets_kernel`'s prefix sums: its scan goes
# through shared memory, 128 KiB here (DeepSeek-V3's 256 experts at 128 chunks a tile needed
# 256 KiB, more than an H200's SM has, and the launch failed).
OFFSETS_TILE_ELEMENTS = 32768


def offsets_tile_elements(shared: int) -> int:
    """The most int32 counts in one tile of `align_offsets_kernel` on a device with `shared`
    bytes of shared memory a program: `OFFSETS_TILE_ELEMENTS`, or the largest power of two
    whose scan (4 bytes a count, compiled with the launch's aligned pointers) leaves 4 KB
    spare (16,384 on an L40S's or A10's 99 KB)."""
    fits = max(1, (shared - 4096) // 4)
    return min(OFFSETS_TILE_ELEMENTS, 1 << (fits.bit_length() - 1))


def offsets_chunk_block(e_pow2: int, num_chunks: int, shared: int = H200_SHARED_MEMORY) -> int:
    """Chunks per tile of `align_offsets_kernel`: all of them in a few tiles, since each
    tile's prefix sums wait on the last's (66 µs a layer at 16 chunks a tile for Moonlight's
    65k pairs of an 8,192-token prefill), within `offsets_tile_elements(shared)`."""
    widest = max(16, offsets_tile_elements(shared) // e_pow2)
    return max(16, min(128, widest, triton.next_power_of_2(num_chunks)))


# Up to this many chunks (16,384 pairs: 2,048 tokens at top-8) the offsets fold into the
# scatter (`align_scatter_folded_kernel`): two launches instead of three. Every program then
# reads all the chunks' counts, so the reads grow with the square of the chunks. On the H200
# (graph replay, µs per align, three kernels / folded), at 256 and 128 experts: 12.2 / 10.3
# and 10.4 / 9.2 at 16 chunks, 22.7 / 14.5 and 19.6 / 11.7 at 128, 40.7 / 31.1 and 34.6 /
# 25.7 at 256, 76.2 / 92.0 and 64.3 / 74.9 at 512: the fold loses from about 512 chunks on,
# and 128 keeps a margin (512 experts: 23.8 / 19.3 at 128 chunks).
FOLDED_OFFSETS_MAX_CHUNKS = 128
# Counts per tile of the folded kernel's sums, 64 KiB of int32: 128 chunks of Qwen3-30B-A3B's
# 128 experts (256 bins) in one tile, at 115 registers a thread of its 8 warps.
FOLDED_TILE_ELEMENTS = 16384


def folded_chunk_block(e_pow2: int, num_chunks: int) -> int:
    """Chunks per tile of `align_scatter_folded_kernel`'s sums: all of them where they fit
    `FOLDED_TILE_ELEMENTS`."""
    return min(triton.next_power_of_2(num_chunks), max(1, FOLDED_TILE_ELEMENTS // e_pow2))


def aligned_sizes(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(rows, blocks) of the align's output for `num_pairs` pairs: `N + min(N, E) *
    (block_m - 1)` rows, rounded up to whole blocks."""
    max_rows = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    max_blocks = triton.cdiv(max_rows, block_m)
    return max_blocks * block_m, max_blocks


def align_block_size(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    parallel: bool | None = None,
    fold_offsets: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted into expert-aligned blocks; see the module docstring. Sizes depend only on
    `topk_ids.numel()` (`aligned_sizes`). `parallel` picks the chunked kernels (default: above
    `SINGLE_PROGRAM_PAIRS` pairs), and among them `fold_offsets` the two-launch form (default:
    up to `FOLDED_OFFSETS_MAX_CHUNKS` chunks); every choice gives the same result."""
    num_pairs = topk_ids.numel()
    max_rows, max_blocks = aligned_sizes(num_pairs, num_experts, block_m)
    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    sorted_pairs = torch.empty(max_rows, dtype=torch.int32, device=device)
    e_pow2 = triton.next_power_of_2(num_experts + 1)  # bin num_experts holds the strays
    if parallel is None:
        parallel = num_pairs > SINGLE_PROGRAM_PAIRS
    if not parallel:
        block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
        num_rows = torch.empty(1, dtype=torch.int32, device=device)
        align_kernel[(1,)](
            ids,
            sorted_pairs,
            block_expert,
            num_rows,
            num_pairs,
            num_experts,
            max_rows,
            max_blocks,
            BLOCK_M=block_m,
            E_POW2=e_pow2,
            CHUNK=align_chunk(e_pow2, num_pairs),
            num_warps=8,
            **pdl.launch_args(ids),
        )
        return sorted_pairs, block_expert, num_rows
    chunk = PARALLEL_CHUNK
    num_chunks = triton.cdiv(num_pairs, chunk)
    chunk_counts = torch.empty(num_chunks, e_pow2, dtype=torch.int32, device=device)
    rank_in_chunk = torch.empty(num_pairs, dtype=torch.int32, device=device)
    align_count_kernel[(num_chunks,)](
        ids,
        chunk_counts,
        rank_in_chunk,
        sorted_pairs,
        num_pairs,
        num_experts,
        max_rows,
        FILL=triton.next_power_of_2(triton.cdiv(max_rows, num_chunks)),
        E_POW2=e_pow2,
        CHUNK=chunk,
        num_warps=8,
        **pdl.launch_args(ids),
    )
    counted = _Counted(chunk_counts, rank_in_chunk, sorted_pairs, chunk)
    return _scatter_counted(ids, counted, num_experts, block_m, fold_offsets)


@dataclass(frozen=True)
class _Counted:
    """What the chunked align's first stage leaves for its scatter: pairs per expert in each
    chunk of `chunk_pairs` consecutive pairs, each pair's rank among its expert's pairs in its
    chunk, and the output rows filled with padding."""

    chunk_counts: torch.Tensor  # [num_chunks, E_POW2] int32
    rank_in_chunk: torch.Tensor  # [N] int32
    sorted_pairs: torch.Tensor  # [max_rows] int32
    chunk_pairs: int


def _scatter_counted(
    ids: torch.Tensor,
    counted: _Counted,
    num_experts: int,
    block_m: int,
    fold_offsets: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked align's second stage: each expert's run from the counts, then every pair
    scattered to its row and every block given its expert (`align_block_size`'s result)."""
    num_pairs = ids.numel()
    device = ids.device
    sorted_pairs, chunk_counts = counted.sorted_pairs, counted.chunk_counts
    max_blocks = sorted_pairs.numel() // block_m
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_rows = torch.empty(1, dtype=torch.int32, device=device)
    num_chunks, e_pow2 = chunk_counts.shape
    lanes = triton.next_power_of_2(counted.chunk_pairs)
    blocks_per_chunk = triton.next_power_of_2(triton.cdiv(max_blocks, num_chunks))
    if fold_offsets is None:
        fold_offsets = num_chunks <= FOLDED_OFFSETS_MAX_CHUNKS
    if fold_offsets:
        align_scatter_folded_kernel[(num_chunks,)](
            ids,
            chunk_counts,
            counted.rank_in_chunk,
            sorted_pairs,
            block_expert,
            num_rows,
            num_pairs,
            num_experts,
            num_chunks,
            max_blocks,
            counted.chunk_pairs,
            BLOCK_M=block_m,
            E_POW2=e_pow2,
            CHUNK=lanes,
            BLOCKS_PER_CHUNK=blocks_per_chunk,
            CHUNK_BLOCK=folded_chunk_block(e_pow2, num_chunks),
            num_warps=8,
            **pdl.launch_args(ids),
        )
        return sorted_pairs, block_expert, num_rows
    expert_start = torch.empty(e_pow2, dtype=torch.int32, device=device)
    expert_end = torch.empty(e_pow2, dtype=torch.int32, device=device)
    align_offsets_kernel[(1,)](
        chunk_counts,
        expert_start,
        expert_end,
        num_rows,
        num_chunks,
        num_experts,
        BLOCK_M=block_m,
        E_POW2=e_pow2,
        CHUNK_BLOCK=offsets_chunk_block(e_pow2, num_chunks, shared_memory(device)),
        num_warps=8,
        **pdl.launch_args(chunk_counts),
    )
    align_scatter_kernel[(num_chunks,)](
        ids,
        chunk_counts,
        counted.rank_in_chunk,
        expert_start,
        expert_end,
        num_rows,
        sorted_pairs,
        block_expert,
        num_pairs,
        num_experts,
        max_blocks,
        counted.chunk_pairs,
        BLOCK_M=block_m,
        E_POW2=e_pow2,
        CHUNK=lanes,
        BLOCKS_PER_CHUNK=blocks_per_chunk,
        num_warps=4,
        **pdl.launch_args(ids),
    )
    return sorted_pairs, block_expert, num_rows


# Pair slots a routing-and-count program holds (`route_count_kernel`: BLOCK_T tokens of
# K_POW2 slots), as the count kernel's chunk of pairs.
ROUTE_COUNT_LANES = PARALLEL_CHUNK


def route_and_count(
    routing: Routing, width: int, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, _Counted]:
    """`routing`'s choices for its logits' T tokens (weights `[T, width]`, ids `[T, width]`
    int64: `softmax_topk`'s or `grouped_topk`'s, shared experts appended) and the chunked
    align's first stage over their pairs, in one launch (`route_count_kernel`); the chunks
    are whole tokens, `ROUTE_COUNT_LANES // K_POW2` of them."""
    logits = routing.logits
    num_tokens, num_routed = logits.shape
    device = logits.device
    grouped = routing.kind == ROUTE_GROUPED
    weights = torch.empty(
        num_tokens, width, dtype=torch.float32 if grouped else logits.dtype, device=device
    )
    ids = torch.empty(num_tokens, width, dtype=torch.int64, device=device)
    k_pow2 = triton.next_power_of_2(width)
    block_t = max(1, ROUTE_COUNT_LANES // k_pow2)
    num_chunks = triton.cdiv(num_tokens, block_t)
    num_pairs = num_tokens * width
    max_rows, _ = aligned_sizes(num_pairs, num_experts, block_m)
    e_pow2 = triton.next_power_of_2(num_experts + 1)
    chunk_counts = torch.empty(num_chunks, e_pow2, dtype=torch.int32, device=device)
    rank_in_chunk = torch.empty(num_pairs, dtype=torch.int32, device=device)
    sorted_pairs = torch.empty(max_rows, dtype=torch.int32, device=device)
    num_groups = routing.num_groups if grouped else 1
    per_group = num_routed // num_groups
    bias = routing.correction_bias if routing.correction_bias is not None else logits
    route_count_kernel[(num_chunks,)](
        logits,
        bias,
        weights,
        ids,
        chunk_counts,
        rank_in_chunk,
        sorted_pairs,
        num_tokens,
        num_routed,
        num_experts,
        logits.stride(0),
        float(routing.scaling),
        max_rows,
        WIDTH=width,
        K_POW2=k_pow2,
        L_POW2=triton.next_power_of_2(num_routed),
        E_POW2=e_pow2,
        BLOCK_T=block_t,
        FILL=triton.next_power_of_2(triton.cdiv(max_rows, num_chunks)),
        ROUTE=routing.kind,
        RENORMALIZE=routing.renormalize,
        NUM_GROUPS=num_groups,
        PER_GROUP=per_group if grouped else 1,
        TOPK_GROUPS=routing.topk_groups if grouped else 1,
        NUM_SHARED=routing.num_shared,
        G_POW2=triton.next_power_of_2(num_groups),
        P_POW2=triton.next_power_of_2(per_group) if grouped else 1,
        num_warps=8,
        **pdl.launch_args(logits),
    )
    return weights, ids, _Counted(chunk_counts, rank_in_chunk, sorted_pairs, block_t * width)


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_k: int,
    gate_up: bool,
    cfg: MoEKernelConfig,
    num_pairs: int,
) -> None:
    sorted_pairs, block_expert, num_rows = aligned
    if not gate_up:
        cfg = cfg.down_config
    n_out = out.shape[1]
    grid = (block_expert.numel() * triton.cdiv(n_out, cfg.block_n),)
    # The launch's compile-time arguments, the same for both kernels.
    meta = {
        "TOP_K": top_k if gate_up else 1,
        "GATE_UP": gate_up,
        "EXACT_FP32": a.dtype == torch.float32,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        **pdl.launch_args(a),
    }
    rows = (sorted_pairs, block_expert, num_rows, num_pairs, n_out, a.shape[1], a.stride(0))
    if cfg.tma:
        w2d = w.reshape(-1, w.shape[2])  # the experts stacked: [E * rows, K]
        w_desc = tma.descriptor(w2d, [cfg.block_n, cfg.block_k])
        a_arg = a if gate_up else tma.descriptor(a, [cfg.block_m, cfg.block_k])
        grouped_gemm_tma_kernel[grid](a_arg, w_desc, out, *rows, out.stride(0), **meta)
    else:
        grouped_gemm_kernel[grid](a, w, out, *rows, w.stride(0), w.stride(1), out.stride(0), **meta)


@overload
def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoEKernelConfig | None = None,
    small_batch: bool | None = None,
    defer: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoEKernelConfig | None = None,
    small_batch: bool | None = None,
    *,
    defer: bool,
) -> torch.Tensor | PendingSum: ...


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoEKernelConfig | None = None,
    small_batch: bool | None = None,
    defer: bool = False,
) -> torch.Tensor | PendingSum:
    """The weighted sum of each token's top-k experts: x `[T, H]`, w13 `[E, 2I, H]`, w2 `[E, H,
    I]`, topk_weights `[T, k]` (any float dtype), topk_ids `[T, k]`; returns `[T, H]` in x's
    dtype. Ids outside `[0, E)` contribute nothing. No host sync; T may be 0.

    `small_batch` picks the two-launch path (True) or the grouped GEMMs (False, which `config`
    tiles); by default the former up to `SMALL_BATCH_PAIRS` pairs. `defer`: on the grouped
    path, return the combine's inputs as a `PendingSum` (`[T, k, H]` pieces, the top-k
    weights and ids) for the next RMSNorm to sum, without the combine launch."""
    num_tokens = x.shape[0]
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    _check_weights(x, w13, w2)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
    if small_batch is None:
        small_batch = takes_small_path(num_tokens, top_k)
    if small_batch:
        return small_batch_moe(x, w13, w2, topk_weights, topk_ids)
    cfg = config or tiles_for(num_tokens, x, w13, top_k)
    aligned = align_block_size(topk_ids, num_experts, cfg.block_m)
    return _grouped_moe(x, w13, w2, topk_weights, topk_ids, aligned, cfg, defer)


def _grouped_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: MoEKernelConfig,
    defer: bool,
) -> torch.Tensor | PendingSum:
    """`fused_moe`'s grouped path after the align: the two grouped GEMMs and the combine (or,
    with `defer`, its inputs as a `PendingSum`). Contiguous inputs of at least one token."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    out = torch.empty_like(x)
    # [N, I] in pair order; with `tma`, [max_rows, I] in the sorted rows' order.
    act_rows = aligned[0].numel() if cfg.tma else num_pairs
    act = torch.empty(act_rows, inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, act, aligned, top_k, True, cfg, num_pairs)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [N, H]
    _grouped_gemm(act, w2, y, aligned, top_k, False, cfg, num_pairs)
    if defer:
        return PendingSum(
            y.view(num_tokens, top_k, hidden), x.dtype, topk_weights, topk_ids, num_experts
        )
    block_h = min(1024, triton.next_power_of_2(hidden))
    combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_weights, topk_ids, out, hidden, num_experts, TOP_K=top_k, BLOCK_H=block_h,
        **pdl.launch_args(y),
    )  # fmt: skip
    return out


@overload
def fused_moe_routed(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    small_batch: bool | None = None,
    defer: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def fused_moe_routed(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    small_batch: bool | None = None,
    *,
    defer: bool,
) -> torch.Tensor | PendingSum: ...


def fused_moe_routed(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    small_batch: bool | None = None,
    defer: bool = False,
) -> torch.Tensor | PendingSum:
    """`fused_moe` on softmax top-k routing of `router_logits` `[T, E]`: the experts that
    `softmax_topk` chooses, with its weights. On the small-batch path (`small_batch` as in
    `fused_moe`) its gate-up kernel routes, one launch fewer; on the grouped path past
    `SINGLE_PROGRAM_PAIRS` pairs the align's count does (`route_and_count`), one launch fewer;
    otherwise `softmax_topk`, then `fused_moe`."""
    num_tokens = x.shape[0]
    if router_logits.shape != (num_tokens, w13.shape[0]):
        raise ValueError(
            f"router logits {tuple(router_logits.shape)} do not fit x {tuple(x.shape)} and "
            f"{w13.shape[0]} experts"
        )
    if small_batch is None:
        small_batch = takes_small_path(num_tokens, top_k)
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    if not small_batch:
        if num_tokens * top_k > SINGLE_PROGRAM_PAIRS:
            routing = Routing(ROUTE_SOFTMAX, logits, renormalize)
            return _routed_grouped_moe(x, w13, w2, routing, top_k, defer)
        weights, ids = softmax_topk(router_logits, top_k, renormalize)
        return fused_moe(x, w13, w2, weights, ids, small_batch=False, defer=defer)
    _check_weights(x, w13, w2)
    out, _, _ = small_batch_moe_routed(
        x.contiguous(), w13.contiguous(), w2.contiguous(), logits, top_k, renormalize
    )
    return out


@overload
def fused_moe_grouped_routed(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling_factor: float = 1.0,
    num_shared: int = 0,
    small_batch: bool | None = None,
    defer: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def fused_moe_grouped_routed(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling_factor: float = 1.0,
    num_shared: int = 0,
    small_batch: bool | None = None,
    *,
    defer: bool,
) -> torch.Tensor | PendingSum: ...


def fused_moe_grouped_routed(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling_factor: float = 1.0,
    num_shared: int = 0,
    small_batch: bool | None = None,
    defer: bool = False,
) -> torch.Tensor | PendingSum:
    """`fused_moe` on DeepSeek-V3's grouped routing of `router_logits` `[T, E]` (the choices
    and weights of `grouped_topk`), plus `num_shared` shared experts stacked after the E routed
    ones (w13 `[E + num_shared, 2I, H]`), which every token takes with weight 1.0. On the
    small-batch path (`small_batch` as in `fused_moe`) its gate-up kernel routes: two launches
    in all; past `SINGLE_PROGRAM_PAIRS` pairs the align's count does, as in
    `fused_moe_routed`; otherwise `grouped_topk`, then `fused_moe`."""
    num_tokens, num_routed = router_logits.shape
    if num_tokens != x.shape[0] or num_routed + num_shared != w13.shape[0]:
        raise ValueError(
            f"router logits {tuple(router_logits.shape)} and {num_shared} shared experts do "
            f"not fit x {tuple(x.shape)} and {w13.shape[0]} experts"
        )
    args = (top_k, num_groups, topk_groups, renormalize, scaling_factor, num_shared)
    width = top_k + num_shared
    if small_batch is None:
        small_batch = takes_small_path(num_tokens, width)
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    if (not small_batch or num_tokens == 0) and num_tokens * width > SINGLE_PROGRAM_PAIRS:
        routing = Routing(
            ROUTE_GROUPED,
            logits,
            renormalize,
            correction_bias.contiguous(),
            scaling_factor,
            num_groups,
            topk_groups,
            num_shared,
        )
        return _routed_grouped_moe(x, w13, w2, routing, width, defer)
    if not small_batch or num_tokens == 0:
        weights, ids = grouped_topk(router_logits, correction_bias, *args)
        return fused_moe(x, w13, w2, weights, ids, small_batch=small_batch, defer=defer)
    _check_weights(x, w13, w2)
    out, _, _ = small_batch_moe_grouped_routed(
        x.contiguous(), w13.contiguous(), w2.contiguous(), logits, correction_bias, *args
    )
    return out


def tiles_for(num_tokens: int, x: torch.Tensor, w13: torch.Tensor, top_k: int) -> MoEKernelConfig:
    """The grouped GEMMs' tiles (`kernel_config`) for `num_tokens` tokens of `top_k` pairs
    each over the experts `w13` `[E, 2I, H]`, in x's dtype on x's device."""
    num_experts, two_inter, hidden = w13.shape
    shared = shared_memory(x.device)
    return kernel_config(num_tokens, num_experts, hidden, two_inter // 2, top_k, x.dtype, shared)


def pairs_config(pairs: int, x: torch.Tensor, w13: torch.Tensor, top_k: int) -> MoEKernelConfig:
    """The grouped GEMMs' tiles for rows `x` of `top_k` ids each of which only `pairs` are in
    range (an expert-parallel rank's received rows, -1 where a choice lives on another rank):
    those of a step with as many rows an expert as it really has. By the rows' full width the
    rule would see several times as many (about 5x at EP 8 with top-8) and pick a prefill's
    128-row blocks for a decode step's handful."""
    tokens = max(1, -(-pairs // max(top_k, 1)))  # ceil: the same rows an expert as `pairs`
    return tiles_for(tokens, x, w13, top_k)


def _routed_grouped_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: Routing,
    width: int,
    defer: bool,
) -> torch.Tensor | PendingSum:
    """The grouped path for more pairs than one align program takes: routing and the align's
    count in one launch (`route_and_count`), then the align's scatter, the GEMMs and the
    combine. One launch fewer than `softmax_topk`/`grouped_topk`, then `fused_moe`; the same
    choices and rows."""
    _check_weights(x, w13, w2)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    num_experts = w13.shape[0]
    cfg = tiles_for(x.shape[0], x, w13, width)
    weights, ids, counted = route_and_count(routing, width, num_experts, cfg.block_m)
    aligned = _scatter_counted(ids.view(-1), counted, num_experts, cfg.block_m)
    return _grouped_moe(x, w13, w2, weights, ids, aligned, cfg, defer)


def _check_weights(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    hidden = x.shape[1]
    num_experts, two_inter, _ = w13.shape
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"expert weights w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} do not fit x "
            f"{tuple(x.shape)}: expected [E, 2I, {hidden}] and [E, {hidden}, I]"
        )
