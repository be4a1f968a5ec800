"""One decode layer at batch 1 in one persistent launch: an experiment that lost.

At batch 1 a decode layer is a chain of small launches, each streaming one weight and paying
its own ramp (the first loads in flight) and tail (the last programs finishing alone): a
Qwen3-30B-A3B layer is nine (the input norm, QKV, RoPE with the KV write, the decode splits,
their combine, O, the norm with the router's logits, the experts' gate-up and down).
`decode_layer_kernel` runs a layer in one launch: its programs take items from a counter in the
layer's order (the input norm; QKV's tiles; the decode splits, each rotating its group's
queries and the last writing the new key and value, as `attention.DecodeRope` does; the
combine of each head; O's tiles; with MOE, the norm with the router's logits over blocks of
experts, the chosen experts' gate-up blocks each routing its token again, the down blocks),
and an item waits for the count of finished items of the phase before it, after loading the
weights it can (a dense product's tile loads its first weights before it waits). An item never
waits for a higher-numbered one, and every number taken is held by a running program, so it
cannot deadlock whatever is resident.

Each item runs the code of the kernel it replaces (`fused.rms_norm_row` and
`rms_norm_gate_program`, `attention.decode_split_program` and `decode_combine_program`,
`fused_moe_small.small_gate_up_program` and `small_down_combine_program`, and the GEMV tile
here), so the launch gives the same bytes as those kernels launched one after another with the
same warps (tests/bench/test_persistent_layer.py). The launch's counters must be zero when it
starts; its last program zeroes them again, so a CUDA graph replays it as it is. Each launch
needs counters of its own: its programs take their first number before the programmatic-launch
wait on the launch before.

Timed on an H100 (`bench.persistent_layer`, `session.sh b3`; bench/NOTES.md) it ran far slower
than the launches it replaces: Qwen3-30B-A3B's attention half 44 µs a layer against 28-29,
whole layers 107 against 67, and a chain of QKV-sized GEMVs at 2.1x their bytes against 1.35x
for one launch each. An engine path that took batch-1 steps through it was built and taken out
with that result (commit c4f6922).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.attention import (
    LOG2E,
    decode_combine_program,
    decode_split_program,
    default_tiles,
    dot_precision,
)
from engine.kernels.fused import GATE_BLOCK_E, rms_norm_gate_program, rms_norm_row
from engine.kernels.fused_moe_small import (
    SmallBatchTiles,
    down_block_k,
    small_down_combine_program,
    small_gate_up_program,
)
from engine.kernels.moe_routing import ROUTE_SOFTMAX

# Scratch slots: the tile counter, the programs done, then each product's finished tiles.
_TICKET: tl.constexpr = tl.constexpr(0)
_FINISHED: tl.constexpr = tl.constexpr(1)
_DONE: tl.constexpr = tl.constexpr(2)


@triton.jit
def _wait_for(counter, need, SPIN_NS: tl.constexpr):
    """Spin until the int32 at `counter` reaches `need`, reading past L1, then read it once
    with acquire semantics: the writes released before each increment are visible after.
    SPIN_NS > 0: sleep that long between reads (`nanosleep`), so that hundreds of waiting
    programs do not keep one L2 line busy under the other programs' weight streams."""
    seen = tl.load(counter, volatile=True)
    while seen < need:
        if SPIN_NS > 0:
            seen = tl.inline_asm_elementwise(
                f"nanosleep.u32 {SPIN_NS}; mov.u32 $0, $1;", "=r,r", [seen], dtype=tl.int32,
                is_pure=False, pack=1,
            )  # fmt: skip
        seen = tl.load(counter, volatile=True)
    tl.atomic_add(counter, 0, sem="acquire")
    # The acquire is one thread's: the CTA's other threads are ordered after it only through a
    # barrier. (Before it, two programs an SM gave wrong whole-layer outputs on the H100.)
    tl.debug_barrier()


