"""The fused MoE for a few tokens: no align sort, one launch (a decode step at small batch).

At batch 1 each kernel of `engine.kernels.fused_moe`'s path costs a few microseconds of launch
and ramp for well under that of work, and the 16-row blocks of the grouped GEMMs hold one real
row each. Here, over the same `N = T * top_k` pairs (pair `i` is token `i // top_k`'s
`i % top_k`-th choice) and the same weights (w13 `[E, 2I, H]`, w2 `[E, H, I]`), two kinds of
work:

1. gate-up blocks (`small_gate_up_kernel`'s programs), one per (pair, block of I's columns):
   the pair's token row against the gate and up rows of its expert, products on the CUDA cores
   (one row: no use for tensor cores), stored as `silu(gate) * up` `[N, I]` in x's dtype.
   With `ROUTE` (`small_batch_moe_routed`, `small_batch_moe_grouped_routed`) each first
   chooses its token's experts from the router logits by `softmax_topk`'s or
   `grouped_topk`'s code (so exactly their choices, ties to the lower id; grouped routing
   appends any fused shared experts), and the pair's first block stores the choice and its
   weight: routing costs no launch.
2. down blocks (`small_down_combine_kernel`'s programs), one per (token, block of H's
   columns): the down projections of all the token's pairs (one tile of the w2 rows of every
   pair's expert per step), each rounded to x's dtype, then weighted and summed in float32
   pair by pair, in order; stored once.

`small_moe_kernel` runs both in one launch (`SmallBatchTiles.programs_per_sm`):
its programs take items from a counter, the gate-up blocks first, then the down blocks, which
route their token again, put each tile of their weights in flight and then wait for the
gate-up blocks of that tile of I (a count per tile, released after their stores). So the
down weights stream while the last gate-up blocks run, with no second launch, ramp or tail;
an item waits only on lower-numbered items, which running programs hold, so it cannot
deadlock whatever the programs resident. With `programs_per_sm` 0 the two kinds run as two
launches.

The roundings are those of the grouped path (activation and per-pair output in x's dtype, the
weighted sum in float32, one cast at the end), so the two agree up to float32 summation order
within each dot product; the one launch gives the two launches' result bit for bit (the same
code in each item). Deterministic: the counters order work, never sums. Ids outside `[0, E)`
add nothing. Buffer sizes depend only on T, and nothing waits on the host (CUDA-graph
capturable).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.moe_routing import ROUTE_GROUPED, ROUTE_NONE, ROUTE_SOFTMAX, route_rows


@triton.jit
def _route_token(
    router_logits,
    token,
    stride_lt,
    correction_bias,
    num_routed,
    scaling,
    ROUTE: tl.constexpr,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
):
    """`route_rows` for one token: its `[1, K_POW2]` weights and ids."""
    return route_rows(
        router_logits,
        token + tl.zeros([1], dtype=tl.int64),
        stride_lt,
        correction_bias,
        num_routed,
        scaling,
        ROUTE,
        TOP_K,
        K_POW2,
        E_POW2,
        RENORMALIZE,
        NUM_GROUPS,
        PER_GROUP,
        TOPK_GROUPS,
        NUM_SHARED,
        G_POW2,
        P_POW2,
    )


@triton.jit
def _gate_up_block(
    x,
    w13,
    act,
    pair,
    expert,
    col_block,
    hidden,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`silu(gate) * up` of one pair's token row for one block of I's columns, into act."""
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptr = x + (pair // TOP_K) * stride_xt + ks
    # [BLOCK_N, BLOCK_K] of the gate rows, contiguous along K; the up rows sit `inter` below.
    w_ptr = w13 + expert * stride_we + cols[:, None] * stride_wn + ks[None, :]
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        row = tl.load(x_ptr, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w_ok = col_ok[:, None] & k_ok[None, :]
        gate = tl.load(w_ptr, mask=w_ok, other=0.0).to(tl.float32)
        up = tl.load(w_ptr + inter * stride_wn, mask=w_ok, other=0.0).to(tl.float32)
        acc_gate += gate * row
        acc_up += up * row
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K
    gate_out = tl.sum(acc_gate, axis=1)
    up_out = tl.sum(acc_up, axis=1)
    out = gate_out * tl.sigmoid(gate_out) * up_out  # SiLU(gate) * up, as grouped_gemm_kernel
    tl.store(act + pair * inter + cols, out.to(act.dtype.element_ty), mask=col_ok)


@triton.jit
def _wait_for(counter, need):
    """Spin until the int32 at `counter` reaches `need` (acquire: the writes released before
    each increment are visible after)."""
    seen = tl.atomic_add(counter, 0, sem="acquire")
    while seen < need:
        seen = tl.atomic_add(counter, 0, sem="acquire")


@triton.jit
def _down_block(
    act,
    w2,
    out,
    token,
    col_block,
    expert,  # [K_POW2] the token's experts (any value where not valid)
    valid,  # [K_POW2] the slots that count
    weight,  # [K_POW2] float32, the top-k weights (0 where not valid)
    hidden,
    inter,
    stride_we,
    stride_wn,
    tiles_ready,  # WAIT: int32 per BLOCK_K tile of I, the gate-up blocks finished in it
    num_pairs,  # WAIT: pairs in the launch
    GATE_UP_N: tl.constexpr,  # WAIT: the gate-up blocks' width
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WAIT: tl.constexpr,  # act is written by the same launch: wait for each tile of it
):
    """The down projections of a token's pairs for one block of H's columns, each rounded to
    out's dtype, weighted and summed in float32 pair by pair, in order, stored once."""
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, K_POW2)
    pair = token * TOP_K + slots  # [K_POW2]
    expert = tl.where(valid, expert, 0)
    # All the token's pairs at once, [K_POW2, BLOCK_N, BLOCK_K] of w2 per step, so that a
    # program keeps as many bytes in flight as a gate-up program does.
    a_ptr = act + pair[:, None] * inter + ks[None, :]
    w_ptr = (
        w2 + expert[:, None, None] * stride_we + cols[None, :, None] * stride_wn + ks[None, None, :]
    )
    acc = tl.zeros([K_POW2, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = ks < inter - k0
        a_ok = valid[:, None] & k_ok[None, :]
        w_ok = a_ok[:, None, :] & col_ok[None, :, None]
        # The weights first: they stream while this program waits for the tile of act.
        w = tl.load(w_ptr, mask=w_ok, other=0.0)
        if WAIT:
            width = tl.minimum(inter - k0, BLOCK_K)
            ready = tiles_ready + k0 // BLOCK_K
            _wait_for(ready, num_pairs * tl.cdiv(width, GATE_UP_N))
            # Past L1 (it may hold an older launch's rows at these addresses).
            a = tl.load(a_ptr, mask=a_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        else:
            a = tl.load(a_ptr, mask=a_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * a[:, None, :]
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    # The grouped path stores each pair's output in x's dtype; the combine sums those.
    y = tl.sum(acc, axis=2).to(out.dtype.element_ty).to(tl.float32)  # [K_POW2, BLOCK_N]
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Summed pair by pair in order, as combine_kernel does (picking a row out of y by a masked
    # sum is exact: the other terms are zeros).
    for j in tl.static_range(TOP_K):
        y_j = tl.sum(tl.where(slots[:, None] == j, y, 0.0), axis=0)
        weight_j = tl.sum(tl.where(slots == j, weight, 0.0), axis=0)
        total += weight_j * y_j
    tl.store(out + token * hidden + cols, total.to(out.dtype.element_ty), mask=col_ok)


@triton.jit
def small_gate_up_kernel(
    x,  # [T, H]
    w13,  # [E, 2 * INTER, H]
    topk_ids,  # [N] int, the flattened [T, TOP_K] choices (int64, written, with ROUTE)
    act,  # [N, INTER] out, x's dtype
    router_logits,  # [T, E_ROUTED] with ROUTE, else unused
    topk_weights,  # [N] out with ROUTE (the logits' dtype; float32 grouped), else unused
    correction_bias,  # [E_ROUTED] with ROUTE_GROUPED, else unused
    num_experts,  # E: w13's experts, the routed ones then any shared ones
    num_routed,  # E_ROUTED: the experts the router chooses from
    hidden,
    inter,
    stride_xt,
    stride_lt,
    stride_we,
    stride_wn,
    scaling,  # ROUTE_GROUPED: the routed weights' scaling factor
    TOP_K: tl.constexpr,  # pairs per token: the routed choices, then the shared experts
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    ROUTE: tl.constexpr,  # ROUTE_NONE, or choose the experts here as the routing kernels do
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,  # ROUTE_GROUPED: grouped_topk_rows' settings
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    # Pairs vary fastest: the programs resident together read one column block of their
    # experts, so two tokens' pairs on the same expert read its rows once from memory.
    pair = tl.program_id(0).to(tl.int64)
    if ROUTE != 0:
        # Every program routes its token again (a few hundred logits: less than a launch);
        # the pair's first program writes its choice for the down kernel.
        chosen_w, chosen_id = _route_token(
            router_logits,
            pair // TOP_K,
            stride_lt,
            correction_bias,
            num_routed,
            scaling,
            ROUTE,
            TOP_K,
            K_POW2,
            E_POW2,
            RENORMALIZE,
            NUM_GROUPS,
            PER_GROUP,
            TOPK_GROUPS,
            NUM_SHARED,
            G_POW2,
            P_POW2,
        )
        mine = tl.arange(0, K_POW2)[None, :] == pair % TOP_K
        expert = tl.sum(tl.sum(tl.where(mine, chosen_id, 0), axis=1), axis=0)
        if tl.program_id(1) == 0:
            # Exact: the other slots are 0.
            weight = tl.sum(tl.sum(tl.where(mine, chosen_w, 0.0), axis=1), axis=0)
            tl.store(topk_weights + pair, weight.to(topk_weights.dtype.element_ty))
            tl.store(topk_ids + pair, expert)
    else:
        expert = tl.load(topk_ids + pair).to(tl.int64)
        if (expert < 0) | (expert >= num_experts):
            return  # another rank's pair: the down kernel skips it too
    _gate_up_block(
        x,
        w13,
        act,
        pair,
        expert,
        tl.program_id(1),
        hidden,
        inter,
        stride_xt,
        stride_we,
        stride_wn,
        TOP_K,
        BLOCK_N,
        BLOCK_K,
    )


@triton.jit
def small_down_combine_kernel(
    act,  # [N, INTER]
    w2,  # [E, H, INTER]
    topk_weights,  # [T, TOP_K]
    topk_ids,  # [T, TOP_K]
    out,  # [T, H] out
    num_experts,
    hidden,
    inter,
    stride_we,
    stride_wn,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    token = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, K_POW2)
    pair = token * TOP_K + slots
    expert = tl.load(topk_ids + pair, mask=slots < TOP_K, other=-1).to(tl.int64)
    # Another rank's pair adds nothing (and its act row was never written).
    valid = (expert >= 0) & (expert < num_experts)
    weight = tl.load(topk_weights + pair, mask=valid, other=0.0).to(tl.float32)
    _down_block(
        act,
        w2,
        out,
        token,
        tl.program_id(1),
        expert,
        valid,
        weight,
        hidden,
        inter,
        stride_we,
        stride_wn,
        act,  # unused without WAIT
        0,
        1,
        TOP_K,
        K_POW2,
        BLOCK_N,
        BLOCK_K,
        False,
    )


# `small_moe_kernel`'s int32 scratch: the next work item, the programs finished, then one
# count a tile of I (`down_block_k` wide) of the gate-up blocks finished in it.
SCRATCH_TICKET = tl.constexpr(0)
SCRATCH_FINISHED = tl.constexpr(1)
SCRATCH_TILES = tl.constexpr(2)
SCRATCH_SLOTS = tl.constexpr(64)


@triton.jit
def _gate_up_item(
    x,
    w13,
    topk_ids,
    topk_weights,
    act,
    router_logits,
    correction_bias,
    scratch,
    item,
    num_experts,
    num_routed,
    num_pairs,
    hidden,
    inter,
    stride_xt,
    stride_lt,
    stride_w13e,
    stride_w13n,
    scaling,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    ROUTE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
    GATE_UP_N: tl.constexpr,
    GATE_UP_K: tl.constexpr,
    DOWN_K: tl.constexpr,
):
    """`small_moe_kernel`'s gate-up item: as a `small_gate_up_kernel` program (pairs fastest),
    then the count of its tile of I, released after every thread's stores."""
    pair = (item % num_pairs).to(tl.int64)
    col_block = item // num_pairs
    if ROUTE != 0:
        chosen_w, chosen_id = _route_token(
            router_logits,
            pair // TOP_K,
            stride_lt,
            correction_bias,
            num_routed,
            scaling,
            ROUTE,
            TOP_K,
            K_POW2,
            E_POW2,
            RENORMALIZE,
            NUM_GROUPS,
            PER_GROUP,
            TOPK_GROUPS,
            NUM_SHARED,
            G_POW2,
            P_POW2,
        )
        mine = tl.arange(0, K_POW2)[None, :] == pair % TOP_K
        expert = tl.sum(tl.sum(tl.where(mine, chosen_id, 0), axis=1), axis=0)
        if col_block == 0:
            weight = tl.sum(tl.sum(tl.where(mine, chosen_w, 0.0), axis=1), axis=0)
            tl.store(topk_weights + pair, weight.to(topk_weights.dtype.element_ty))
            tl.store(topk_ids + pair, expert)
    else:
        expert = tl.load(topk_ids + pair).to(tl.int64)
    if (expert >= 0) & (expert < num_experts):  # else another rank's pair
        _gate_up_block(
            x,
            w13,
            act,
            pair,
            expert,
            col_block,
            hidden,
            inter,
            stride_xt,
            stride_w13e,
            stride_w13n,
            TOP_K,
            GATE_UP_N,
            GATE_UP_K,
        )
    tl.debug_barrier()
    tile = col_block * GATE_UP_N // DOWN_K
    tl.atomic_add(scratch + SCRATCH_TILES + tile, 1, sem="release")


@triton.jit
def _down_item(
    w2,
    topk_ids,
    topk_weights,
    act,
    out,
    router_logits,
    correction_bias,
    scratch,
    down_item,
    down_blocks,
    num_experts,
    num_routed,
    num_pairs,
    hidden,
    inter,
    stride_lt,
    stride_w2e,
    stride_w2n,
    scaling,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    ROUTE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
    GATE_UP_N: tl.constexpr,
    DOWN_N: tl.constexpr,
    DOWN_K: tl.constexpr,
):
    """`small_moe_kernel`'s down item: as a `small_down_combine_kernel` program, its token's
    choices routed again (not read from the gate-up items' stores, which may not have run)."""
    token = (down_item // down_blocks).to(tl.int64)
    slots = tl.arange(0, K_POW2)
    if ROUTE != 0:
        chosen_w, chosen_id = _route_token(
            router_logits,
            token,
            stride_lt,
            correction_bias,
            num_routed,
            scaling,
            ROUTE,
            TOP_K,
            K_POW2,
            E_POW2,
            RENORMALIZE,
            NUM_GROUPS,
            PER_GROUP,
            TOPK_GROUPS,
            NUM_SHARED,
            G_POW2,
            P_POW2,
        )
        expert = tl.sum(chosen_id, axis=0).to(tl.int64)  # one row: exact
        valid = slots < TOP_K
        # The weight as the gate-up items store it, in topk_weights' dtype.
        weight = tl.sum(chosen_w, axis=0).to(topk_weights.dtype.element_ty)
        weight = tl.where(valid, weight.to(tl.float32), 0.0)
    else:
        pair = token * TOP_K + slots
        expert = tl.load(topk_ids + pair, mask=slots < TOP_K, other=-1).to(tl.int64)
        valid = (expert >= 0) & (expert < num_experts)
        weight = tl.load(topk_weights + pair, mask=valid, other=0.0).to(tl.float32)
    _down_block(
        act,
        w2,
        out,
        token,
        down_item % down_blocks,
        expert,
        valid,
        weight,
        hidden,
        inter,
        stride_w2e,
        stride_w2n,
        scratch + SCRATCH_TILES,
        num_pairs,
        GATE_UP_N,
        TOP_K,
        K_POW2,
        DOWN_N,
        DOWN_K,
        True,
    )


@triton.jit
def small_moe_kernel(
    x,  # [T, H]
    w13,  # [E, 2 * INTER, H]
    w2,  # [E, H, INTER]
    topk_ids,  # [N] as small_gate_up_kernel's
    topk_weights,  # [N] as small_gate_up_kernel's
    act,  # [N, INTER] scratch, x's dtype
    out,  # [T, H] out
    router_logits,  # [T, E_ROUTED] with ROUTE, else unused
    correction_bias,  # [E_ROUTED] with ROUTE_GROUPED, else unused
    scratch,  # [SCRATCH_SLOTS] int32, zero before the launch and after it
    num_experts,
    num_routed,
    num_pairs,
    hidden,
    inter,
    stride_xt,
    stride_lt,
    stride_w13e,
    stride_w13n,
    stride_w2e,
    stride_w2n,
    scaling,
    gate_up_items,  # num_pairs * the gate-up blocks a pair
    down_blocks,  # the down blocks a token
    num_items,  # gate_up_items + T * down_blocks
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    ROUTE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
    GATE_UP_N: tl.constexpr,
    GATE_UP_K: tl.constexpr,
    DOWN_N: tl.constexpr,
    DOWN_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """Both kernels' work in one launch: a program takes work items from a counter, the
    gate-up blocks first (tile of I by tile, pairs fastest), then the down blocks, which wait
    for each tile of act as they reach it, their weights already in flight. An item only
    waits for items with lower numbers, which programs already running hold, so it needs no
    more programs resident than there are. The last program to finish zeroes the scratch."""
    pdl.start(PDL)
    item = tl.atomic_add(scratch + SCRATCH_TICKET, 1)
    while item < num_items:
        following = tl.atomic_add(scratch + SCRATCH_TICKET, 1)  # in flight while this runs
        if item < gate_up_items:
            _gate_up_item(
                x,
                w13,
                topk_ids,
                topk_weights,
                act,
                router_logits,
                correction_bias,
                scratch,
                item,
                num_experts,
                num_routed,
                num_pairs,
                hidden,
                inter,
                stride_xt,
                stride_lt,
                stride_w13e,
                stride_w13n,
                scaling,
                TOP_K,
                K_POW2,
                E_POW2,
                ROUTE,
                RENORMALIZE,
                NUM_GROUPS,
                PER_GROUP,
                TOPK_GROUPS,
                NUM_SHARED,
                G_POW2,
                P_POW2,
                GATE_UP_N,
                GATE_UP_K,
                DOWN_K,
            )
        else:
            _down_item(
                w2,
                topk_ids,
                topk_weights,
                act,
                out,
                router_logits,
                correction_bias,
                scratch,
                item - gate_up_items,
                down_blocks,
                num_experts,
                num_routed,
                num_pairs,
                hidden,
                inter,
                stride_lt,
                stride_w2e,
                stride_w2n,
                scaling,
                TOP_K,
                K_POW2,
                E_POW2,
                ROUTE,
                RENORMALIZE,
                NUM_GROUPS,
                PER_GROUP,
                TOPK_GROUPS,
                NUM_SHARED,
                G_POW2,
                P_POW2,
                GATE_UP_N,
                DOWN_N,
                DOWN_K,
            )
        item = following
    finished = tl.atomic_add(scratch + SCRATCH_FINISHED, 1, sem="acq_rel")
    if finished == tl.num_programs(0) - 1:
        # Every item is done and every program has taken its last number: ready for the next.
        slots = tl.arange(0, SCRATCH_SLOTS)
        tl.store(scratch + slots, tl.zeros([SCRATCH_SLOTS], dtype=tl.int32))


@dataclass(frozen=True)
class SmallBatchTiles:
    """Column and reduction tile of each kernel. A decode step's weights stream from memory, so
    each SM needs tens of KB of loads in flight: narrow column blocks make enough programs for
    every SM (Qwen3-30B-A3B at batch 1: 8 pairs x 48 gate-up blocks, 256 down blocks), each
    loading 16-32 KB per step in bfloat16 (gate-up: 2 x [16, 256]; down: [8 pairs, 8, 256])
    and holding as many float32 partial products.

    Swept on the H200 at one token (`bench.moe_kernel --path small --small-tiles`, µs of both
    kernels, Qwen3-30B-A3B / Moonlight): down_n 4 took 30.0 / 39.7, 8 took 26.8 / 33.1 (1.50x /
    1.35x their bytes; 512 down programs of 4 columns were 1.3 waves of the 132 SMs), 16 with a
    K step of 128 28.9 / 37.1, 8 warps 29.2 / 44.5."""

    gate_up_n: int = 16
    gate_up_k: int = 256
    down_n: int = 8
    down_k: int = 256
    num_warps: int = 4
    # One launch (`small_moe_kernel`) of this many programs an SM instead of two launches; 0:
    # two launches (the default until the one launch is timed on the GPU: `session.sh U`).
    programs_per_sm: int = 0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name == "programs_per_sm":
                if value < 0:
                    raise ValueError(f"programs_per_sm must be >= 0, got {value}")
                continue
            if value < 1 or value & (value - 1):  # tl.arange and the warps need powers of two
                raise ValueError(f"{name} must be a power of two, got {value}")


DEFAULT_TILES = SmallBatchTiles()


def down_block_k(tiles: SmallBatchTiles, k_pow2: int, element_size: int = 2) -> int:
    """The down kernel's K step for `k_pow2` pair slots a token: it holds a [k_pow2, down_n,
    K step] tile, so past 8 slots (DeepSeek-V3's top-8 and a fused shared expert: 16) a shorter
    step keeps the same registers, and so do float32 weights (`element_size` 4: half the step,
    the same bytes a load; 16-bit weights' step spilled 2 KB there)."""
    return max(16, tiles.down_k * 8 // max(8, k_pow2) * 2 // max(2, element_size))


def small_batch_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tiles: SmallBatchTiles = DEFAULT_TILES,
) -> torch.Tensor:
    """`fused_moe`'s result `[T, H]` in one launch or two (`tiles`). Expects what `fused_moe`
    checks: contiguous tensors of matching shapes."""
    return _launch(x, w13, w2, topk_weights, topk_ids, None, tiles)


@dataclass(frozen=True)
class Routing:
    """What a kernel that routes routes by (the small path's gate-up, `fused_moe`'s
    routing-and-count): `ROUTE_SOFTMAX` or `ROUTE_GROUPED`, its logits `[T, E_routed]`
    (contiguous rows) and settings."""

    kind: int
    logits: torch.Tensor
    renormalize: bool
    correction_bias: torch.Tensor | None = None
    scaling: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    num_shared: int = 0


def small_batch_moe_routed(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    tiles: SmallBatchTiles = DEFAULT_TILES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`small_batch_moe` on `softmax_topk`'s choices from `router_logits` `[T, E]` (contiguous
    rows), chosen inside the gate-up kernel: (out `[T, H]`, weights `[T, k]` in the logits'
    dtype, ids `[T, k]` int64), the choices exactly as `softmax_topk` makes them."""
    num_tokens = x.shape[0]
    weights = router_logits.new_empty(num_tokens, top_k)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=x.device)
    routing = Routing(ROUTE_SOFTMAX, router_logits, renormalize)
    out = _launch(x, w13, w2, weights, ids, routing, tiles)
    return out, weights, ids


def small_batch_moe_grouped_routed(
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
    tiles: SmallBatchTiles = DEFAULT_TILES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`small_batch_moe` on `grouped_topk`'s choices from `router_logits` `[T, E]` (contiguous
    rows), chosen inside the gate-up kernel, the `num_shared` shared experts (w13's and w2's
    last ones, ids E, E + 1, ...) appended with weight 1.0: (out `[T, H]`, weights
    `[T, k + num_shared]` float32, ids `[T, k + num_shared]` int64), exactly `grouped_topk`'s."""
    num_tokens = x.shape[0]
    width = top_k + num_shared
    weights = torch.empty(num_tokens, width, dtype=torch.float32, device=x.device)
    ids = torch.empty(num_tokens, width, dtype=torch.int64, device=x.device)
    routing = Routing(
        ROUTE_GROUPED,
        router_logits,
        renormalize,
        correction_bias.contiguous(),
        scaling_factor,
        num_groups,
        topk_groups,
        num_shared,
    )
    out = _launch(x, w13, w2, weights, ids, routing, tiles)
    return out, weights, ids


def _scratch(w13: torch.Tensor) -> torch.Tensor:
    """`small_moe_kernel`'s counters for the layer whose weights are `w13`: each launch leaves
    them zero, and one layer's launches never overlap (one stream runs a model's forward), so
    each layer keeps its own, made once (zero) and kept with its weights' storage."""
    key = (w13.device, w13.data_ptr())
    scratch = _SCRATCH.get(key)
    if scratch is None:
        scratch = torch.zeros(SCRATCH_SLOTS.value, dtype=torch.int32, device=w13.device)
        _SCRATCH[key] = scratch
    return scratch


_SCRATCH: dict[tuple[torch.device, int], torch.Tensor] = {}


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each taking several items
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    routing: Routing | None,
    tiles: SmallBatchTiles,
) -> torch.Tensor:
    out = torch.empty_like(x)
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        return out
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    k_pow2 = triton.next_power_of_2(top_k)
    num_pairs = num_tokens * top_k
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [N, I]
    # x, a placeholder for the tensors a kernel without routing never reads.
    logits = x if routing is None else routing.logits
    bias = x if routing is None or routing.correction_bias is None else routing.correction_bias
    num_routed = logits.shape[1] if routing is not None else num_experts
    grouped = routing is not None and routing.kind == ROUTE_GROUPED
    num_groups = routing.num_groups if routing is not None and grouped else 1
    per_group = num_routed // num_groups
    route_args = {
        "TOP_K": top_k,
        "K_POW2": k_pow2,
        "E_POW2": triton.next_power_of_2(num_routed) if routing is not None else 1,
        "ROUTE": ROUTE_NONE if routing is None else routing.kind,
        "RENORMALIZE": routing is not None and routing.renormalize,
        "NUM_GROUPS": num_groups,
        "PER_GROUP": per_group if grouped else 1,
        "TOPK_GROUPS": routing.topk_groups if routing is not None and grouped else 1,
        "NUM_SHARED": routing.num_shared if routing is not None else 0,
        "G_POW2": triton.next_power_of_2(num_groups),
        "P_POW2": triton.next_power_of_2(per_group) if grouped else 1,
    }
    scaling = float(routing.scaling) if routing is not None else 1.0
    down_k = down_block_k(tiles, k_pow2, w2.element_size())
    if tiles.programs_per_sm:
        if down_k % tiles.gate_up_n or triton.cdiv(inter, down_k) > SCRATCH_SLOTS.value - 2:
            raise ValueError(
                f"one launch needs gate_up_n ({tiles.gate_up_n}) to divide the down step "
                f"({down_k}) and at most {SCRATCH_SLOTS.value - 2} steps of I ({inter})"
            )
        gate_up_items = num_pairs * triton.cdiv(inter, tiles.gate_up_n)
        down_blocks = triton.cdiv(hidden, tiles.down_n)
        num_items = gate_up_items + num_tokens * down_blocks
        programs = min(num_items, _sm_count(x.device) * tiles.programs_per_sm)
        small_moe_kernel[(programs,)](
            x,
            w13,
            w2,
            topk_ids,
            topk_weights,
            act,
            out,
            logits,
            bias,
            _scratch(w13),
            num_experts,
            num_routed,
            num_pairs,
            hidden,
            inter,
            x.stride(0),
            logits.stride(0),
            w13.stride(0),
            w13.stride(1),
            w2.stride(0),
            w2.stride(1),
            scaling,
            gate_up_items,
            down_blocks,
            num_items,
            **route_args,
            GATE_UP_N=tiles.gate_up_n,
            GATE_UP_K=tiles.gate_up_k,
            DOWN_N=tiles.down_n,
            DOWN_K=down_k,
            num_warps=tiles.num_warps,
            **pdl.launch_args(x),
        )
        return out
    small_gate_up_kernel[(num_pairs, triton.cdiv(inter, tiles.gate_up_n))](
        x,
        w13,
        topk_ids,
        act,
        logits,
        topk_weights,
        bias,
        num_experts,
        num_routed,
        hidden,
        inter,
        x.stride(0),
        logits.stride(0),
        w13.stride(0),
        w13.stride(1),
        scaling,
        **route_args,
        BLOCK_N=tiles.gate_up_n,
        BLOCK_K=tiles.gate_up_k,
        num_warps=tiles.num_warps,
        **pdl.launch_args(x),
    )
    small_down_combine_kernel[(num_tokens, triton.cdiv(hidden, tiles.down_n))](
        act,
        w2,
        topk_weights,
        topk_ids,
        out,
        num_experts,
        hidden,
        inter,
        w2.stride(0),
        w2.stride(1),
        TOP_K=top_k,
        K_POW2=k_pow2,
        BLOCK_N=tiles.down_n,
        BLOCK_K=down_k,
        num_warps=tiles.num_warps,
        **pdl.launch_args(act),
    )
    return out
