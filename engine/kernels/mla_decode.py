"""Multi-head latent attention decode in Triton (DeepSeek-V3, Kimi-K2, Moonlight).

The weight-absorbed form of `AttentionBackend.forward_mla`: one query token per sequence with
H heads, each a latent query `q_latent` `[R]` and a rotary query `q_pe` `[P]`, attends over its
sequence's cached latents `c` `[R]` and rotary keys `k_pe` `[P]` (one shared KV "head"):

    out[b, h] = softmax_j(scale * (q_latent[b, h] . c_j + q_pe[b, h] . k_pe_j)) @ c

Flash-decoding: each sequence's context is cut into `num_kv_splits` ranges; a program takes
one range for a block of `block_h` heads, reading each latent tile once for all of them and
using it as both key and value, and writes its partial output with its log-sum-exp. A second
kernel combines the ranges; with one range the split kernel writes the output itself (no
float32 partials written and read back, no second launch). With at most `block_h` heads
(Moonlight's 16) every latent page is read from memory once per step; with more
(DeepSeek-V3's 128) the head blocks of one range are neighbouring programs, so the repeated
reads of a tile mostly come from L2.

Every size depends only on the batch size and `num_kv_splits` (graph capturable); no host sync.
Both kernels take part in programmatic dependent launch (`engine.kernels.pdl`).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, overload

import torch
import triton
import triton.language as tl

from engine.config import mla_decode_tiles_from_env
from engine.kernels import pdl
from engine.kernels.attention import dot_precision, wait_after_metadata, wait_before_metadata
from engine.kernels.sms import H200_SHARED_MEMORY, H200_SMS, shared_memory, sm_count
from engine.layers.pending import PendingCombine

DEFAULT_BLOCK_H = 16


@triton.jit
def mla_decode_split_kernel(
    q_latent,  # [B, H, R]
    q_pe,  # [B, H, P]
    latent_cache,  # [num_pages, page_size, 1, R] (any strides but the last)
    pe_cache,  # [num_pages, page_size, 1, P]
    page_table,  # [rows, max_pages] int
    req_rows,  # [B] int: sequence b's row of page_table (with HAS_ROWS; else row b)
    seq_lens,  # [B] int
    mid_out,  # [B, H, S, R] float32 out: each range's normalised output
    mid_lse,  # [B, H, S] float32 out: each range's log-sum-exp (-inf when empty)
    out,  # [B, H, R] out with DIRECT (one range): the output itself, no partials
    scale,
    num_heads,
    R,
    P,
    page_size,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_ph,
    stride_latent_page,
    stride_latent_slot,
    stride_pe_page,
    stride_pe_slot,
    stride_table,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot's input precision: attention.dot_precision
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    # Head blocks vary fastest in launch order: the programs sharing a range run together.
    head_block, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    table_row, start, end = _range_metadata(
        page_table, req_rows, seq_lens, b, split, stride_table, NUM_SPLITS, HAS_ROWS, BLOCK_N,
        PDL,
    )  # fmt: skip
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    p = tl.arange(0, BLOCK_P)
    p_ok = p < P
    ql = tl.load(
        q_latent + b * stride_qb + heads[:, None] * stride_qh + r[None, :],
        mask=h_ok[:, None] & r_ok[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_R]
    qp = tl.load(
        q_pe + b * stride_pb + heads[:, None] * stride_ph + p[None, :],
        mask=h_ok[:, None] & p_ok[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_P]
    m = tl.full([BLOCK_H], -float("inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        latent_row, pe_row, ok = _tile_rows(
            table_row, n0, end, page_size, stride_latent_page, stride_latent_slot,
            stride_pe_page, stride_pe_slot, BLOCK_N,
        )  # fmt: skip
        c = tl.load(
            latent_cache + latent_row[:, None] + r[None, :],
            mask=ok[:, None] & r_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_R]: the key's latent part and the value
        kp = tl.load(
            pe_cache + pe_row[:, None] + p[None, :],
            mask=ok[:, None] & p_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_P]
        s = tl.dot(ql, tl.trans(c), input_precision=PRECISION)
        s = tl.dot(qp, tl.trans(kp), s, input_precision=PRECISION)
        s = tl.where(ok[None, :], s * scale, -float("inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        prob = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(prob, axis=1)
        acc = tl.dot(prob.to(c.dtype), c, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    if DIRECT:
        # A sequence of length 0 (a padding row of a graph-sized batch) gets zeros.
        result = tl.where(denom[:, None] > 0, acc / tl.maximum(denom, 1e-30)[:, None], 0.0)
        tl.store(
            out + b * stride_ob + heads[:, None] * stride_oh + r[None, :],
            result.to(out.dtype.element_ty),
            mask=h_ok[:, None] & r_ok[None, :],
        )
    else:
        row = (b * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_H] into [B, H, S]
        if end > start:
            tl.store(
                mid_out + row[:, None] * R + r[None, :],
                acc / denom[:, None],
                mask=h_ok[:, None] & r_ok[None, :],
            )
            tl.store(mid_lse + row, m + tl.log(denom), mask=h_ok)
        else:
            tl.store(mid_lse + row, tl.full([BLOCK_H], -float("inf"), tl.float32), mask=h_ok)


@triton.jit
def _range_metadata(
    page_table, req_rows, seq_lens, b, split, stride_table, NUM_SPLITS: tl.constexpr,
    HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """`(table_row, start, end)` of sequence `b`'s range `split`, and the PDL wait: before
    these loads, or after them where `attention.METADATA_BEFORE_WAIT` (nothing in the step's
    kernels writes them)."""
    wait_before_metadata(PDL)
    length = tl.load(seq_lens + b)
    if HAS_ROWS:
        table_row = page_table + tl.load(req_rows + b).to(tl.int64) * stride_table
    else:
        table_row = page_table + b * stride_table
    per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)
    wait_after_metadata(PDL)
    return table_row, start, end


@triton.jit
def _latent_quarter(latent_cache, latent_row, r4, ok, Q: tl.constexpr, R4: tl.constexpr):
    """Quarter `Q` of a latent tile: `[BLOCK_N, R4]` (positions past the range read zeros)."""
    return tl.load(
        latent_cache + latent_row[:, None] + (Q * R4 + r4)[None, :], mask=ok[:, None], other=0.0
    )


@triton.jit
def _tile_rows(
    table_row, n0, end, page_size, stride_latent_page, stride_latent_slot, stride_pe_page,
    stride_pe_slot, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The latent and rope-key cache rows of the tile of positions from `n0` (`[BLOCK_N]`,
    int64) and which positions are before `end`."""
    pos = n0 + tl.arange(0, BLOCK_N)
    ok = pos < end
    page = tl.load(table_row + pos // page_size, mask=ok, other=0).to(tl.int64)
    within = pos % page_size
    latent_row = page * stride_latent_page + within * stride_latent_slot
    return latent_row, page * stride_pe_page + within * stride_pe_slot, ok


@triton.jit
def _quarters_tile(
    latent_cache, pe_cache, latent_row, pe_row, ok, r4, p, p_ok, q0, q1, q2, q3, qp, m, denom,
    acc0, acc1, acc2, acc3, scale, R4: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile of `mla_decode_quarters_kernel`: its four quarters' and rope part's scores,
    the online softmax, and the four accumulators. Returns `(m, denom, acc0..acc3)`."""
    c0 = _latent_quarter(latent_cache, latent_row, r4, ok, 0, R4)
    c1 = _latent_quarter(latent_cache, latent_row, r4, ok, 1, R4)
    c2 = _latent_quarter(latent_cache, latent_row, r4, ok, 2, R4)
    c3 = _latent_quarter(latent_cache, latent_row, r4, ok, 3, R4)
    kp = tl.load(
        pe_cache + pe_row[:, None] + p[None, :], mask=ok[:, None] & p_ok[None, :], other=0.0
    )
    s0 = tl.dot(q0, tl.trans(c0), input_precision=PRECISION)
    s1 = tl.dot(q1, tl.trans(c1), input_precision=PRECISION)
    s2 = tl.dot(q2, tl.trans(c2), input_precision=PRECISION)
    s3 = tl.dot(q3, tl.trans(c3), input_precision=PRECISION)
    sp = tl.dot(qp, tl.trans(kp), input_precision=PRECISION)
    s = ((s0 + s1) + (s2 + s3)) + sp
    s = tl.where(ok[None, :], s * scale, -float("inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    prob = tl.exp(s - m_new[:, None])
    denom = denom * alpha + tl.sum(prob, axis=1)
    pb = prob.to(c0.dtype)
    acc0 = tl.dot(pb, c0, acc0 * alpha[:, None], input_precision=PRECISION)
    acc1 = tl.dot(pb, c1, acc1 * alpha[:, None], input_precision=PRECISION)
    acc2 = tl.dot(pb, c2, acc2 * alpha[:, None], input_precision=PRECISION)
    acc3 = tl.dot(pb, c3, acc3 * alpha[:, None], input_precision=PRECISION)
    return m_new, denom, acc0, acc1, acc2, acc3


@triton.jit
def mla_decode_quarters_kernel(
    q_latent,  # [B, H, R]
    q_pe,  # [B, H, P]
    latent_cache,  # [num_pages, page_size, 1, R]
    pe_cache,  # [num_pages, page_size, 1, P]
    page_table,
    req_rows,
    seq_lens,
    mid_out,
    mid_lse,
    out,
    scale,
    num_heads,
    R,
    P,
    page_size,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_ph,
    stride_latent_page,
    stride_latent_slot,
    stride_pe_page,
    stride_pe_slot,
    stride_table,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,  # == R, a multiple of 64
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
    AHEAD: tl.constexpr = False,
):
    """`mla_decode_split_kernel` with the latent in four column quarters: the scores are four
    independent products of 128 columns (at R 512) summed, not one chain over all 576, so the
    tensor-core steps of one tile overlap instead of waiting on each other; the output is four
    accumulators. Same loads, same bytes. `AHEAD`: each step reads the next tile's page ids,
    so that the tile's addresses are known a step early and Triton's pipeliner copies the
    tiles into shared memory `num_stages - 1` deep (sm_90, 32-key tiles at 3 stages: 88 KB,
    two buffers; without it one, at any stage count: the tile goes through registers after
    the last tile's products)."""
    head_block, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    table_row, start, end = _range_metadata(
        page_table, req_rows, seq_lens, b, split, stride_table, NUM_SPLITS, HAS_ROWS, BLOCK_N,
        PDL,
    )  # fmt: skip
    R4: tl.constexpr = BLOCK_R // 4
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    r4 = tl.arange(0, R4)
    p = tl.arange(0, BLOCK_P)
    p_ok = p < P
    q_rows = q_latent + b * stride_qb + heads[:, None] * stride_qh
    q0 = tl.load(q_rows + r4[None, :], mask=h_ok[:, None], other=0.0)
    q1 = tl.load(q_rows + (R4 + r4)[None, :], mask=h_ok[:, None], other=0.0)
    q2 = tl.load(q_rows + (2 * R4 + r4)[None, :], mask=h_ok[:, None], other=0.0)
    q3 = tl.load(q_rows + (3 * R4 + r4)[None, :], mask=h_ok[:, None], other=0.0)
    qp = tl.load(
        q_pe + b * stride_pb + heads[:, None] * stride_ph + p[None, :],
        mask=h_ok[:, None] & p_ok[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_H], -float("inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_H, R4], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, R4], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_H, R4], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_H, R4], dtype=tl.float32)
    if AHEAD:
        latent_next, pe_next, ok_next = _tile_rows(
            table_row, start, end, page_size, stride_latent_page, stride_latent_slot,
            stride_pe_page, stride_pe_slot, BLOCK_N,
        )  # fmt: skip
        for n0 in range(start, end, BLOCK_N):
            latent_row, pe_row, ok = latent_next, pe_next, ok_next
            latent_next, pe_next, ok_next = _tile_rows(
                table_row, n0 + BLOCK_N, end, page_size, stride_latent_page,
                stride_latent_slot, stride_pe_page, stride_pe_slot, BLOCK_N,
            )  # fmt: skip
            m, denom, acc0, acc1, acc2, acc3 = _quarters_tile(
                latent_cache, pe_cache, latent_row, pe_row, ok, r4, p, p_ok, q0, q1, q2, q3, qp,
                m, denom, acc0, acc1, acc2, acc3, scale, R4, PRECISION,
            )  # fmt: skip
    else:
        for n0 in range(start, end, BLOCK_N):
            latent_row, pe_row, ok = _tile_rows(
                table_row, n0, end, page_size, stride_latent_page, stride_latent_slot,
                stride_pe_page, stride_pe_slot, BLOCK_N,
            )  # fmt: skip
            m, denom, acc0, acc1, acc2, acc3 = _quarters_tile(
                latent_cache, pe_cache, latent_row, pe_row, ok, r4, p, p_ok, q0, q1, q2, q3, qp,
                m, denom, acc0, acc1, acc2, acc3, scale, R4, PRECISION,
            )  # fmt: skip
    if DIRECT:
        live = denom[:, None] > 0
        inv = 1.0 / tl.maximum(denom, 1e-30)[:, None]
        o_rows = out + b * stride_ob + heads[:, None] * stride_oh
        dt = out.dtype.element_ty
        tl.store(o_rows + r4[None, :], tl.where(live, acc0 * inv, 0.0).to(dt), mask=h_ok[:, None])
        tl.store(
            o_rows + (R4 + r4)[None, :], tl.where(live, acc1 * inv, 0.0).to(dt), mask=h_ok[:, None]
        )
        tl.store(
            o_rows + (2 * R4 + r4)[None, :],
            tl.where(live, acc2 * inv, 0.0).to(dt),
            mask=h_ok[:, None],
        )
        tl.store(
            o_rows + (3 * R4 + r4)[None, :],
            tl.where(live, acc3 * inv, 0.0).to(dt),
            mask=h_ok[:, None],
        )
    else:
        row = (b * num_heads + heads) * NUM_SPLITS + split
        if end > start:
            inv = 1.0 / denom[:, None]
            o_rows = mid_out + row[:, None] * R
            tl.store(o_rows + r4[None, :], acc0 * inv, mask=h_ok[:, None])
            tl.store(o_rows + (R4 + r4)[None, :], acc1 * inv, mask=h_ok[:, None])
            tl.store(o_rows + (2 * R4 + r4)[None, :], acc2 * inv, mask=h_ok[:, None])
            tl.store(o_rows + (3 * R4 + r4)[None, :], acc3 * inv, mask=h_ok[:, None])
            tl.store(mid_lse + row, m + tl.log(denom), mask=h_ok)
        else:
            tl.store(mid_lse + row, tl.full([BLOCK_H], -float("inf"), tl.float32), mask=h_ok)


@triton.jit
def mla_decode_combine_kernel(
    mid_out,  # [B, H, S, R] float32
    mid_lse,  # [B, H, S] float32
    out,  # [B, H, R]
    num_heads,
    R,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    result = combine_columns(mid_out, mid_lse, b, h, num_heads, R, r, r_ok, NUM_SPLITS, BLOCK_S)
    tl.store(out + b * stride_ob + h * stride_oh + r, result.to(out.dtype.element_ty), mask=r_ok)


@triton.jit
def combine_columns(
    mid_out, mid_lse, b, h, num_heads, R, r, r_ok, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr
):  # fmt: skip
    """Head h of sequence b (int64), columns `r` (masked by `r_ok`) of its output, in float32,
    from the ranges' partials: the combine launch's body, also run by the output's absorption
    where it reads the partials itself (`head_bmm.combine_head_bmm`)."""
    # Every range's log-sum-exp, then the live ranges' partial outputs, in two rounds of loads
    # (a loop over the ranges waited on two dependent loads per range). An empty range (-inf:
    # past a short context, whose split kernel exited) weighs nothing and its never-written
    # output is not read (at 16 ranges over 128 tokens, 12 of 16 are empty).
    split = tl.arange(0, BLOCK_S)
    s_ok = split < NUM_SPLITS
    rows = (b * num_heads + h) * NUM_SPLITS + split  # [BLOCK_S] into [B, H, S]
    lse = tl.load(mid_lse + rows, mask=s_ok, other=-float("inf"))
    live = lse > -float("inf")
    part = tl.load(
        mid_out + rows[:, None] * R + r[None, :], mask=live[:, None] & r_ok[None, :], other=0.0
    )  # [BLOCK_S, BLOCK_R]
    m = tl.max(lse, axis=0)
    weight = tl.where(live, tl.exp(lse - tl.where(live, m, 0.0)), 0.0)
    denom = tl.sum(weight, axis=0)
    acc = tl.sum(part * weight[:, None], axis=0)  # empty ranges loaded as zeros
    # A sequence of length 0 (a padding row of a graph-sized batch) gets zeros.
    return tl.where(denom > 0, acc / tl.maximum(denom, 1e-30), 0.0)


def shared_bytes(
    block_h: int, block_n: int, width: int, element_size: int, quarters: bool = True
) -> int:
    """The shared memory a split-kernel program takes, at most: its `block_h` heads' queries
    and one `block_n`-key tile, each `width` (latent rank + rotary dim) wide, and 8 KB of the
    compiler's scratch; the one-chain kernel in a 16-bit type (not `quarters`) holds two key
    tiles (its loads pipelined in two stages). Rank 512 + 64 compiled for sm_89 with the
    launch's aligned pointers and strides (`bench.compile_kernels`), KB: quartered at 64 keys
    86 / 108 / 144 for 16 / 32 / 64 heads; one chain at 32 keys 82 / 100 for 16 / 32 heads in
    bfloat16, 110 for 16 in float32 (73 at 16 keys)."""
    tiles = 2 if element_size < 4 and not quarters else 1
    return (block_h + tiles * block_n) * width * element_size + 8192


def fits(
    block_h: int, block_n: int, width: int, element_size: int, shared: int, quarters: bool = True
) -> bool:
    """Whether a split-kernel program of these tiles fits `shared` bytes (`shared_bytes`)."""
    return shared_bytes(block_h, block_n, width, element_size, quarters) <= shared


def default_block_h(
    dtype: torch.dtype,
    batch: int,
    num_heads: int,
    num_sms: int = H200_SMS,
    shared: int = H200_SHARED_MEMORY,
    width: int = 576,
) -> int:
    """Heads per program for the quartered kernel: the largest of 64, 32 and 16 (not past the
    head count) whose programs, with up to 16 ranges each, still fill the device; 16 in
    float32 (more would spill). Each tile of latents is then read once for that many heads,
    in larger tensor-core products. On the H200 at DeepSeek-V3's 128 heads (`bench.mla_kernel
    --heads 128 --block-h 16/32/64`): batch 64 at 2,048 tokens 414 µs at 16 heads a program,
    291 at 32, 187 at 64; at 128 tokens 32.9 / 25.7 / 18.3; batch 1 (two or four programs a
    range at 64 or 32) 15.7 / 15.3 / 19.1 at 2,048 tokens and 8.4 / 11.0 / 13.4 at 128, where
    this picks 16. Moonlight's 16 heads always take 16. Not past the device's `shared`
    memory a program (`shared_bytes` at 64-key tiles, `width` wide: 16 on an L40S)."""
    if dtype == torch.float32:
        return DEFAULT_BLOCK_H
    for block_h in (64, 32):
        fills = batch * triton.cdiv(num_heads, block_h) * 16 >= num_sms
        if block_h <= num_heads and fills and fits(block_h, 64, width, dtype.itemsize, shared):
            return block_h
    return DEFAULT_BLOCK_H


def default_block_n(
    quarters: bool,
    block_h: int,
    width: int = 576,
    element_size: int = 2,
    shared: int = H200_SHARED_MEMORY,
) -> int:
    """Keys a tile: 64 for the quartered kernel, 32 for one chain, halved (to 16 at least)
    while a program would take more than the device's `shared` memory (`shared_bytes`; float32
    on an L40S takes 16)."""
    block_n = 64 if quarters else 32
    while block_n > 16 and not fits(block_h, block_n, width, element_size, shared, quarters):
        block_n //= 2
    return block_n


def default_num_warps(
    dtype: torch.dtype,
    batch: int,
    num_heads: int,
    num_sms: int = H200_SMS,
    block_h: int = DEFAULT_BLOCK_H,
) -> int:
    """The split kernel's warps. 4 in 16-bit types (about 250 registers a thread, so two
    programs share an SM: on the H200 1.6-1.8x faster than 8 warps from batch 64 up, for 16
    and 128 heads); 8 where even 16 ranges of every head block fit one program an SM (batch 1:
    8 warps 9-10% faster), and in float32 or for 32-head blocks (4 would spill)."""
    programs = batch * triton.cdiv(num_heads, block_h)
    wide = dtype == torch.float32 or block_h > DEFAULT_BLOCK_H
    return 8 if wide or programs * 16 <= num_sms else 4


# The quartered kernel's launch where it reads each tile's page ids a step ahead by default
# (`default_pages_ahead`): 32-key tiles in 3 stages, two buffers (88 KB and 214 registers at 16
# heads and 4 warps on sm_90: two programs an SM, as the 64-key tiles through registers).
AHEAD_BLOCK_N, AHEAD_STAGES = 32, 3


def default_pages_ahead(quarters: bool, block_h: int, num_warps: int) -> bool:
    """Whether `mla_decode` reads the quartered kernel's page ids a tile ahead by default (in
    `AHEAD_BLOCK_N`-key tiles, `AHEAD_STAGES` stages): at 16 heads a program and 4 warps (two
    programs an SM: Moonlight from batch 16 up), where it was timed. On an H100 (the
    thirty-fourth session, `bench.mla_kernel --heads 16 --tiles 64x0x2,32x0x3a`, µs): 256 x
    128 25.1 -> 22.7, 64 x 2,048 76.4 -> 68.7, 64 x 128 14.1 both, 256 x 2,048 213.3 -> 214.0;
    Moonlight's engine steps, steady, alternating twice: 256 x 128 13.60 / 13.59 -> 13.48 /
    13.50 ms, 64 x 128 12.15 / 12.15 -> 12.14 / 12.14. Not at batch 1's 8 warps, nor for the
    32- and 64-head programs of DeepSeek-V3 and Kimi-K2 (untimed)."""
    return quarters and block_h == DEFAULT_BLOCK_H and num_warps == 4


def default_num_kv_splits(
    batch: int,
    num_heads: int,
    num_sms: int = H200_SMS,
    block_h: int = DEFAULT_BLOCK_H,
    num_warps: int = 4,
) -> int:
    """As many ranges as fit the batch's programs into one wave of the device (two programs an
    SM at 4 warps, one at more), at most 16: the split kernel holds one or two programs an SM,
    so a second wave costs a whole program's time, and a range that a wave could have split
    finishes late (batch 64 at 2,048 tokens on the H200: 5 ranges 118 µs, 4 ranges 83).
    Fixed per (batch, heads), so a graph captured at a batch size keeps it; one for an empty
    batch (an idle expert-parallel rank's step)."""
    programs = batch * triton.cdiv(num_heads, block_h)
    if programs == 0:
        return 1
    slots = (2 if num_warps <= 4 else 1) * num_sms
    return max(1, min(16, slots // programs))


def takes_quarters(q_latent: torch.Tensor) -> bool:
    """Whether `mla_decode` takes the quartered kernel by default for these queries: in 16-bit
    types where the latent rank is a power of two of at least 64 (every MLA model's 512). Not
    in float32 (the exact checks): its four accumulators spill there (7 KB on sm_90,
    `bench.compile_kernels`), and nothing measured it."""
    rank = q_latent.shape[-1]
    return rank >= 64 and rank & (rank - 1) == 0 and q_latent.dtype != torch.float32


@functools.cache
def _env_tiles() -> tuple[int, int, int, bool] | None:
    return mla_decode_tiles_from_env()


def env_launch(q_latent: torch.Tensor) -> dict[str, Any]:
    """`mla_decode`'s launch keywords from `PDSERVE_MLA_DECODE_TILES`
    (`config.mla_decode_tiles_from_env`, read once) for an engine A/B of the quartered
    kernel's tiles, where these queries take that kernel (`takes_quarters`); else, and where
    unset, empty (the rule's)."""
    tiles = _env_tiles()
    if tiles is None or not takes_quarters(q_latent):
        return {}
    block_n, warps, stages, ahead = tiles
    return {
        "block_n": block_n,
        "num_warps": warps or None,
        "num_stages": stages,
        "pages_ahead": ahead,
    }


@overload
def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_kv_splits: int | None = None,
    block_n: int | None = None,
    block_h: int | None = None,
    req_rows: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    quarters: bool | None = None,
    pages_ahead: bool | None = None,
    defer_combine: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_kv_splits: int | None = None,
    block_n: int | None = None,
    block_h: int | None = None,
    req_rows: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    quarters: bool | None = None,
    pages_ahead: bool | None = None,
    defer_combine: bool = False,
) -> torch.Tensor | PendingCombine: ...


def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_kv_splits: int | None = None,
    block_n: int | None = None,
    block_h: int | None = None,
    req_rows: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    quarters: bool | None = None,
    pages_ahead: bool | None = None,
    defer_combine: bool = False,
) -> torch.Tensor | PendingCombine:
    """Absorbed MLA decode over the paged cache; writes and returns `out`, or with
    `defer_combine` and more than one range the ranges' partials, uncombined (a
    `PendingCombine`: no combine launch; `out` is then not written).

    q_latent `[B, H, R]`, q_pe `[B, H, P]` (one new token per sequence); latent_cache `[pages,
    page_size, 1, R]` and pe_cache `[pages, page_size, 1, P]` (one layer's K and V tensors of
    the pool, the new token already written); page_table `[B, max_pages]` page ids, or with
    `req_rows` `[B]` any `[rows, max_pages]` table whose row `req_rows[b]` holds sequence b's
    pages (the engine's whole table: no per-layer gather of the batch's rows); seq_lens
    `[B]` context lengths including the new token (0: the row gets zeros); out `[B, H, R]`.
    Scores are `scale * (q_latent . c + q_pe . k_pe)`; values are the latents `c`.
    `block_h` heads share each read of a latent tile (16, or 32 or 64 in 16-bit types: more
    heads per read, more registers per program; default `default_block_h` with quarters, else
    16); `block_n` context positions per tile (default `default_block_n`); `num_warps`
    (default `default_num_warps`) and `num_stages` the split kernel's launch (`python -m
    bench.mla_kernel --mode decode --tiles` times others). `quarters` (default: in 16-bit
    types where the rank is a power of two of at least 64, as every MLA model's 512 is) takes
    the kernel that splits the latent's columns in four. On the H200 at 16 heads
    (`bench.mla_kernel --quarters 0,1`, then its `--tiles`), the one-chain kernel's 32-key
    tiles against the quarters' 64-key tiles: 256 x 128 23.4 -> 19.8 µs, 256 x 2,048 243 ->
    162, 64 x 2,048 80.0 -> 54.1, 1 x 2,048 16.9 -> 12.5; 64 x 128 14.2 -> 12.7 (the
    quarters' 32-key tiles 11.7 there). `pages_ahead` (the quartered kernel only) reads each
    tile's page ids a step early, so that Triton copies the tiles into shared memory ahead of
    their products (`num_stages - 1` buffers: 32-key tiles at 3 stages fit two programs an
    SM); None (with `block_n` and `num_stages` None) is `default_pages_ahead`'s rule
    (`PDSERVE_MLA_DECODE_TILES` sets a launch for an engine A/B).
    """
    batch, num_heads, rank = q_latent.shape
    rope = q_pe.shape[2]
    if latent_cache.shape[-1] != rank or pe_cache.shape[-1] != rope:
        raise ValueError(
            f"cache widths {latent_cache.shape[-1]}, {pe_cache.shape[-1]} do not match the "
            f"queries' {rank}, {rope}"
        )
    if batch == 0:
        return out
    if latent_cache.stride(-1) != 1 or pe_cache.stride(-1) != 1:
        raise ValueError("the latent and rope-key caches must be contiguous in their last dim")
    page_size = latent_cache.shape[1]
    sms, shared = sm_count(q_latent.device), shared_memory(q_latent.device)
    # tl.dot needs dimensions of at least 16 on the GPU.
    block_r = max(16, triton.next_power_of_2(rank))
    block_p = max(16, triton.next_power_of_2(rope))
    if quarters is None:
        quarters = takes_quarters(q_latent)
    if quarters and (rank != block_r or rank % 64):
        raise ValueError(f"quarters need a latent rank that is a power of two >= 64, got {rank}")
    width = block_r + block_p
    if block_h is None:
        block_h = DEFAULT_BLOCK_H
        if quarters:
            block_h = default_block_h(q_latent.dtype, batch, num_heads, sms, shared, width)
    num_warps = num_warps or default_num_warps(q_latent.dtype, batch, num_heads, sms, block_h)
    if pages_ahead is None:
        rule = block_n is None and num_stages is None
        pages_ahead = rule and default_pages_ahead(quarters, block_h, num_warps)
        if pages_ahead:
            block_n, num_stages = AHEAD_BLOCK_N, AHEAD_STAGES
    if pages_ahead and not quarters:
        raise ValueError("pages_ahead is the quartered kernel's (quarters=True)")
    num_stages = num_stages or 2
    if block_n is None:
        block_n = default_block_n(quarters, block_h, width, q_latent.element_size(), shared)
    if block_h < 16 or block_h & (block_h - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(
            f"block_h and block_n must be powers of two >= 16, got {block_h}, {block_n}"
        )
    if q_latent.dtype == torch.float32 and block_h > 16:
        raise ValueError(f"float32 MLA decode takes block_h=16 (got {block_h}: registers spill)")
    splits = num_kv_splits or default_num_kv_splits(batch, num_heads, sms, block_h, num_warps)
    device = q_latent.device
    direct = splits == 1  # the split kernel writes `out`: no partials, no combine launch
    early = pdl.trigger_first(batch)  # the output's absorption and O load while these run
    if direct:
        mid_out = mid_lse = out  # not read
    else:
        mid_out = torch.empty(batch, num_heads, splits, rank, dtype=torch.float32, device=device)
        mid_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=device)
    q_latent = q_latent if q_latent.stride(2) == 1 else q_latent.contiguous()
    q_pe = q_pe if q_pe.stride(2) == 1 else q_pe.contiguous()
    kernel = mla_decode_quarters_kernel if quarters else mla_decode_split_kernel
    kernel[(triton.cdiv(num_heads, block_h), splits, batch)](
        q_latent,
        q_pe,
        latent_cache,
        pe_cache,
        page_table,
        page_table if req_rows is None else req_rows,
        seq_lens,
        mid_out,
        mid_lse,
        out,
        float(scale),
        num_heads,
        rank,
        rope,
        page_size,
        q_latent.stride(0),
        q_latent.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        latent_cache.stride(0),
        latent_cache.stride(1),
        pe_cache.stride(0),
        pe_cache.stride(1),
        page_table.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=splits,
        DIRECT=direct,
        HAS_ROWS=req_rows is not None,
        PRECISION=dot_precision(q_latent),
        BLOCK_H=block_h,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        **({"AHEAD": pages_ahead} if quarters else {}),
        **pdl.launch_args(q_latent, trigger_first=early),
    )
    if direct:
        return out
    if defer_combine:
        return PendingCombine(mid_out, mid_lse, out.dtype)
    mla_decode_combine_kernel[(num_heads, batch)](
        mid_out,
        mid_lse,
        out,
        num_heads,
        rank,
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_R=block_r,
        num_warps=4,
        **pdl.launch_args(q_latent, trigger_first=early),
    )
    return out