@triton.jit
def _gemv_tile(
    w,
    x,
    y,
    tile,
    n,
    k,
    ready,  # PERSISTENT: the counter of finished tiles of the product x comes from
    need,  # PERSISTENT: that product's tile count (0: x is the chain's input)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
    PDL: tl.constexpr,
    SPIN_NS: tl.constexpr = 0,
    DOT: tl.constexpr = False,
    PRECISION: tl.constexpr = "tf32",
):
    """Rows `tile * BLOCK_N ...` of `y = w @ x` (w `[n, k]` contiguous), float32 sums rounded
    once to y's dtype. On the CUDA cores: the first K step's weights are loaded before waiting
    for x, and each step loads the next one's before using its own (two steps in flight). With
    DOT, on the tensor cores: x as row 0 of a 16-row tile against `[BLOCK_K, BLOCK_N]` tiles of
    w, loads that feed a dot, which Triton pipelines `num_stages` deep through shared memory
    (more bytes in flight a program than two steps in registers; BLOCK_N >= 16)."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    ks = tl.arange(0, BLOCK_K)
    if DOT:
        pdl.start(PDL)
        if PERSISTENT:
            _wait_for(ready, need, SPIN_NS)
        first = tl.arange(0, 16)[:, None] == 0
        w_t = w + rows.to(tl.int64)[None, :] * k + ks[:, None]  # [BLOCK_K, BLOCK_N]
        dot_acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            k_ok = k0 + ks < k
            x_t = tl.load(
                x + k0 + ks[None, :], mask=first & k_ok[None, :], other=0.0, cache_modifier=".cg"
            )
            w_k = tl.load(w_t + k0, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            dot_acc = tl.dot(x_t, w_k, dot_acc, input_precision=PRECISION)
        out = tl.sum(dot_acc, 0)  # row 0 plus zeros: exact
    else:
        w_ptrs = w + rows.to(tl.int64)[:, None] * k + ks[None, :]
        w_next = tl.load(w_ptrs, mask=row_ok[:, None] & (ks < k)[None, :], other=0.0)
        pdl.start(PDL)  # the launch before (a persistent kernel's too)
        if PERSISTENT:
            _wait_for(ready, need, SPIN_NS)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            w_cur = w_next
            following = k0 + BLOCK_K + ks
            w_next = tl.load(
                w_ptrs + k0 + BLOCK_K, mask=row_ok[:, None] & (following < k)[None, :], other=0.0
            )
            # Past L1: in the persistent kernel x was written by other SMs in this launch.
            x_k = tl.load(x + k0 + ks, mask=k0 + ks < k, other=0.0, cache_modifier=".cg")
            acc += w_cur.to(tl.float32) * x_k.to(tl.float32)[None, :]
        out = tl.sum(acc, 1)
    tl.store(y + rows, out.to(y.dtype.element_ty), mask=row_ok)


# Phases of a layer, in order (OUT: O's tiles; GATE: the norm with the router's logits; UP and
# DOWN: the experts' products); each one's finished items count at `_DONE + phase`.
NORM: tl.constexpr = tl.constexpr(0)
QKV: tl.constexpr = tl.constexpr(1)
SPLITS: tl.constexpr = tl.constexpr(2)
COMBINE: tl.constexpr = tl.constexpr(3)
OUT: tl.constexpr = tl.constexpr(4)
GATE: tl.constexpr = tl.constexpr(5)
UP: tl.constexpr = tl.constexpr(6)
DOWN: tl.constexpr = tl.constexpr(7)
# Counters a launch takes: _TICKET, _FINISHED, then the eight phases' (a power of two).
SCRATCH: tl.constexpr = tl.constexpr(16)


@triton.jit
def _release(counter):
    """One more item of a phase done: every thread's stores before the count."""
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="release")


