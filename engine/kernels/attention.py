"""Paged attention in Triton: the KV write, flash-decoding and extend (prefill) attention.

The cache is the engine's paged pool seen as slots: `k_cache` `[num_slots, Hkv, Dk]`,
`v_cache` `[num_slots, Hkv, Dv]`, slot = page * page_size + offset. A sequence's pages are
row `rows[b]` of the `page_table` `[R, W]` (int32), so a step passes row indices, not tables.

- `store_kv`: one program per new token writes its K and V rows (slot < 0: skipped, which is
  how padded graph entries write nothing).
- `decode_attention`: one query per sequence. Grid `(B, Hkv, splits)`: each program reads its
  share of the context once for all the query heads of its KV group (GQA), keeps an online
  softmax, and writes a partial output and log-sum-exp; a second kernel combines the splits.
  Split lengths come from each sequence's length on the device, so one launch shape serves
  every step (CUDA-graph safe).
- `extend_attention`: queries of new tokens over their sequence's whole context (cached
  prefix plus the new tokens, already written by `store_kv`), causal, variable lengths without
  padding: the host lists the `(sequence, first query)` of every query block.

Softmax runs in float32 in the log2 domain (scores scaled by `scale * log2(e)`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from engine.config import decode_splits_from_env, decode_tiles_from_env
from engine.kernels import pdl

# The sequence's length and page-table row before the PDL wait where METADATA_BEFORE_WAIT
# (`fused`'s switch; read here by its bare name, as Triton's cache key needs).
from engine.kernels.fused import METADATA_BEFORE_WAIT, _rotate_head, rotate_group
from engine.kernels.sms import H200_SHARED_MEMORY, H200_SMS, shared_memory

LOG2E = 1.4426950408889634


def dot_precision(q: torch.Tensor) -> str:
    """tl.dot's input precision: exact in float32 (the reference runs that the engine is
    token-exact against), the tensor cores' own for 16-bit inputs."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def online_softmax_step(s, v, m, l_sum, acc, PRECISION: tl.constexpr):
    """One key tile of a flash-attention loop, shared by every attention kernel here.

    `s` `[M, N]` are the tile's scores in the log2 domain (masked keys -inf; every row must
    have seen a finite score by its first tile), `v` `[N, DV]` its values; `m` `[M]` is the
    running maximum, `l_sum` `[M]` the running sum of exponentials and `acc` `[M, DV]` the
    float32 unnormalised output. Returns the updated `(m, l_sum, acc)`; the output is
    `acc / l_sum` and the log-sum-exp (log2) `m + log2(l_sum)`.
    """
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    stride_k,
    stride_v,
    stride_kc,
    stride_vc,
    K_WIDTH: tl.constexpr,
    V_WIDTH: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        ok = tl.arange(0, BLOCK_K)
        kv = tl.load(k_ptr + t.to(tl.int64) * stride_k + ok, mask=ok < K_WIDTH)
        tl.store(k_cache_ptr + slot * stride_kc + ok, kv, mask=ok < K_WIDTH)
        ov = tl.arange(0, BLOCK_V)
        vv = tl.load(v_ptr + t.to(tl.int64) * stride_v + ov, mask=ov < V_WIDTH)
        tl.store(v_cache_ptr + slot * stride_vc + ov, vv, mask=ov < V_WIDTH)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` `[T, H, D]` with each token's `H * D` values contiguous (a row stride is allowed)."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x
    return x.contiguous()


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write `k` `[T, Hkv, Dk]` and `v` `[T, Hkv, Dv]` into the cache slots `slots` `[T]`."""
    t = k.shape[0]
    if t == 0:
        return
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    kw, vw = k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]
    _store_kv_kernel[(t,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        v.stride(0),
        k_cache.stride(0),
        v_cache.stride(0),
        K_WIDTH=kw,
        V_WIDTH=vw,
        BLOCK_K=triton.next_power_of_2(kw),
        BLOCK_V=triton.next_power_of_2(vw),
    )


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    rows_ptr,
    seq_lens_ptr,
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    scale,
    stride_qb,
    stride_qh,
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
    stride_outb,
    stride_outh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    num_splits,
    rope_q_ptr,
    rope_k_ptr,
    rope_v_ptr,
    pos_ptr,
    slots_ptr,
    cos_ptr,
    sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    eps,
    stride_rqb,
    stride_rqh,
    stride_rkb,
    stride_rkh,
    stride_rvb,
    stride_rvh,
    stride_rope,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
    ROPE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
    SHORT_N: tl.constexpr,
    SHORT_MAX: tl.constexpr,
    MIN_TILES: tl.constexpr,
):
    decode_split_program(
        tl.program_id(0), tl.program_id(1), tl.program_id(2),
        q_ptr, k_ptr, v_ptr, table_ptr, rows_ptr, seq_lens_ptr, part_o_ptr, part_lse_ptr, out_ptr,
        scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_table,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh, GROUP,
        GROUP_PAD, DK, DV, BLOCK_DK, BLOCK_DV, PAGE_SIZE, BLOCK_N, num_splits, rope_q_ptr,
        rope_k_ptr, rope_v_ptr, pos_ptr, slots_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, eps,
        stride_rqb, stride_rqh, stride_rkb, stride_rkh, stride_rvb, stride_rvh, stride_rope,
        PRECISION, DIRECT, ROPE, HALF, BLOCK_HALF, INTERLEAVED, NORM, PDL, SHORT_N, SHORT_MAX,
        MIN_TILES,
    )  # fmt: skip


@triton.jit
def wait_before_metadata(PDL: tl.constexpr):
    """A decode attention program's first step: `pdl.trigger_early`, then its PDL wait unless
    `METADATA_BEFORE_WAIT` (then `wait_after_metadata` waits)."""
    pdl.trigger_early(PDL)
    if not METADATA_BEFORE_WAIT:
        pdl.wait(PDL)


@triton.jit
def wait_after_metadata(PDL: tl.constexpr):
    """The PDL wait after the metadata's loads, where `METADATA_BEFORE_WAIT`."""
    if METADATA_BEFORE_WAIT:
        pdl.wait(PDL)


@triton.jit
def split_length(seq_len, num_splits, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr):
    """Keys in each of a sequence's `num_splits` ranges (the last takes the rest): whole tiles
    of `BLOCK_N`, at least `MIN_TILES` of them. The split and combine programs both read it."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N), MIN_TILES) * BLOCK_N


@triton.jit
def _attend_keys(
    q, start, end, table_row, k_ptr, v_ptr, kvh, stride_ks, stride_kh, stride_vs, stride_vh,
    scale, dk, dv, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Keys `[start, end)` of one page-table row for a KV group's queries `q` `[G, DK]`, in
    tiles of `BLOCK_N`: the online softmax's `(m, l_sum, acc)`."""
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_DV], tl.float32)
    # (Reading each tile's pages a tile ahead lets Triton buffer the K and V copies
    # `num_stages - 1` deep instead of once. On the H100 it lost at 64 x 128 and 256 x 512
    # with every tile tried (16.3 against 15.3 µs at 64 x 128 with 32-key tiles) and at 64
    # x 2,048 with four of six: bench/NOTES.md, the thirty-second session.)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < end
        page = tl.load(table_row + offs // PAGE_SIZE, mask=ok, other=0)
        slot = page.to(tl.int64) * PAGE_SIZE + offs % PAGE_SIZE  # [N]
        k = tl.load(
            k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + dk[None, :],
            mask=ok[:, None] & (dk[None, :] < DK),
            other=0.0,
        )  # [N, DK]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, N]
        s = tl.where(ok[None, :], s, float("-inf"))
        v = tl.load(
            v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + dv[None, :],
            mask=ok[:, None] & (dv[None, :] < DV),
            other=0.0,
        )  # [N, DV]
        m, l_sum, acc = online_softmax_step(s, v, m, l_sum, acc, PRECISION)
    return m, l_sum, acc


@triton.jit
def decode_split_program(
    b,
    kvh,
    split,
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    rows_ptr,
    seq_lens_ptr,
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    scale,
    stride_qb,
    stride_qh,
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
    stride_outb,
    stride_outh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    num_splits,
    rope_q_ptr,  # ROPE: the new tokens' q [B, Hq, DK] before RoPE (any strides but the last)
    rope_k_ptr,  # ROPE: their k [B, Hkv, DK] before RoPE
    rope_v_ptr,  # ROPE: their v [B, Hkv, DV]
    pos_ptr,  # ROPE: their positions [B]
    slots_ptr,  # ROPE: their cache slots [B] (< 0: a padded entry, nothing written)
    cos_ptr,  # ROPE: float32 tables [max_position, DK]
    sin_ptr,
    q_norm_ptr,  # ROPE with NORM: the q and k heads' RMSNorm weights (Qwen3)
    k_norm_ptr,
    eps,
    stride_rqb,
    stride_rqh,
    stride_rkb,
    stride_rkh,
    stride_rvb,
    stride_rvh,
    stride_rope,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
    ROPE: tl.constexpr,  # `decode_attention` of a `DecodeRope`: RoPE and the KV write in
    HALF: tl.constexpr,  # ROPE: DK // 2, and a power of two >= it
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr = 0,
    SHORT_N: tl.constexpr = 0,
    SHORT_MAX: tl.constexpr = 0,
    MIN_TILES: tl.constexpr = 1,
):
    """Program `(b, kvh, split)` of `decode_attention`'s split launch (also run by the
    persistent decode layer's items in bench.persistent_kernel). It waits for the kernel
    before it before its first load, or after reading its metadata where
    `METADATA_BEFORE_WAIT`."""
    wait_before_metadata(PDL)
    # DIRECT (one split): the output itself, normalised, instead of a partial to combine.
    seq_len = tl.load(seq_lens_ptr + b)
    row = tl.load(rows_ptr + b).to(tl.int64)
    split_len = split_length(seq_len, num_splits, BLOCK_N, MIN_TILES)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    table_row = table_ptr + row * stride_table
    wait_after_metadata(PDL)
    # With ROPE and a head of two power-of-two halves, the group's rotated queries stay in
    # registers (`fused.rotate_group`: one round of loads for the group); otherwise they go
    # through q_ptr.
    QUERY_IN_REGS: tl.constexpr = ROPE and HALF == BLOCK_HALF and BLOCK_DK == 2 * HALF
    if start < end:
        if ROPE:
            # What `fused.rope_store_kv` would have done for this KV group, by its own code:
            # every split's program rotates the group's query heads (into q_ptr, the same
            # bytes from each, which each then reads back, or in registers), and the program
            # whose split ends the context writes the new key and value into their slot,
            # which its own loop then reads. The barrier makes this program's stores visible
            # to its threads.
            pos = tl.load(pos_ptr + b).to(tl.int64)
            if not QUERY_IN_REGS:
                for g in tl.static_range(GROUP):
                    head = kvh * GROUP + g
                    _rotate_head(
                        rope_q_ptr + b * stride_rqb + head * stride_rqh,
                        q_ptr + b * stride_qb + head * stride_qh,
                        pos, cos_ptr, sin_ptr, stride_rope, HALF, BLOCK_HALF, INTERLEAVED,
                        q_norm_ptr, eps, NORM,
                    )  # fmt: skip
            new_slot = tl.load(slots_ptr + b).to(tl.int64)
            if (end == seq_len) & (new_slot >= 0):
                _rotate_head(
                    rope_k_ptr + b * stride_rkb + kvh * stride_rkh,
                    k_ptr + new_slot * stride_ks + kvh * stride_kh,
                    pos, cos_ptr, sin_ptr, stride_rope, HALF, BLOCK_HALF, INTERLEAVED,
                    k_norm_ptr, eps, NORM,
                )  # fmt: skip
                j = tl.arange(0, BLOCK_DV)
                v_new = tl.load(rope_v_ptr + b * stride_rvb + kvh * stride_rvh + j, mask=j < DV)
                tl.store(v_ptr + new_slot * stride_vs + kvh * stride_vh + j, v_new, mask=j < DV)
            tl.debug_barrier()
        heads = kvh * GROUP + tl.arange(0, GROUP_PAD)  # [G]
        head_ok = tl.arange(0, GROUP_PAD) < GROUP
        dk = tl.arange(0, BLOCK_DK)
        dv = tl.arange(0, BLOCK_DV)
        if QUERY_IN_REGS:
            q = rotate_group(
                rope_q_ptr + b * stride_rqb + kvh * GROUP * stride_rqh, stride_rqh, GROUP,
                GROUP_PAD, pos, cos_ptr, sin_ptr, stride_rope, HALF, INTERLEAVED, q_norm_ptr,
                eps, NORM,
            )  # fmt: skip  # [G, DK]
        else:
            q = tl.load(
                q_ptr + b * stride_qb + heads[:, None] * stride_qh + dk[None, :],
                mask=head_ok[:, None] & (dk[None, :] < DK),
                other=0.0,
            )  # [G, DK]
        if SHORT_N > 0:
            if end - start <= SHORT_MAX:
                m, l_sum, acc = _attend_keys(
                    q, start, end, table_row, k_ptr, v_ptr, kvh, stride_ks, stride_kh,
                    stride_vs, stride_vh, scale, dk, dv, DK, DV, BLOCK_DV, GROUP_PAD, PAGE_SIZE,
                    SHORT_N, PRECISION,
                )  # fmt: skip
            else:
                m, l_sum, acc = _attend_keys(
                    q, start, end, table_row, k_ptr, v_ptr, kvh, stride_ks, stride_kh,
                    stride_vs, stride_vh, scale, dk, dv, DK, DV, BLOCK_DV, GROUP_PAD, PAGE_SIZE,
                    BLOCK_N, PRECISION,
                )  # fmt: skip
        else:
            m, l_sum, acc = _attend_keys(
                q, start, end, table_row, k_ptr, v_ptr, kvh, stride_ks, stride_kh, stride_vs,
                stride_vh, scale, dk, dv, DK, DV, BLOCK_DV, GROUP_PAD, PAGE_SIZE, BLOCK_N,
                PRECISION,
            )  # fmt: skip
        out = acc / l_sum[:, None]
        if DIRECT:
            tl.store(
                out_ptr + b * stride_outb + heads[:, None] * stride_outh + dv[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=head_ok[:, None] & (dv[None, :] < DV),
            )
        else:
            tl.store(
                part_o_ptr
                + b * stride_ob
                + heads[:, None] * stride_oh
                + split * stride_os
                + dv[None, :],
                out,
                mask=head_ok[:, None] & (dv[None, :] < DV),
            )
            tl.store(
                part_lse_ptr + b * stride_lb + heads * stride_lh + split,
                m + tl.log2(l_sum),
                mask=head_ok,
            )


@triton.jit
def _decode_combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_outb,
    stride_outh,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    num_splits,
    PDL: tl.constexpr,
    MIN_TILES: tl.constexpr,
):
    decode_combine_program(
        tl.program_id(0), tl.program_id(1), part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
        DV, BLOCK_DV, BLOCK_N, num_splits, PDL, MIN_TILES,
    )  # fmt: skip


@triton.jit
def decode_combine_program(
    b, h, part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_outb, stride_outh, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, num_splits, PDL: tl.constexpr = 0, MIN_TILES: tl.constexpr = 1,
):  # fmt: skip
    """Program `(b, h)` of `decode_attention`'s combine launch: head h of sequence b's output
    from its splits' partials. Its PDL wait comes before the length's load, or after it where
    `METADATA_BEFORE_WAIT` (the partials, which the split launch writes, after it either
    way)."""
    wait_before_metadata(PDL)
    seq_len = tl.load(seq_lens_ptr + b)
    wait_after_metadata(PDL)
    split_len = split_length(seq_len, num_splits, BLOCK_N, MIN_TILES)
    dv = tl.arange(0, BLOCK_DV)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for split in range(num_splits):
        if split * split_len < seq_len:
            lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + split)
            o = tl.load(
                part_o_ptr + b * stride_ob + h * stride_oh + split * stride_os + dv,
                mask=dv < DV,
                other=0.0,
            )
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + o * w
            total = total * alpha + w
            m = m_new
    tl.store(
        out_ptr + b * stride_outb + h * stride_outh + dv,
        (acc / total).to(out_ptr.dtype.element_ty),
        mask=dv < DV,
    )


def decode_splits(
    batch_size: int,
    num_kv_heads: int,
    max_seq_len: int,
    block_n: int,
    num_sms: int = H200_SMS,
    max_splits: int = 64,
) -> int:
    """Context splits per (sequence, KV head): enough programs to fill the device (about two
    a SM, `num_sms`: `sms.sm_count`), no split shorter than a block. A pure function of its
    inputs, so a graph captured with it stays valid for any lengths up to `max_seq_len`. An
    empty batch (an idle expert-parallel rank's step) launches nothing: one."""
    programs = batch_size * num_kv_heads
    if programs == 0:
        return 1
    want = max(1, -(-2 * num_sms // programs))
    return max(1, min(want, max_splits, -(-max_seq_len // block_n)))


DECODE_BLOCK_N = 64


@dataclass(frozen=True)
class DecodeTiles:
    """The decode split kernel's launch: keys per tile (a power of two, 16 or more; give
    `decode_splits` the same), warps and software-pipeline stages; and, where `short_n` is
    set, a second loop in the same program that takes a range of at most `short_max` keys in
    tiles of `short_n` (fewer keys than `block_n`), chosen per sequence on the device. The two
    loops share their shared memory: the kernel's registers and shared memory are the long
    loop's (sm_90, Triton 3.9: 91 against 93 registers, 39 KB either way)."""

    block_n: int = DECODE_BLOCK_N
    num_warps: int = 4
    num_stages: int = 2
    short_n: int = 0
    short_max: int = 0
    min_split_tiles: int = 1  # each of several splits at least this many tiles (`split_rule`)

    def __post_init__(self) -> None:
        if self.short_n and not (16 <= self.short_n < self.block_n and self.short_max > 0):
            raise ValueError(f"short tiles need 16 <= short_n < block_n and short_max > 0: {self}")
        if self.min_split_tiles < 1:
            raise ValueError(f"min_split_tiles must be 1 or more: {self}")


@functools.cache
def one_split_tiles() -> DecodeTiles | None:
    """`PDSERVE_DECODE_TILES`'s tiles (`config.decode_tiles_from_env`) for a step that takes
    one split, read once; None: the default. (On the H100, 32-key tiles took 15.3 against 17.8
    µs at 64 x 128 alone, and in the engine 0.03-0.08 ms off steps at 128-token contexts and
    0.05 ms onto 64 x 2,048: a graph serves every context. The default, `ONE_SPLIT_TILES`,
    takes the smaller tiles for short ranges only.)"""
    tiles = decode_tiles_from_env()
    return None if tiles is None else DecodeTiles(*tiles)


# One split's launch: 64-key tiles at 3 stages (4-5% faster than 2 on the H200 at 64 x 128 and
# 256 x 512), and ranges of at most 256 keys in 32-key tiles. On the thirty-third session's H100
# (`session.sh b50`): 64 x 144 17.4 against 20.8 µs, 64 x 2,048 and 256 x 512 level with 64-key
# tiles alone (within 1 µs of 176 and 181), and in the engine Llama-3-8B's 64 x 128 6.36 / 6.35
# against 6.40 / 6.42 ms, 64 x 2,048 and 256 x 512 level. (32-key tiles throughout gained as much
# at short contexts and lost 0.05 ms at 64 x 2,048.)
ONE_SPLIT_TILES = DecodeTiles(num_stages=3, short_n=32, short_max=256)


@functools.cache
def split_rule() -> tuple[int, int]:
    """The engine's split rule: at most this many splits a (sequence, KV head)
    (`decode_splits`'s `max_splits`) and, where a step takes several, each at least this many
    key tiles (`DecodeTiles.min_split_tiles`, applied on the device to each sequence's own
    length). 64 and 1 unless `PDSERVE_DECODE_SPLITS` sets them (`config.decode_splits_from_env`),
    for an A/B. At batch 1 the graphs' count (33 for 8 KV heads, 64 for 4) timed slower than 16
    at 144 and 2,048 tokens on an H100, kernel alone (the thirty-third session), but faster at
    8,192 (19.4 against 21.0 µs), and a Qwen3-30B-A3B step with 16 took 2.91 against 2.93 ms at
    128 tokens and 3.26 against 3.17 at 2,048 (the thirty-fourth; bench/NOTES.md): kept."""
    return decode_splits_from_env() or (64, 1)


def default_tiles(num_splits: int) -> DecodeTiles:
    """The engine's split-kernel launch for `num_splits` ranges: `ONE_SPLIT_TILES` for one (or
    `one_split_tiles()` where set), 64-key tiles at 2 stages for several. (The split count,
    `decode_splits`, is the 64-key tiles' either way.)"""
    if num_splits == 1:
        return one_split_tiles() or ONE_SPLIT_TILES
    return DecodeTiles(num_stages=2, min_split_tiles=split_rule()[1])


@dataclass(frozen=True)
class DecodeRope:
    """A decode step's new tokens before RoPE, for `decode_attention`: q `[B, Hq, DK]`,
    k `[B, Hkv, DK]`, v `[B, Hkv, DV]` (any strides but the last), their positions and cache
    slots `[B]`, the float32 tables `[max_position, DK]`, and `qk_norm` `(q weight, k weight,
    eps)` where each head is RMS-normalised first (Qwen3): `fused.rope_store_kv`'s inputs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None


_ROPE_TENSORS = ("rope_q_ptr", "rope_k_ptr", "rope_v_ptr", "pos_ptr", "slots_ptr", "cos_ptr",
                 "sin_ptr", "q_norm_ptr", "k_norm_ptr")  # fmt: skip
_ROPE_STRIDES = ("stride_rqb", "stride_rqh", "stride_rkb", "stride_rkh", "stride_rvb",
                 "stride_rvh", "stride_rope")  # fmt: skip


def _rope_args(rope: DecodeRope | None, q: torch.Tensor) -> dict[str, object]:
    """The split kernel's ROPE arguments by name (placeholders without it)."""
    if rope is None:
        return {**dict.fromkeys(_ROPE_TENSORS, q), **dict.fromkeys(_ROPE_STRIDES, 0), "eps": 0.0}
    q_w, k_w, eps = rope.qk_norm if rope.qk_norm is not None else (rope.cos, rope.cos, 0.0)
    tensors = (rope.q, rope.k, rope.v, rope.positions, rope.slots, rope.cos, rope.sin, q_w, k_w)
    strides = (rope.q.stride(0), rope.q.stride(1), rope.k.stride(0), rope.k.stride(1),
               rope.v.stride(0), rope.v.stride(1), rope.cos.stride(0))  # fmt: skip
    return {
        **dict(zip(_ROPE_TENSORS, tensors, strict=True)),
        **dict(zip(_ROPE_STRIDES, strides, strict=True)),
        "eps": eps,
    }


def decode_attention(
    q: torch.Tensor | DecodeRope,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    tiles: DecodeTiles | None = None,
) -> torch.Tensor:
    """One new query per sequence: `q` `[B, Hq, Dk]` over the first `seq_lens[b]` tokens of
    page-table row `rows[b]`; returns `[B, Hq, Dv]` in `q`'s dtype. `q` may instead be a
    `DecodeRope` of the new tokens before RoPE: then the kernel does what `fused.rope_store_kv`
    would first have done (the same code: the same results bit for bit, but for Qwen3's q/k
    norms' sums of squares, which this kernel's warps reduce in another order than
    `rope_store_kv`'s one warp on the GPU), one launch fewer;
    `seq_lens` count the new token. `tiles`: the split
    kernel's launch (default `default_tiles(num_splits)`: for one split 3 stages and short
    ranges in 32-key tiles, `ONE_SPLIT_TILES`; 2 stages for the many short splits of batch 1,
    where 3 were 2-3% slower; bench.attention_kernel compares others). The combine is its own
    launch: the last split combining instead (an atomic count per sequence and KV head)
    measured no faster on the H200 (equal at 1x128 and 16x128, 41% slower at 1x2,048) and
    was taken out. (Asking L2 for the O projection's weight from here, before the PDL wait,
    measured slower on the H200: bench/NOTES.md.)"""
    rope = None
    if isinstance(q, DecodeRope):
        # RoPE and the KV write folded in: each program rotates its group's query heads into
        # `q` (its own copy of the same bytes), and the program whose split ends a sequence's
        # context writes the new key and value into their slot before it reads them.
        rope = q
        if any(t.stride(-1) != 1 for t in (rope.q, rope.k, rope.v)):
            rope = replace(
                rope, q=rope.q.contiguous(), k=rope.k.contiguous(), v=rope.v.contiguous()
            )
        q = torch.empty(rope.q.shape, dtype=rope.q.dtype, device=rope.q.device)
    tiles = tiles or default_tiles(num_splits)
    bsz, num_heads, dk = q.shape
    num_kv_heads, dv = v_cache.shape[1], v_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = q.new_empty(bsz, num_heads, dv)
    if bsz == 0:
        return out
    direct = num_splits == 1  # the split kernel writes the output: no combine launch
    early = pdl.trigger_first(bsz)  # the O projection's weight streams in while these run
    if direct:
        part_o, part_lse = out.new_empty(0, 1, 1), out.new_empty(0, 1)  # not read
    else:
        part_o = torch.empty(bsz, num_heads, num_splits, dv, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(bsz, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_dk, block_dv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    _decode_split_kernel[(bsz, num_kv_heads, num_splits)](
        q, k_cache, v_cache, page_table, rows, seq_lens, part_o, part_lse, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), page_table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        DK=dk,
        DV=dv,
        BLOCK_DK=block_dk,
        BLOCK_DV=block_dv,
        PAGE_SIZE=page_size,
        BLOCK_N=tiles.block_n,
        num_splits=num_splits,
        **_rope_args(rope, q),
        PRECISION=dot_precision(q),
        DIRECT=direct,
        ROPE=rope is not None,
        HALF=dk // 2 if rope is not None else 1,
        BLOCK_HALF=triton.next_power_of_2(dk // 2) if rope is not None else 1,
        INTERLEAVED=rope is not None and rope.interleaved,
        NORM=rope is not None and rope.qk_norm is not None,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        SHORT_N=tiles.short_n,
        SHORT_MAX=tiles.short_max,
        MIN_TILES=tiles.min_split_tiles,
        **pdl.launch_args(q, trigger_first=early),
    )  # fmt: skip
    if direct:
        return out
    _decode_combine_kernel[(bsz, num_heads)](
        part_o,
        part_lse,
        seq_lens,
        out,
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        DV=dv,
        BLOCK_DV=block_dv,
        BLOCK_N=tiles.block_n,
        num_splits=num_splits,
        MIN_TILES=tiles.min_split_tiles,
        num_warps=4 if block_dv >= 256 else 2,
        **pdl.launch_args(q, trigger_first=early),
    )
    return out


@triton.jit
def _extend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    table_ptr,
    rows_ptr,
    prefix_lens_ptr,
    extend_lens_ptr,
    q_starts_ptr,
    block_seq_ptr,
    block_first_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_table,
    GROUP: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Blocks are listed in query order within each sequence, and a block's work grows with its
    # position (causal): the last ones start first, so that no long block is left for the tail.
    blk = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    b = tl.load(block_seq_ptr + blk)
    first = tl.load(block_first_ptr + blk)  # index of the block's first query within sequence b
    prefix = tl.load(prefix_lens_ptr + b)
    ext = tl.load(extend_lens_ptr + b)
    q_start = tl.load(q_starts_ptr + b).to(tl.int64)
    row = tl.load(rows_ptr + b).to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    m_ok = offs_m < ext
    q_pos = prefix + offs_m  # [M] absolute positions
    ni = tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok = dk < DK
    dv_ok = dv < DV
    tok = q_start + offs_m
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + h * stride_qh + dk[None, :],
        mask=m_ok[:, None] & dk_ok[None, :],
        other=0.0,
    )  # [M, DK]
    table_row = table_ptr + row * stride_table
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Keys before the block's first query are seen by every query of the block: whole tiles of
    # them need no mask (the tile loop below masks the rest, the causal diagonal).
    full_end = (prefix + first) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        offs = n0 + ni
        page = tl.load(table_row + offs // PAGE_SIZE)
        slot = page.to(tl.int64) * PAGE_SIZE + offs % PAGE_SIZE
        k = tl.load(
            k_base + slot[:, None] * stride_ks + dk[None, :], mask=dk_ok[None, :], other=0.0
        )  # [N, DK]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [M, N]
        v = tl.load(
            v_base + slot[:, None] * stride_vs + dv[None, :], mask=dv_ok[None, :], other=0.0
        )
        m, l_sum, acc = online_softmax_step(s, v, m, l_sum, acc, PRECISION)
    kv_end = tl.minimum(prefix + first + BLOCK_M, prefix + ext)  # keys the block can see
    for n0 in range(full_end, kv_end, BLOCK_N):
        offs = n0 + ni
        n_ok = offs < kv_end
        page = tl.load(table_row + offs // PAGE_SIZE, mask=n_ok, other=0)
        slot = page.to(tl.int64) * PAGE_SIZE + offs % PAGE_SIZE
        k = tl.load(
            k_base + slot[:, None] * stride_ks + dk[None, :],
            mask=n_ok[:, None] & dk_ok[None, :],
            other=0.0,
        )  # [N, DK]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [M, N]
        # Causal: query at q_pos sees keys 0..q_pos. Key 0 is always visible, so no row is
        # ever fully masked (padded query rows included).
        s = tl.where((offs[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        v = tl.load(
            v_base + slot[:, None] * stride_vs + dv[None, :],
            mask=n_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        m, l_sum, acc = online_softmax_step(s, v, m, l_sum, acc, PRECISION)
    out = acc / l_sum[:, None]
    tl.store(
        out_ptr + tok[:, None] * stride_ot + h * stride_oh + dv[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & dv_ok[None, :],
    )


@dataclass(frozen=True)
class ExtendTiles:
    """The extend kernel's launch: `block_m` queries and `block_n` keys a tile (powers of two,
    16 or more; the query blocks of a step, `extend_blocks`, must use the same `block_m`),
    warps and software-pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Up to this many new tokens in a step's longest sequence, the extend kernel takes the small
# tiles (below).
SHORT_EXTEND = 512


# Float32's 64 x 64 tiles at head dim 128 take 112 KB of shared memory a program (sm_89 and
# sm_90 compiles, `bench.compile_kernels`); 32 x 64 take 88 KB.
EXTEND_FP32_SHARED = 114944


def extend_tiles(
    dk: int,
    dtype: torch.dtype,
    max_extend: int | None = None,
    shared: int = H200_SHARED_MEMORY,
) -> ExtendTiles:
    """The extend kernel's tiles for head dim `dk` in `dtype`, for a step whose longest
    sequence has `max_extend` new tokens (None: long). Swept on the H200 (`python -m
    bench.extend_kernel`, Llama-3-8B's and Qwen3-30B-A3B's heads, page size 16, µs of one
    layer): 128 queries x 128 keys, 8 warps, 3 stages took 910-921 / 1,509 / 684 µs at
    8 x 2,048, 1 x 8,192 and 4 x 1,024 over 3,072 cached (298-364 TFLOP/s; 128 x 64 1,002 /
    1,717 / 774; 64 x 64 with 4 warps 923-936 / 1,653 / 741; the earlier 64 x 64 with 8 warps
    and 2 stages 1,798 / 3,237 / 1,451). Shorter extends take 64 x 64 with 4 warps and 3
    stages: 114-117 µs against 150-153 at 64 x 128, 184 against 209 at 16 x 512. Wider heads and
    float32 (the exact checks only) keep the earlier tiles, float32 with half the queries where
    the device's `shared` memory a program is smaller (an L40S's 99 KB)."""
    if dtype != torch.float32 and dk <= 128:
        if max_extend is not None and max_extend <= SHORT_EXTEND:
            return ExtendTiles(64, 64, 4, 3)
        return ExtendTiles(128, 128, 8, 3)
    if dk <= 128:
        narrow = dtype == torch.float32 and shared < EXTEND_FP32_SHARED
        return ExtendTiles(32 if narrow else 64, 64, 4 if dk <= 64 else 8, 2)
    return ExtendTiles(32, 32, 8, 2)


def extend_blocks(extend_lens: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """`(sequence, first query)` of every `block_m`-query block of a step's new tokens."""
    seqs: list[int] = []
    firsts: list[int] = []
    for b, n in enumerate(extend_lens):
        for first in range(0, n, block_m):
            seqs.append(b)
            firsts.append(first)
    return seqs, firsts


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    rows: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    q_starts: torch.Tensor,
    block_seq: torch.Tensor,
    block_first: torch.Tensor,
    page_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    tiles: ExtendTiles | None = None,
) -> torch.Tensor:
    """New-token queries `q` `[T, Hq, Dk]` (sequence b's at rows `q_starts[b]` onwards) over
    their sequences' cached context, causal; the new tokens' K/V must already be in the cache.
    `block_seq`/`block_first` come from `extend_blocks` with `tiles.block_m` (`tiles` default
    `extend_tiles` for Dk, q's dtype and device). Returns `[T, Hq, Dv]`."""
    t, num_heads, dk = q.shape
    num_kv_heads, dv = v_cache.shape[1], v_cache.shape[2]
    if out is None:
        out = q.new_empty(t, num_heads, dv)
    nblocks = block_seq.shape[0]
    if t == 0 or nblocks == 0:
        return out
    block_dk, block_dv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    tiles = tiles or extend_tiles(dk, q.dtype, shared=shared_memory(q.device))
    _extend_kernel[(nblocks, num_heads)](
        q,
        k_cache,
        v_cache,
        out,
        page_table,
        rows,
        prefix_lens,
        extend_lens,
        q_starts,
        block_seq,
        block_first,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        GROUP=num_heads // num_kv_heads,
        DK=dk,
        DV=dv,
        BLOCK_DK=block_dk,
        BLOCK_DV=block_dv,
        PAGE_SIZE=page_size,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        PRECISION=dot_precision(q),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out
