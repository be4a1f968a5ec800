"""The fused MoE for a few tokens: two launches, no align sort (a decode step at small batch).

At batch 1 each kernel of `engine.kernels.fused_moe`'s path costs a few microseconds of launch
and ramp for well under that of work, and the 16-row blocks of the grouped GEMMs hold one real
row each. Here, over the same `N = T * top_k` pairs (pair `i` is token `i // top_k`'s
`i % top_k`-th choice) and the same weights (w13 `[E, 2I, H]`, w2 `[E, H, I]`):

1. `small_gate_up_kernel`, a program per (pair, block of I's columns): the pair's token row
   against the gate and up rows of its expert, products on the CUDA cores (one row; or, with
   `SmallBatchTiles.gate_up_dot`, on the tensor cores as row 0 of a 16-row tile, so that
   Triton pipelines the weight loads), stored as `silu(gate) * up` `[N, I]` in x's dtype.
   With `ROUTE` (`small_batch_moe_routed`, `small_batch_moe_grouped_routed`) each program
   first chooses its token's experts from the router logits by `softmax_topk`'s or
   `grouped_topk`'s code (so exactly their choices, ties to the lower id; grouped routing
   appends any fused shared experts), and the pair's first program stores the choice and its
   weight for kernel 2: routing costs no launch.
2. `small_down_combine_kernel`, a program per (token, block of H's columns): the down
   projections of all the token's pairs (one tile of the w2 rows of every pair's expert per
   step), each rounded to x's dtype, then weighted and summed in float32 pair by pair, in
   order; stored once. Where the gate-up routes and the tiles say `down_preload`
   (`ROUTED_TILES`, the default for the CUDA-core tiles), `small_down_preload_kernel` instead:
   each program routes its token again and loads its first K step of weights before its PDL
   wait, while the gate-up runs (the same output bit for bit).

The roundings are those of the grouped path (activation and per-pair output in x's dtype, the
weighted sum in float32, one cast at the end), so the two agree up to float32 summation order
within each dot product. No atomics: deterministic. Ids outside `[0, E)` add nothing. Buffer
sizes depend only on T, and nothing waits on the host (CUDA-graph capturable).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.attention import dot_precision
from engine.kernels.moe_routing import ROUTE_GROUPED, ROUTE_NONE, ROUTE_SOFTMAX, route_token

# Whether the CUDA-core down's programs sum their token's weighted pairs in one reduction
# (`_combine_store`) instead of pair by pair (two block-wide reductions a pair, 43 -> 22
# `bar.sync` in the preloading down's PTX at Qwen3-30B-A3B's tiles). On: `bash
# bench/gpu/session.sh b25` (H100, decode 1 x 128, two alternations each) timed Qwen3-30B-A3B
# 2.98 -> 2.90-2.91 ms with the warp routing on, Moonlight 2.41-2.42 -> 2.40-2.41.
# `PDSERVE_COMBINE_ONE_SUM=0` turns it off. Read when a kernel compiles.
COMBINE_ONE_SUM = tl.constexpr(os.environ.get("PDSERVE_COMBINE_ONE_SUM", "1") != "0")
# Whether the CUDA-core gate-up and the preloading down load the token row and the activations in
# their weight tile's shape (a stride-0 axis over the tile's columns), so that the load takes the
# tile's layout: Triton's coalescing gives a smaller load a layout of its own (spread over all
# the threads), converted to the tile's through shared memory every K step, four barriers a
# step. The same values multiplied: bit for bit the same output. PTX on sm_90 with the warp
# routing: the gate-up 6 -> 1 `bar.sync` (127 -> 134 registers: three programs an SM, which
# still hold Qwen3-30B-A3B's 384 at one token), the preloading down with the one-sum combine
# 8 -> 3 (96 -> 84 registers). Not the plain CUDA-core down, whose default tiles (Moonlight's at
# one token) already spill: more so this way. Off: `bash bench/gpu/session.sh b25` (H100, decode
# 1 x 128, with the warp routing and the one-sum combine) timed Qwen3-30B-A3B 2.90-2.91 ->
# 3.12 ms with it on (the gate-up's 134 registers, or each thread's own copy of the row, a
# third load a K step: not separated), Moonlight 2.40-2.41 -> 2.40 (level).
# `PDSERVE_TILE_LOADS=1` turns it on in both kernels; `PDSERVE_TILE_LOADS_GATE_UP` and
# `PDSERVE_TILE_LOADS_DOWN` (1 or 0) in one each, to separate the two (`session.sh b26`).
_TILE_LOADS = os.environ.get("PDSERVE_TILE_LOADS", "0")
TILE_LOADS_GATE_UP = tl.constexpr(os.environ.get("PDSERVE_TILE_LOADS_GATE_UP", _TILE_LOADS) == "1")
TILE_LOADS_DOWN = tl.constexpr(os.environ.get("PDSERVE_TILE_LOADS_DOWN", _TILE_LOADS) == "1")


@triton.jit
def small_gate_up_kernel(
    x,
    w13,
    topk_ids,
    act,
    router_logits,
    topk_weights,
    correction_bias,
    num_experts,
    num_routed,
    hidden,
    inter,
    stride_xt,
    stride_lt,
    stride_we,
    stride_wn,
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    # Pairs vary fastest: the programs resident together read one column block of their
    # experts, so two tokens' pairs on the same expert read its rows once from memory.
    small_gate_up_program(
        tl.program_id(0), tl.program_id(1),
        x, w13, topk_ids, act, router_logits, topk_weights, correction_bias, num_experts,
        num_routed, hidden, inter, stride_xt, stride_lt, stride_we, stride_wn, scaling, TOP_K,
        K_POW2, E_POW2, ROUTE, RENORMALIZE, NUM_GROUPS, PER_GROUP, TOPK_GROUPS, NUM_SHARED, G_POW2,
        P_POW2, BLOCK_N, BLOCK_K, DOT, PRECISION,
    )  # fmt: skip


@triton.jit
def small_gate_up_program(
    pair,
    col_block,
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
    DOT: tl.constexpr,  # the products on the tensor cores (`SmallBatchTiles.gate_up_dot`)
    PRECISION: tl.constexpr,  # DOT: tl.dot's input precision
):
    """Program `(pair, col_block)` of the gate-up launch (also an item of
    bench.persistent_kernel's)."""
    pair = pair.to(tl.int64)
    if ROUTE != 0:
        # Every program routes its token again (a few hundred logits: less than a launch);
        # the pair's first program writes its choice for the down kernel.
        chosen_w, chosen_id = route_token(
            router_logits, pair // TOP_K, stride_lt, correction_bias, num_routed, scaling, ROUTE,
            TOP_K, K_POW2, E_POW2, RENORMALIZE, NUM_GROUPS, PER_GROUP, TOPK_GROUPS, NUM_SHARED,
            G_POW2, P_POW2,
        )  # fmt: skip
        mine = tl.arange(0, K_POW2) == pair % TOP_K
        expert = tl.sum(tl.where(mine, chosen_id, 0), axis=0)
        if col_block == 0:
            # Exact: the other slots are 0.
            weight = tl.sum(tl.where(mine, chosen_w, 0.0), axis=0)
            tl.store(topk_weights + pair, weight.to(topk_weights.dtype.element_ty))
            tl.store(topk_ids + pair, expert)
    else:
        expert = tl.load(topk_ids + pair).to(tl.int64)
        if (expert < 0) | (expert >= num_experts):
            return  # another rank's pair: the down kernel skips it too
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptr = x + (pair // TOP_K) * stride_xt + ks
    if DOT:
        # The token row as row 0 of a 16-row tile (the others masked: never loaded) against
        # [BLOCK_K, BLOCK_N] tiles of the gate and up rows, on the tensor cores: loads that
        # feed a dot, which Triton pipelines `num_stages` deep through shared memory.
        first = tl.arange(0, 16)[:, None] == 0
        w_ptr = w13 + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]
        dot_gate = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        dot_up = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = ks < hidden - k0
            x_tile = tl.load(x_ptr[None, :], mask=first & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & col_ok[None, :]
            gate = tl.load(w_ptr, mask=w_ok, other=0.0)
            up = tl.load(w_ptr + inter * stride_wn, mask=w_ok, other=0.0)
            dot_gate = tl.dot(x_tile, gate, dot_gate, input_precision=PRECISION)
            dot_up = tl.dot(x_tile, up, dot_up, input_precision=PRECISION)
            x_ptr += BLOCK_K
            w_ptr += BLOCK_K
        gate_out = tl.sum(dot_gate, axis=0)  # row 0 plus zeros: exact
        up_out = tl.sum(dot_up, axis=0)
    else:
        # [BLOCK_N, BLOCK_K] of the gate rows, contiguous along K; the up rows `inter` below.
        w_ptr = w13 + expert * stride_we + cols[:, None] * stride_wn + ks[None, :]
        acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = ks < hidden - k0
            w_ok = col_ok[:, None] & k_ok[None, :]
            if TILE_LOADS_GATE_UP:
                row_tile = x_ptr[None, :] + 0 * cols[:, None]
                row = tl.load(row_tile, mask=w_ok, other=0.0).to(tl.float32)
            else:
                row = tl.load(x_ptr, mask=k_ok, other=0.0).to(tl.float32)[None, :]
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
    DOT: tl.constexpr = False,  # the products on the tensor cores (`SmallBatchTiles.down_dot`)
    PRECISION: tl.constexpr = "tf32",
):
    pdl.start(PDL)
    small_down_combine_program(
        tl.program_id(0), tl.program_id(1), act, w2, topk_weights, topk_ids, out, num_experts,
        hidden, inter, stride_we, stride_wn, TOP_K, K_POW2, BLOCK_N, BLOCK_K, DOT, PRECISION,
    )  # fmt: skip


@triton.jit
def small_down_combine_program(
    token, col_block, act, w2, topk_weights, topk_ids, out, num_experts, hidden, inter,
    stride_we, stride_wn, TOP_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT: tl.constexpr = False, PRECISION: tl.constexpr = "tf32",
):  # fmt: skip
    """Program `(token, col_block)` of the down launch (also an item of
    bench.persistent_kernel's)."""
    token = token.to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    if DOT:
        # Pair by pair, in order: the pair's activation row as row 0 of a 16-row tile against
        # [BLOCK_K, BLOCK_N] tiles of its expert's w2 rows, on the tensor cores (loads that feed
        # a dot: Triton pipelines them `num_stages` deep); each pair's output rounded to x's
        # dtype, then weighted and summed in float32, as below.
        first = tl.arange(0, 16)[:, None] == 0
        kk = tl.arange(0, BLOCK_K)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            pair_j = token * TOP_K + j
            e = tl.load(topk_ids + pair_j).to(tl.int64)
            ok = (e >= 0) & (e < num_experts)  # another rank's pair adds nothing
            e = tl.where(ok, e, 0)
            limit = tl.where(ok, inter, 0)  # a skipped pair loads nothing
            a_ptr = act + pair_j * inter + kk[None, :]
            w_ptr = w2 + e * stride_we + cols[None, :] * stride_wn + kk[:, None]
            acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                k_ok = kk < limit - k0
                a = tl.load(a_ptr + k0, mask=first & k_ok[None, :], other=0.0)
                w = tl.load(w_ptr + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            y_j = tl.sum(acc, axis=0).to(out.dtype.element_ty).to(tl.float32)  # row 0: exact
            weight_j = tl.load(topk_weights + pair_j, mask=ok, other=0.0).to(tl.float32)
            total += weight_j * y_j
        tl.store(out + token * hidden + cols, total.to(out.dtype.element_ty), mask=col_ok)
    else:
        ks = tl.arange(0, BLOCK_K)
        slots = tl.arange(0, K_POW2)
        pair = token * TOP_K + slots  # [K_POW2]
        expert = tl.load(topk_ids + pair, mask=slots < TOP_K, other=-1).to(tl.int64)
        # Another rank's pair adds nothing (and its act row was never written).
        valid = (expert >= 0) & (expert < num_experts)
        expert = tl.where(valid, expert, 0)
        # All the token's pairs at once, [K_POW2, BLOCK_N, BLOCK_K] of w2 per step, so that a
        # program keeps as many bytes in flight as a gate-up program does.
        a_ptr = act + pair[:, None] * inter + ks[None, :]
        w_ptr = w2 + expert[:, None, None] * stride_we + cols[None, :, None] * stride_wn
        w_ptr += ks[None, None, :]
        acc = tl.zeros([K_POW2, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k_ok = ks < inter - k0
            a_ok = valid[:, None] & k_ok[None, :]
            a = tl.load(a_ptr, mask=a_ok, other=0.0).to(tl.float32)
            w_ok = a_ok[:, None, :] & col_ok[None, :, None]
            w = tl.load(w_ptr, mask=w_ok, other=0.0).to(tl.float32)
            acc += w * a[:, None, :]
            a_ptr += BLOCK_K
            w_ptr += BLOCK_K
        weight = tl.load(topk_weights + pair, mask=valid, other=0.0).to(tl.float32)
        _combine_store(acc, weight, out, token, hidden, cols, col_ok, TOP_K, K_POW2)


@triton.jit
def _combine_store(
    acc, weight, out, token, hidden, cols, col_ok, TOP_K: tl.constexpr, K_POW2: tl.constexpr
):
    """The token's output from its pairs' `[K_POW2, BLOCK_N, BLOCK_K]` partial products and
    float32 weights `[K_POW2]`: each pair's product rounded to x's dtype, as the grouped path
    stores it, then weighted and summed in float32 (slots past TOP_K weigh 0); stored once."""
    y = tl.sum(acc, axis=2).to(out.dtype.element_ty).to(tl.float32)  # [K_POW2, BLOCK_N]
    if COMBINE_ONE_SUM:
        # One reduction over the pairs (a tree, not pair after pair): it ends every down program,
        # so its barriers sit between the layer's last weight bytes and the next launch.
        total = tl.sum(y * weight[:, None], axis=0)
    else:
        # Pair by pair, in order, as combine_kernel does (picking a row out by a masked sum is
        # exact: the other terms are zeros): two block-wide reductions a pair.
        slots = tl.arange(0, K_POW2)
        total = tl.zeros([acc.shape[1]], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            y_j = tl.sum(tl.where(slots[:, None] == j, y, 0.0), axis=0)
            weight_j = tl.sum(tl.where(slots == j, weight, 0.0), axis=0)
            total += weight_j * y_j
    tl.store(out + token * hidden + cols, total.to(out.dtype.element_ty), mask=col_ok)


@triton.jit
def small_down_preload_kernel(
    act,  # [N, INTER]
    w2,  # [E, H, INTER]
    topk_weights,  # [T, TOP_K]: only its dtype is read (the weights are routed here again)
    out,  # [T, H] out
    router_logits,  # [T, E_ROUTED]
    correction_bias,  # [E_ROUTED] with ROUTE_GROUPED, else unused
    num_experts,
    num_routed,
    hidden,
    inter,
    stride_lt,
    stride_we,
    stride_wn,
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """The CUDA-core down-and-combine with its first K step of weights loaded before the PDL
    wait (`SmallBatchTiles.down_preload`). The program routes its token again from the router
    logits, as the gate-up's programs do, so it knows its experts without reading anything
    the gate-up writes; the gate-up lets it be scheduled once all its programs have passed
    their own wait (`pdl.launch_args(trigger_after_wait=True)`), when the logits' writer has
    finished, so these loads run while the gate-up does. After the wait it reads the
    activations and runs `small_down_combine_program`'s loop, product for product and sum for
    sum: the same output bit for bit."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    chosen_w, chosen_id = route_token(
        router_logits, token, stride_lt, correction_bias, num_routed, scaling, ROUTE, TOP_K,
        K_POW2, E_POW2, RENORMALIZE, NUM_GROUPS, PER_GROUP, TOPK_GROUPS, NUM_SHARED, G_POW2,
        P_POW2,
    )  # fmt: skip
    slots = tl.arange(0, K_POW2)
    valid = slots < TOP_K
    expert = tl.where(valid, chosen_id, 0)
    # Rounded as the gate-up stores it for the other down kernels.
    weight = chosen_w.to(topk_weights.dtype.element_ty).to(tl.float32)
    weight = tl.where(valid, weight, 0.0)
    pair = token * TOP_K + slots
    ks = tl.arange(0, BLOCK_K)
    w_ptr = w2 + expert[:, None, None] * stride_we + cols[None, :, None] * stride_wn
    w_ptr += ks[None, None, :]
    w_ok = valid[:, None, None] & col_ok[None, :, None]
    w = tl.load(w_ptr, mask=w_ok & (ks < inter)[None, None, :], other=0.0)
    pdl.start(PDL)
    a_ptr = act + pair[:, None] * inter + ks[None, :]
    acc = tl.zeros([K_POW2, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if TILE_LOADS_DOWN:
            a_tile = a_ptr[:, None, :] + 0 * cols[None, :, None]
            a_ok = w_ok & (ks < inter - k0)[None, None, :]
            a = tl.load(a_tile, mask=a_ok, other=0.0).to(tl.float32)
        else:
            a_ok = valid[:, None] & (ks < inter - k0)[None, :]
            a = tl.load(a_ptr, mask=a_ok, other=0.0).to(tl.float32)[:, None, :]
        acc += w.to(tl.float32) * a
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
        # The next step's weights (none past the last: masked, nothing read).
        w = tl.load(w_ptr, mask=w_ok & (ks < inter - k0 - BLOCK_K)[None, None, :], other=0.0)
    _combine_store(acc, weight, out, token, hidden, cols, col_ok, TOP_K, K_POW2)


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
    # The gate-up kernel's products on the tensor cores (the token as row 0 of 16), its weight
    # loads pipelined `gate_up_stages` deep (Triton pipelines the loads that feed a dot; the
    # CUDA-core loop keeps one step in flight).
    gate_up_dot: bool = False
    gate_up_stages: int = 4
    # The down kernel's products on the tensor cores too (each pair's activation as row 0 of
    # 16), its weight loads pipelined `down_stages` deep, pair after pair.
    down_dot: bool = False
    down_stages: int = 3
    # With routing in the kernels (`small_batch_moe_routed`, `..._grouped_routed`), the down
    # launch routes again and loads its first K step of weights before its PDL wait, scheduled
    # while the gate-up runs (`small_down_preload_kernel`); the CUDA-core down only.
    down_preload: bool = False

    def __post_init__(self) -> None:
        for name in ("gate_up_n", "gate_up_k", "down_n", "down_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):  # tl.arange and the warps need powers of two
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.gate_up_stages < 1 or self.down_stages < 1:
            raise ValueError(
                f"stages must be >= 1, got {self.gate_up_stages} and {self.down_stages}"
            )
        if self.down_preload and self.down_dot:
            raise ValueError("down_preload is for the CUDA-core down (down_dot=False)")
        if self.down_dot and min(self.down_n, self.down_k) < 16:
            raise ValueError(
                f"down_dot needs down_n and down_k of 16 or more (tl.dot), got {self.down_n} "
                f"and {self.down_k}"
            )
        if self.gate_up_dot and min(self.gate_up_n, self.gate_up_k) < 16:
            raise ValueError(
                f"gate_up_dot needs gate_up_n and gate_up_k of 16 or more (tl.dot), got "
                f"{self.gate_up_n} and {self.gate_up_k}"
            )


DEFAULT_TILES = SmallBatchTiles()
# The gate-up on the tensor cores, for 16-bit experts of `DOT_MIN_INTER` intermediate columns
# or more (`default_tiles`). Measured on an H100 at one token (`bench.moe_kernel --path small
# --small-tiles`, both kernels, µs a layer): Moonlight's experts (1,408 columns, 6 routed and 2
# shared pairs) 58.2 with the default tiles, 56.3-56.8 with dot tiles of 64 columns, 54.8 with
# these; its batch-1 step (`bench.engine`, back to back, alternating runs) 2.78 and 2.80 ->
# 2.68 and 2.67 ms. Qwen3-30B-A3B's (768 columns) 33.8 against 33.9-35.3 for every dot tile
# tried: the CUDA-core tiles stay there.
DOT_TILES = SmallBatchTiles(gate_up_n=32, gate_up_k=256, gate_up_dot=True, gate_up_stages=3)
DOT_MIN_INTER = 1024
# The CUDA-core tiles where the kernels route (the decode step's path): the down routes again
# and loads its first K step while the gate-up runs, on 4 x 128 tiles (100 registers on sm_90,
# so one program fits beside three gate-up programs an SM; 8 x 128 took 167 with a spill).
# Qwen3-30B-A3B 1 x 128 on an H100, back to back, alternating (`bash bench/gpu/session.sh
# b19`, the twentieth session): 3.07 and 3.06 ms with DEFAULT_TILES, 3.03 and 3.04 with these
# (8 x 128: 3.04 and 3.04). Moonlight's, with DOT_TILES, did not gain (2.51 / 2.48 against
# 2.50 / 2.50 and 2.49 / 2.48): it stays without.
ROUTED_TILES = dataclasses.replace(DEFAULT_TILES, down_n=4, down_k=128, down_preload=True)


def default_tiles(inter: int, element_size: int, routed: bool = False) -> SmallBatchTiles:
    """The tiles for experts of `inter` intermediate columns in weights of `element_size`
    bytes: `DOT_TILES` for 16-bit weights from `DOT_MIN_INTER` columns, else `ROUTED_TILES` for
    16-bit weights in a launch that routes (`routed`), else `DEFAULT_TILES`."""
    if element_size == 2 and inter >= DOT_MIN_INTER:
        return DOT_TILES
    return ROUTED_TILES if routed and element_size == 2 else DEFAULT_TILES


def down_block_k(tiles: SmallBatchTiles, k_pow2: int, element_size: int = 2) -> int:
    """The down kernel's K step for `k_pow2` pair slots a token: it holds a [k_pow2, down_n,
    K step] tile, so past 8 slots (DeepSeek-V3's top-8 and a fused shared expert: 16) a shorter
    step keeps the same registers, and so do float32 weights (`element_size` 4: half the step,
    the same bytes a load; 16-bit weights' step spilled 2 KB there)."""
    if tiles.down_dot:  # a [16, down_n] accumulator a pair: no [k_pow2, ...] tile to hold
        return tiles.down_k
    return max(16, tiles.down_k * 8 // max(8, k_pow2) * 2 // max(2, element_size))


def small_batch_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tiles: SmallBatchTiles | None = None,
) -> torch.Tensor:
    """`fused_moe`'s result `[T, H]` in two launches. Expects what `fused_moe` checks:
    contiguous tensors of matching shapes."""
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
    tiles: SmallBatchTiles | None = None,
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
    tiles: SmallBatchTiles | None = None,
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


def _launch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    routing: Routing | None,
    tiles: SmallBatchTiles | None,
) -> torch.Tensor:
    out = torch.empty_like(x)
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        return out
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    tiles = tiles or default_tiles(inter, x.element_size(), routing is not None)
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
    # The routing's settings, for the gate-up (and a preloading down, which routes again).
    routed = {
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
    # Only a launch that routes can preload its down (the ids given are the gate-up's to read).
    preload = tiles.down_preload and routing is not None
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
        float(routing.scaling) if routing is not None else 1.0,
        **routed,
        BLOCK_N=tiles.gate_up_n,
        BLOCK_K=tiles.gate_up_k,
        DOT=tiles.gate_up_dot,
        PRECISION=dot_precision(x),
        num_warps=tiles.num_warps,
        num_stages=tiles.gate_up_stages if tiles.gate_up_dot else 3,
        **pdl.launch_args(x, trigger_after_wait=preload),
    )
    # At batch 1 the next layer's norm, and after it its first projection on preloading
    # tiles, are scheduled at once: that projection's weight streams in beside this one's.
    down_pdl = pdl.launch_args(act, trigger_first=pdl.trigger_first(num_tokens))
    grid = (num_tokens, triton.cdiv(hidden, tiles.down_n))
    if preload:
        assert routing is not None
        small_down_preload_kernel[grid](
            act, w2, topk_weights, out, logits, bias, num_experts, num_routed, hidden, inter,
            logits.stride(0), w2.stride(0), w2.stride(1), float(routing.scaling), **routed,
            BLOCK_N=tiles.down_n, BLOCK_K=down_block_k(tiles, k_pow2, w2.element_size()),
            num_warps=tiles.num_warps, num_stages=3, **down_pdl,
        )  # fmt: skip
        return out
    small_down_combine_kernel[grid](
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
        BLOCK_K=down_block_k(tiles, k_pow2, w2.element_size()),
        DOT=tiles.down_dot,
        PRECISION=dot_precision(x),
        num_warps=tiles.num_warps,
        num_stages=tiles.down_stages if tiles.down_dot else 3,
        **down_pdl,
    )
    return out