@triton.jit
def decode_layer_kernel(
    x_ptr,  # [H]: the layer's input
    res_ptr,  # [H]: the residual stream, += x in place
    norm_w,
    h_ptr,  # [H]: the normalised input
    eps,
    hidden,
    qkv_w,  # [n_qkv, H]
    qkv_ptr,  # [n_qkv]: q heads, then k heads, then v heads
    n_qkv,
    q_rot_ptr,  # [Hq, DK]: the rotated queries (each split writes its group's)
    k_cache,
    v_cache,
    table_ptr,
    rows_ptr,
    seq_lens_ptr,
    part_o,
    part_lse,
    attn_ptr,  # [Hq, DV]: the attention's output
    scale,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_table,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    pos_ptr,
    slots_ptr,
    cos_ptr,
    sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    qk_eps,
    stride_rope,
    num_splits,
    o_w,  # [H, Hq * DV]
    out_ptr,  # [H]: O's output (the layer's, without MOE)
    post_norm_w,  # MOE: the norm before the experts
    res_out_ptr,  # MOE: [H], the residual stream after the attention (res_ptr is read)
    h2_ptr,  # MOE: [H], the experts' input
    gate_w,  # MOE: [E, H], the router
    logits_ptr,  # MOE: [E], in the router's dtype
    w13,  # MOE: [E, 2 * inter, H]
    w2,  # MOE: [E, H, inter]
    act_ptr,  # MOE: [TOP_K, inter]
    topk_ids,  # MOE: [TOP_K] int64, written by the gate-up items
    topk_w,  # MOE: [TOP_K], in the logits' dtype
    moe_out_ptr,  # MOE: [H], the layer's output
    num_experts,
    inter,
    stride_we13,
    stride_wn13,
    stride_we2,
    stride_wn2,
    scratch,  # [SCRATCH] int32, zero at launch and left zero
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # the splits' query rows: a power of two, 16 or more
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,  # powers of two >= DK, DV, DK // 2
    BLOCK_DV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SPLIT_BLOCK_N: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    QK_NORM: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: the splits write the output, no combine items
    MOE: tl.constexpr,  # the MoE half too (softmax top-k routing, Qwen3-MoE's)
    GATE_BLOCK: tl.constexpr,  # MOE: experts a gate item takes
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    ROUTE: tl.constexpr,  # moe_routing.ROUTE_SOFTMAX
    RENORMALIZE: tl.constexpr,
    UP_BLOCK_N: tl.constexpr,  # MOE: the small path's tiles
    UP_BLOCK_K: tl.constexpr,
    DOWN_BLOCK_N: tl.constexpr,
    DOWN_BLOCK_K: tl.constexpr,
    SPIN_NS: tl.constexpr,
    PDL: tl.constexpr,
    GEMV_DOT: tl.constexpr = False,  # the dense products' tiles on the tensor cores
    SPLIT_SHORT_N: tl.constexpr = 0,  # the splits' launch as the engine's (`default_tiles`)
    SPLIT_SHORT_MAX: tl.constexpr = 0,
    SPLIT_MIN_TILES: tl.constexpr = 1,
):
    """One layer at batch 1 (its attention half, with MOE its MoE half too), items taken in
    order (a lower number never waits for a higher one: no deadlock, whatever is resident)."""
    qkv_tiles = tl.cdiv(n_qkv, BLOCK_N)
    o_tiles = tl.cdiv(hidden, BLOCK_N)
    split_items = HKV * num_splits
    combine_items = 0 if DIRECT else HQ
    end_qkv = 1 + qkv_tiles
    end_splits = end_qkv + split_items
    end_combine = end_splits + combine_items
    end_o = end_combine + o_tiles
    gate_items = tl.cdiv(num_experts, GATE_BLOCK) if MOE else 0
    up_items = TOP_K * tl.cdiv(inter, UP_BLOCK_N) if MOE else 0
    down_items = tl.cdiv(hidden, DOWN_BLOCK_N) if MOE else 0
    end_gate = end_o + gate_items
    end_up = end_gate + up_items
    num_items = end_up + down_items
    item = tl.atomic_add(scratch + _TICKET, 1)
    while item < num_items:
        following = tl.atomic_add(scratch + _TICKET, 1)  # in flight while this item runs
        if item == 0:
            pdl.start(PDL)
            rms_norm_row(
                item, x_ptr, res_ptr, norm_w, h_ptr, 0, 0, 0, hidden, eps, 0, x_ptr, x_ptr, 0,
                True, 0, False, False, NORM_BLOCK,
            )  # fmt: skip
            _release(scratch + _DONE + NORM)
        elif item < end_qkv:
            _gemv_tile(
                qkv_w, h_ptr, qkv_ptr, item - 1, n_qkv, hidden, scratch + _DONE + NORM, 1,
                BLOCK_N, BLOCK_K, True, PDL, SPIN_NS, GEMV_DOT, PRECISION,
            )  # fmt: skip
            _release(scratch + _DONE + QKV)
        elif item < end_splits:
            pdl.start(PDL)
            _wait_for(scratch + _DONE + QKV, qkv_tiles, SPIN_NS)
            kvh = (item - end_qkv) // num_splits
            split = (item - end_qkv) % num_splits
            decode_split_program(
                0, kvh, split, q_rot_ptr, k_cache, v_cache, table_ptr, rows_ptr, seq_lens_ptr,
                part_o, part_lse, attn_ptr, scale, HQ * DK, DK, stride_ks, stride_kh, stride_vs,
                stride_vh, stride_table, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                HQ * DV, DV, HQ // HKV, GROUP_PAD, DK, DV, BLOCK_DK, BLOCK_DV, PAGE_SIZE,
                SPLIT_BLOCK_N, num_splits,
                qkv_ptr, qkv_ptr + HQ * DK, qkv_ptr + (HQ + HKV) * DK, pos_ptr, slots_ptr,
                cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, qk_eps, n_qkv, DK, n_qkv, DK, n_qkv,
                DV, stride_rope, PRECISION, DIRECT, True, DK // 2, BLOCK_HALF, INTERLEAVED,
                QK_NORM, 0, SPLIT_SHORT_N, SPLIT_SHORT_MAX, SPLIT_MIN_TILES,
            )  # fmt: skip
            _release(scratch + _DONE + SPLITS)
        elif item < end_combine:
            pdl.start(PDL)
            _wait_for(scratch + _DONE + SPLITS, split_items, SPIN_NS)
            decode_combine_program(
                0, item - end_splits, part_o, part_lse, seq_lens_ptr, attn_ptr, stride_ob,
                stride_oh, stride_os, stride_lb, stride_lh, HQ * DV, DV, DV, BLOCK_DV,
                SPLIT_BLOCK_N, num_splits, 0, SPLIT_MIN_TILES,
            )  # fmt: skip
            _release(scratch + _DONE + COMBINE)
        elif item < end_o:
            if DIRECT:
                before = scratch + _DONE + SPLITS
                need = split_items
            else:
                before = scratch + _DONE + COMBINE
                need = combine_items
            _gemv_tile(
                o_w, attn_ptr, out_ptr, item - end_combine, hidden, HQ * DV, before, need,
                BLOCK_N, BLOCK_K, True, PDL, SPIN_NS, GEMV_DOT, PRECISION,
            )  # fmt: skip
            _release(scratch + _DONE + OUT)
        elif item < end_gate:
            pdl.start(PDL)
            _wait_for(scratch + _DONE + OUT, o_tiles, SPIN_NS)
            rms_norm_gate_program(
                item * 0, item - end_o, out_ptr, res_ptr, res_out_ptr, post_norm_w, h2_ptr, gate_w,
                logits_ptr, 0, 0, 0, hidden, eps, 0, out_ptr, out_ptr, 0, num_experts, hidden,
                0, False, False, NORM_BLOCK, GATE_BLOCK,
            )  # fmt: skip
            _release(scratch + _DONE + GATE)
        elif item < end_up:
            # Pairs fastest, as the gate-up launch's grid: the chosen experts' same columns.
            pdl.start(PDL)
            _wait_for(scratch + _DONE + GATE, gate_items, SPIN_NS)
            small_gate_up_program(
                (item - end_gate) % TOP_K, (item - end_gate) // TOP_K, h2_ptr, w13, topk_ids,
                act_ptr, logits_ptr, topk_w, logits_ptr, num_experts, num_experts, hidden, inter,
                0, 0, stride_we13, stride_wn13, 1.0, TOP_K, K_POW2, E_POW2, ROUTE, RENORMALIZE,
                1, 1, 1, 0, 1, 1, UP_BLOCK_N, UP_BLOCK_K, False, PRECISION,
            )  # fmt: skip
            _release(scratch + _DONE + UP)
        else:
            pdl.start(PDL)
            _wait_for(scratch + _DONE + UP, up_items, SPIN_NS)
            small_down_combine_program(
                item * 0, item - end_up, act_ptr, w2, topk_w, topk_ids, moe_out_ptr, num_experts,
                hidden, inter, stride_we2, stride_wn2, TOP_K, K_POW2, DOWN_BLOCK_N,
                DOWN_BLOCK_K,
            )  # fmt: skip
            _release(scratch + _DONE + DOWN)
        item = following
    finished = tl.atomic_add(scratch + _FINISHED, 1, sem="acq_rel")
    if finished == tl.num_programs(0) - 1:
        slots = tl.arange(0, SCRATCH)
        tl.store(scratch + slots, tl.zeros([SCRATCH], dtype=tl.int32))


# The launch's warps. On the GPU the warps set a reduction's order (the norms' sums of
# squares), so it gives the same bytes as the kernels it replaces only at the same warps.
WARPS = 4
# The experts' tiles: the small path's, with the down products' K step at 64, not 256 (the one
# kernel holds the registers of its largest item, and on sm_90 a [8 pairs, 8, 256] float32
# tile took it past 255 registers into spills; at 64 it compiles at 215 without).
MOE_TILES = SmallBatchTiles(down_k=64)
# Software-pipeline stages of the split items' loop: on sm_90 one keeps the attention half at
# 161-164 registers (three programs an SM); three take 184 and 39 KB of shared memory.
NUM_STAGES = 1
# Dense products' tiles: rows a tile, and the K step (bench.persistent_chain's GEMV tile).
BLOCK_N = 8
BLOCK_K = 512
SCRATCH_SIZE = int(SCRATCH)  # a launch's counters, for the host


@dataclass(frozen=True)
class Attention:
    """A layer's attention half: the input norm's weight, the fused QKV `[Hq + 2 Hkv) * D, H]`
    and O `[H, Hq * D]` weights (no biases), the q/k norms' weights where each head is
    RMS-normalised (Qwen3), its KV cache `[slots, Hkv, D]` each."""

    norm_w: torch.Tensor
    qkv_w: torch.Tensor
    o_w: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    num_heads: int
    eps: float
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    qk_eps: float = 0.0


@dataclass(frozen=True)
class Experts:
    """A layer's MoE half (softmax top-k routing, Qwen3-MoE's): the norm before it, the
    router `[E, H]` (its dtype the logits'), w13 `[E, 2I, H]` and w2 `[E, H, I]`."""

    post_norm_w: torch.Tensor
    gate_w: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    top_k: int
    renormalize: bool


@dataclass(frozen=True)
class Step:
    """What every layer of a batch-1 decode step shares: the sequence's page-table row
    (`rows` `[1]`), its context length with the new token (`seq_lens` `[1]` int32), the new
    token's position and cache slot (`[1]` each; a slot < 0 writes nothing), the float32 RoPE
    tables `[max_position, D]`, and the decode splits a sequence (`attention.decode_splits`)."""

    page_table: torch.Tensor
    rows: torch.Tensor
    seq_lens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool
    page_size: int
    num_splits: int


def decode_layer(
    x: torch.Tensor,
    residual: torch.Tensor,
    attn: Attention,
    step: Step,
    scratch: torch.Tensor,
    programs: int,
    experts: Experts | None = None,
    residual_out: torch.Tensor | None = None,
    spin_ns: int = 0,
    num_stages: int = NUM_STAGES,
    tiles: SmallBatchTiles = MOE_TILES,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    gemv_dot: bool = False,
) -> torch.Tensor:
    """One layer of a batch-1 decode step in one launch: `residual += x` in place (`[1, H]`
    each), the attention half on its norm; with `experts` the MoE half too, on the norm of
    `residual + O's output`, which goes to `residual_out` (`residual` is read by every gate
    item, so it cannot be written in place). Returns the layer's output `[1, H]`: O's without
    `experts`, else the experts' weighted sum. `scratch` (`[SCRATCH_SIZE]` int32, zero, left
    zero) must not be shared with the launch before; `programs` is the grid. `tiles`: the
    experts' (the small path's tiles, as `fused_moe_small` launches them); `block_n`,
    `block_k`: the dense products' GEMV tiles, on the tensor cores with `gemv_dot` (their loads
    pipelined `num_stages` deep, as the split items' are)."""
    hidden = x.shape[-1]
    n_qkv, _ = attn.qkv_w.shape
    heads, kv_heads, dim = attn.num_heads, attn.k_cache.shape[1], attn.k_cache.shape[2]
    if n_qkv != (heads + 2 * kv_heads) * dim or attn.o_w.shape != (hidden, heads * dim):
        raise ValueError(f"QKV {tuple(attn.qkv_w.shape)} and O {tuple(attn.o_w.shape)} do not "
                         f"fit {heads} heads of {dim} over {kv_heads} KV heads")  # fmt: skip
    if experts is not None and residual_out is None:
        raise ValueError("the MoE half writes the residual stream to residual_out")
    dev, dt = x.device, x.dtype
    splits = step.num_splits
    split_tiles = default_tiles(splits)
    h = torch.empty(1, hidden, dtype=dt, device=dev)
    qkv = torch.empty(1, n_qkv, dtype=dt, device=dev)
    q_rot = torch.empty(1, heads, dim, dtype=dt, device=dev)
    part_o = torch.empty(1, heads, splits, dim, dtype=torch.float32, device=dev)
    part_lse = torch.empty(1, heads, splits, dtype=torch.float32, device=dev)
    attn_out = torch.empty(1, heads, dim, dtype=dt, device=dev)
    o_out = torch.empty(1, hidden, dtype=dt, device=dev)
    if experts is not None:
        num_experts, two_inter, _ = experts.w13.shape
        inter, top_k = two_inter // 2, experts.top_k
        h2 = torch.empty(1, hidden, dtype=dt, device=dev)
        logits = torch.empty(1, num_experts, dtype=experts.gate_w.dtype, device=dev)
        act = torch.empty(top_k, inter, dtype=dt, device=dev)
        topk_ids = torch.empty(1, top_k, dtype=torch.int64, device=dev)
        topk_w = torch.empty(1, top_k, dtype=logits.dtype, device=dev)
        moe_out = torch.empty(1, hidden, dtype=dt, device=dev)
        w13, w2, gate_w, post_w = experts.w13, experts.w2, experts.gate_w, experts.post_norm_w
        res_out = residual_out
    else:
        num_experts, inter, top_k = 0, 0, 1
        h2 = logits = act = topk_w = moe_out = res_out = h  # placeholders, never read
        topk_ids = torch.empty(1, 1, dtype=torch.int64, device=dev)
        w13 = w2 = h.view(1, 1, -1)
        gate_w = post_w = h
    assert res_out is not None
    k_pow2 = triton.next_power_of_2(top_k)
    q_norm = attn.q_norm if attn.q_norm is not None else step.cos
    k_norm = attn.k_norm if attn.k_norm is not None else step.cos
    decode_layer_kernel[(programs,)](
        x, residual, attn.norm_w, h, attn.eps, hidden,
        attn.qkv_w, qkv, n_qkv,
        q_rot, attn.k_cache, attn.v_cache, step.page_table, step.rows, step.seq_lens,
        part_o, part_lse, attn_out, dim**-0.5 * LOG2E,
        attn.k_cache.stride(0), attn.k_cache.stride(1),
        attn.v_cache.stride(0), attn.v_cache.stride(1), step.page_table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        step.positions, step.slots, step.cos, step.sin, q_norm, k_norm,
        attn.qk_eps, step.cos.stride(0), splits,
        attn.o_w, o_out,
        post_w, res_out, h2, gate_w, logits, w13, w2, act, topk_ids, topk_w, moe_out,
        num_experts, inter, w13.stride(0), w13.stride(1), w2.stride(0), w2.stride(1),
        scratch,
        HQ=heads, HKV=kv_heads,
        GROUP_PAD=max(16, triton.next_power_of_2(heads // kv_heads)),
        DK=dim, DV=dim, BLOCK_DK=triton.next_power_of_2(dim),
        BLOCK_DV=triton.next_power_of_2(dim), BLOCK_HALF=triton.next_power_of_2(dim // 2),
        PAGE_SIZE=step.page_size, SPLIT_BLOCK_N=split_tiles.block_n,
        NORM_BLOCK=triton.next_power_of_2(hidden), BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=dot_precision(x), INTERLEAVED=step.interleaved,
        QK_NORM=attn.q_norm is not None, DIRECT=splits == 1, MOE=experts is not None,
        GATE_BLOCK=GATE_BLOCK_E, TOP_K=top_k, K_POW2=k_pow2,
        E_POW2=triton.next_power_of_2(max(1, num_experts)), ROUTE=ROUTE_SOFTMAX,
        RENORMALIZE=experts is not None and experts.renormalize,
        UP_BLOCK_N=tiles.gate_up_n, UP_BLOCK_K=tiles.gate_up_k, DOWN_BLOCK_N=tiles.down_n,
        DOWN_BLOCK_K=down_block_k(tiles, k_pow2, x.element_size()),
        SPIN_NS=spin_ns, GEMV_DOT=gemv_dot, num_warps=WARPS, num_stages=num_stages,
        SPLIT_SHORT_N=split_tiles.short_n, SPLIT_SHORT_MAX=split_tiles.short_max,
        SPLIT_MIN_TILES=split_tiles.min_split_tiles,
        **pdl.launch_args(x),
    )  # fmt: skip
    return moe_out if experts is not None else o_out
