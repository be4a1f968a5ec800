"""A skinny GEMM in Triton: `y = x @ weight.T (+ bias)` for a few rows of `x`, as in decode.

At decode batch 1-16 a linear layer is a stream of its weight: `W` `[N, K]` is megabytes,
`x` `[M, K]` and `y` `[M, N]` kilobytes, so its time is W's bytes over the memory bandwidth
plus what the kernel loses ramping up and draining. On the H200 cuBLAS streams Llama-3-8B's
large projections near the copy rate but the 34-50 MB ones (QKV, O) at about 74% of it, and
splits some of them over K with a second reduce launch. This kernel is written for the
stream:

- Program `(r, i, s)` owns rows `i * block_n ...` of `W` (output columns of `y`) and the
  `s`-th of `split_k` equal runs of K; it reads its slab of `W` once, each
  `[block_n, block_k]` tile coalesced along K, with rows `r * BLOCK_M ...` of `x` (x is tiny:
  L1/L2 serve its re-reads).
- Tiles with `dot` multiply on the tensor cores, `acc[n, m] += W_tile @ x_tile.T`, all M rows
  in one program (padded to 16; up to `MAX_BLOCK_M`), W's tiles pipelined through shared
  memory (`num_stages`). Without `dot`, on the CUDA cores, one row of x per program: the
  products are accumulated unreduced and summed over K once at the end, and W goes straight
  from global memory to registers (the loop is not pipelined; the many resident programs
  keep the loads in flight). More rows than one program holds take more programs; those on
  one slab of W are adjacent in the grid, so W comes from memory once and from L2 after.
- With `SkinnyTiles(tma=True)` (`_skinny_gemm_tma_kernel`) W's and x's tiles come through the
  tensor-memory accelerator instead: no per-element addresses, one instruction a stage's load.
  At 64 rows this wins where the tiles are 64 rows of W or more (x, read whole by every
  program, would otherwise cost more L2 traffic than W); see `TUNED`.
- Sums are float32; the output is rounded once to x's dtype after the bias is added.
- `split_k == 1` (the default rule's choice for the shapes it knows) writes `y` directly.
  With more splits, each writes a float32 partial and a second launch adds them in split
  order: no atomics, so the result is bitwise the same on every run (greedy decoding stays
  token-exact run to run). Different tiles sum in different orders and agree only to
  rounding.

The tile rule `pick_tiles` is reasoned, not yet measured: the widest `block_n` that still
gives two programs per SM of a 132-SM H100/H200 (every SM streams, all programs resident),
K tiles long enough to keep several MB of W in flight (see `TILE_CONFIGS`), no split unless
N is too small to fill the device that way. The tiles compile for sm_90 without spills
(`bench.compile_kernels`). `python -m bench.skinny_gemm` times every entry of `TILE_CONFIGS`
against cuBLAS on Llama-3-8B's projections on the GPU; the rule is to be set from that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, overload

import torch
import triton
import triton.language as tl

from engine.kernels import pdl, tma
from engine.kernels.attention import dot_precision
from engine.kernels.fused import _plus_residual, _rms_normalize
from engine.kernels.sms import H200_SMS
from engine.layers.pending import PendingSum

SM_COUNT = H200_SMS  # the device the rule's program counts are for (not yet the running one's)
MAX_BLOCK_M = 64  # rows of x per program on the tensor cores (one on the CUDA cores)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    M,
    N,
    K,
    split_len,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_ps,
    stride_pm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    GATED: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    if not PREFETCH:
        pdl.start(PDL)
    # PREFETCH (CUDA cores, not GATED): W's first tile is loaded before waiting on the previous
    # kernel (W does not depend on it; with PDL the load overlaps that kernel's tail), and each
    # step loads the next tile before using the current one: two tiles in flight a program.
    # GATED: W is [2N, K], gate rows then up rows; the program reads row j of each and
    # writes silu(gate) * up (DIRECT), or both sums as partials (up at column N + j).
    # DIRECT (one split): y itself, with the bias; else this split's float32 partial. Row
    # blocks of x are the fastest grid axis, so that when M takes several programs (more rows
    # than BLOCK_M) those on one slab of W run together and read it from L2 after the first.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of W = columns of y
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of x and y
    n_ok = rows_n < N
    m_ok = rows_m < M
    k_start = pid_s * split_len
    offs_k = k_start + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    u_ptrs = w_ptrs + N.to(tl.int64) * stride_wn  # the up rows (read only when GATED)
    if DOT:
        x_ptrs = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        x_ok = m_ok[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # y.T
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        # One row of x (BLOCK_M == 1), loaded as W's tile is shaped (every row of it the same
        # addresses, served by L1) so that it has W's register layout: a [1, BK] load gets its
        # own, and W's tile went through shared memory to meet it in every step. The products
        # are accumulated unreduced and summed over K once after the loop.
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm + offs_k[None, :]
        x_ptrs = tl.broadcast_to(x_row, [BLOCK_N, BLOCK_K])
        x_ok = n_ok[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_stop = tl.minimum(k_start + split_len, K)
    if PREFETCH:
        w_next = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < k_stop)[None, :], other=0.0)
        pdl.start(PDL)
        for k0 in range(0, k_stop - k_start, BLOCK_K):
            w = w_next
            next_ok = (offs_k + (k0 + BLOCK_K) < k_stop)[None, :]
            w_next = tl.load(w_ptrs + BLOCK_K, mask=n_ok[:, None] & next_ok, other=0.0)
            x_mask = x_ok if EVEN_K else x_ok & (offs_k + k0 < K)[None, :]
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    else:
        for k0 in range(0, k_stop - k_start, BLOCK_K):
            if EVEN_K:  # every tile whole: only the row masks, which do not change along K
                w_mask = n_ok[:, None]
                x_mask = x_ok
            else:
                k_ok = (offs_k + k0 < K)[None, :]
                w_mask = n_ok[:, None] & k_ok
                x_mask = x_ok & k_ok
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # [BN, BK]
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)  # [BM, BK], or [BN, BK] of one row
            if DOT:
                acc += tl.dot(w, tl.trans(x), input_precision=PRECISION)
            else:
                acc += w.to(tl.float32) * x.to(tl.float32)
            if GATED:
                u = tl.load(u_ptrs, mask=w_mask, other=0.0)
                if DOT:
                    acc_u += tl.dot(u, tl.trans(x), input_precision=PRECISION)
                else:
                    acc_u += u.to(tl.float32) * x.to(tl.float32)
                u_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    acc = tl.trans(acc) if DOT else tl.sum(acc, 1)[None, :]  # [BM, BN]
    if GATED:
        acc_u = tl.trans(acc_u) if DOT else tl.sum(acc_u, 1)[None, :]
    _store_rows(
        acc, acc_u, rows_m, rows_n, M, N, bias_ptr, y_ptr, part_ptr, pid_s,
        stride_ym, stride_ps, stride_pm, HAS_BIAS, DIRECT, GATED,
    )  # fmt: skip


@triton.jit
def _preload_gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    M,
    N,
    K,
    split_len,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_ps,
    stride_pm,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    ONE_ROW: tl.constexpr,
    PDL: tl.constexpr,
):
    """The CUDA-core product for a few rows of x with the program's whole `[BLOCK_N,
    BLOCK_K]` tile of W (its split: `split_len <= BLOCK_K`) loaded into registers before the
    PDL wait: where the kernels before this one let it be scheduled as they start
    (`pdl.launch_args(trigger_first=True)`), the tile streams in while they run (the decode
    attention at batch 1 leaves the memory bus idle for several µs). After the wait each row
    of x, read in the tile's column layout, is multiplied by the tile and summed."""
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows_n < N
    k_start = pid_s * split_len
    offs_k = k_start + tl.arange(0, BLOCK_K)
    k_ok = offs_k < tl.minimum(k_start + split_len, K)
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    held = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    pdl.start(PDL)
    # One row without a loop: the tile's conversion to float32 would be hoisted out of one
    # (invariant in m), all of it live at once (165 registers against 80 at 16 x 2,048).
    if ONE_ROW:
        _preload_row(
            held, x_ptr, 0, offs_k, k_ok, rows_n, M, N, bias_ptr, y_ptr, part_ptr, pid_s,
            stride_xm, stride_ym, stride_ps, stride_pm, HAS_BIAS, DIRECT,
        )  # fmt: skip
    else:
        for m in range(M):
            _preload_row(
                held, x_ptr, m, offs_k, k_ok, rows_n, M, N, bias_ptr, y_ptr, part_ptr, pid_s,
                stride_xm, stride_ym, stride_ps, stride_pm, HAS_BIAS, DIRECT,
            )  # fmt: skip


@triton.jit
def _preload_row(
    held, x_ptr, m, offs_k, k_ok, rows_n, M, N, bias_ptr, y_ptr, part_ptr, pid_s,
    stride_xm, stride_ym, stride_ps, stride_pm, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
):  # fmt: skip
    """Row `m` of x against the tile held: its sums stored as `_store_rows` stores them."""
    x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_ok, other=0.0)  # a few rows: no overflow
    acc = tl.sum(held.to(tl.float32) * x.to(tl.float32)[None, :], 1)  # [BN]
    _store_rows(
        acc[None, :], acc[None, :], m + tl.arange(0, 1), rows_n, M, N, bias_ptr, y_ptr,
        part_ptr, pid_s, stride_ym, stride_ps, stride_pm, HAS_BIAS, DIRECT, False,
    )  # fmt: skip


@triton.jit
def _preload_norm_gemv_kernel(
    x_ptr,  # [K]: the layer's input row, before the norm
    res_ptr,  # [K]: the residual stream's row
    res_out_ptr,  # [K] out: x + residual (a new tensor: every program reads res_ptr)
    norm_w_ptr,  # [K]: the RMSNorm's weight
    w_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    eps,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
):
    """`_preload_gemv_kernel` at one row with the RMSNorm before the product folded in
    (`preload_norm_linear`): each program holds its whole `[BLOCK_N, K]` tile of W from
    before its PDL wait, then adds the residual to the row, normalises it
    as `fused.rms_norm(x, w, eps, residual=...)` does (its rounding; the sum of squares in
    this launch's order) and multiplies; program 0 stores the new residual stream. One
    launch, and one wait on the chain, fewer than the norm's kernel and then the product."""
    pid_n = tl.program_id(1)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows_n < N
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    held = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    pdl.start(PDL)
    # The norm on a row of its own layout (not the tile's columns'), then handed over.
    cols = tl.arange(0, BLOCK_K)
    c_ok = cols < K
    x = tl.load(x_ptr + cols, mask=c_ok, other=0.0)
    h = _plus_residual(x, res_ptr, cols, c_ok)
    if pid_n == 0:
        tl.store(res_out_ptr + cols, h, mask=c_ok)
    norm_w = tl.load(norm_w_ptr + cols, mask=c_ok, other=0.0)
    xn = _rms_normalize(h, norm_w, K, eps).to(x_ptr.dtype.element_ty)  # the norm's output
    acc = tl.sum(held.to(tl.float32) * xn.to(tl.float32)[None, :], 1)  # [BN]
    _store_rows(
        acc[None, :], acc[None, :], tl.arange(0, 1), rows_n, 1, N, bias_ptr, y_ptr, y_ptr, 0,
        0, 0, 0, HAS_BIAS, True, False,
    )  # fmt: skip


@triton.jit
def _skinny_gemm_tma_kernel(
    x_desc,  # [M, K], [BLOCK_M, BLOCK_K] blocks
    w_desc,  # [N or 2N, K], [BLOCK_N, BLOCK_K] blocks
    bias_ptr,
    y_ptr,
    part_ptr,
    M,
    N,
    K,
    split_len,
    stride_ym,
    stride_ps,
    stride_pm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    GATED: tl.constexpr,
    PDL: tl.constexpr,
):
    """The tensor-core path of `_skinny_gemm_kernel` with W's and x's tiles loaded by the
    tensor-memory accelerator: no per-element addresses, and the loads of the software
    pipeline's stages are each one instruction. Splits are whole K tiles, so a tile never
    reaches into the next split; past K (and past M's and 2N's rows) the loads fill zeros.
    A GATED tile past N reads up rows, whose columns are never stored."""
    pdl.start(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    k_start = pid_s * split_len
    k_stop = tl.minimum(k_start + split_len, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # y.T
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        w = w_desc.load([n0, k0])  # [BN, BK]
        x = x_desc.load([m0, k0])  # [BM, BK]
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        if GATED:
            u = w_desc.load([N + n0, k0])
            acc_u = tl.dot(u, tl.trans(x), acc_u, input_precision=PRECISION)
    rows_n = n0 + tl.arange(0, BLOCK_N)
    rows_m = m0 + tl.arange(0, BLOCK_M)
    _store_rows(
        tl.trans(acc), tl.trans(acc_u), rows_m, rows_n, M, N, bias_ptr, y_ptr, part_ptr, pid_s,
        stride_ym, stride_ps, stride_pm, HAS_BIAS, DIRECT, GATED,
    )  # fmt: skip


@triton.jit
def _store_rows(
    acc, acc_u, rows_m, rows_n, M, N, bias_ptr, y_ptr, part_ptr, pid_s,
    stride_ym, stride_ps, stride_pm,
    HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    """The epilogue: `acc` (and `acc_u`) `[BM, BN]` float32 sums of rows `rows_m` of y and
    its columns `rows_n`; DIRECT: y with the bias (and silu(gate) * up), else this split's
    partial (the up sums at column N + j)."""
    mask = (rows_m < M)[:, None] & (rows_n < N)[None, :]
    if DIRECT:
        if HAS_BIAS:
            n_ok = rows_n < N
            acc += tl.load(bias_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                bias_u = tl.load(bias_ptr + N + rows_n, mask=n_ok, other=0.0)
                acc_u += bias_u.to(tl.float32)[None, :]
        if GATED:
            acc = _silu_times(acc, acc_u, y_ptr.dtype.element_ty)
        out = y_ptr + rows_m.to(tl.int64)[:, None] * stride_ym + rows_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part = part_ptr + pid_s * stride_ps + rows_m[:, None] * stride_pm + rows_n[None, :]
        tl.store(part, acc, mask=mask)
        if GATED:
            tl.store(part + N, acc_u, mask=mask)


@triton.jit
def _silu_times(gate, up, dtype):
    """silu(gate) * up from float32 sums, rounded as the unfused path rounds: the GEMM's
    outputs to `dtype` first, then silu(gate) to `dtype` (fused.silu_and_mul)."""
    g = gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)
    return act.to(tl.float32) * up.to(dtype).to(tl.float32)


@triton.jit
def _split_sum_kernel(
    part_ptr,
    bias_ptr,
    y_ptr,
    N,
    stride_ps,
    stride_pm,
    stride_ym,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    # GATED: the partials hold gate sums at columns j and up sums at N + j.
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    acc_u = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT_K):  # in split order: the same sum on every run
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + cols, mask=ok, other=0.0)
        if GATED:
            acc_u += tl.load(part_ptr + s * stride_ps + m * stride_pm + N + cols, mask=ok,
                             other=0.0)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if GATED:
            acc_u += tl.load(bias_ptr + N + cols, mask=ok, other=0.0).to(tl.float32)
    if GATED:
        acc = _silu_times(acc, acc_u, y_ptr.dtype.element_ty)
    tl.store(y_ptr + m * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class SkinnyTiles:
    """One launch of the skinny GEMM: `block_n` rows of W per program, `block_k` of K per
    loop step, `split_k` programs along K (a second launch sums them), tensor-core `dot` or
    CUDA-core products, warps and software-pipeline stages. Powers of two; with `dot`,
    `block_n` and `block_k` of 16 or more (the tensor cores' smallest tile)."""

    block_n: int
    block_k: int
    split_k: int = 1
    dot: bool = True
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False  # CUDA cores only: W's tiles one step ahead, the first before PDL's wait
    # CUDA cores only: the program's whole [block_n, block_k] tile of W (block_k x split_k
    # covering K) held in registers from before the PDL wait (`_preload_gemv_kernel`).
    preload: bool = False
    tma: bool = False  # tensor cores only: W's and x's tiles by the tensor-memory accelerator
    # Tensor cores only: rows of x a program, 16 to 256 (0: `rows_per_program`'s rule, up to
    # MAX_BLOCK_M). Wider blocks read W fewer times at a batch of 128-256 rows.
    block_m: int = 0

    def __post_init__(self) -> None:
        if self.prefetch and self.dot:
            raise ValueError("prefetch is for the CUDA-core tiles (dot=False)")
        if self.preload and (self.dot or self.prefetch):
            raise ValueError("preload is for the CUDA-core tiles (dot=False, prefetch=False)")
        if self.tma and not self.dot:
            raise ValueError("tma is for the tensor-core tiles (dot=True)")
        if self.block_m and (
            not self.dot or not 16 <= self.block_m <= 256 or self.block_m & (self.block_m - 1)
        ):
            raise ValueError(
                f"block_m is a power of two of 16 to 256 on the tensor cores, got {self.block_m}"
            )
        smallest = 16 if self.dot else 1
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < smallest or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {smallest}, got {value}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, num_warps and num_stages must be >= 1 in {self}")

    def label(self) -> str:
        kind = (
            "tma" if self.tma else "dot" if self.dot else "pf" if self.prefetch
            else "pre" if self.preload else "fma"
        )  # fmt: skip
        split = f" split {self.split_k}" if self.split_k > 1 else ""
        rows = f" m{self.block_m}" if self.block_m else ""
        stages = "" if self.preload else f" s{self.num_stages}"  # a preload runs one stage
        return f"{kind} {self.block_n}x{self.block_k}{split} w{self.num_warps}{stages}{rows}"


# The configurations bench.skinny_gemm compares, for 16-bit weights (the rule halves block_k
# for float32, so that a tile's bytes stay the same). While every program is resident, the
# bytes of W in flight are about N x block_k x 2 (x the stages less one with `dot`, which
# pipelines; the CUDA-core loop does not): QKV's 6,144 rows at 512 give 6.3 MB, O's 4,096
# 4.2 MB, about the H200's bandwidth x latency (4.2 TB/s x ~1 µs). The rule picks from
# GEMV_TILES and DOT_TILES; the rest are there to test that reasoning on the GPU. Each
# compiles for sm_90 without spilling (8 warps on the CUDA cores spill a register).
GEMV_TILES = SkinnyTiles(8, 512, dot=False)  # one row: CUDA cores, 80 registers
DOT_TILES = (  # widest first: 64 for N of 28k and more, 16 for 4-6k (256-384 programs)
    SkinnyTiles(64, 128),
    SkinnyTiles(32, 256, num_warps=8),  # 4 warps spill two registers
    SkinnyTiles(16, 256),
)
TILE_CONFIGS: tuple[SkinnyTiles, ...] = (
    GEMV_TILES,
    *DOT_TILES,
    SkinnyTiles(16, 256, dot=False),  # half GEMV_TILES' bytes in flight
    SkinnyTiles(4, 1024, dot=False),  # as many bytes in flight, twice the programs
    SkinnyTiles(16, 512),  # twice DOT_TILES[-1]'s bytes in flight
    SkinnyTiles(16, 256, split_k=2),  # long K (down: 14,336) over more programs, + a sum
    SkinnyTiles(32, 256, split_k=2, num_warps=8),  # x is re-read per W tile: M / block_n of W
    SkinnyTiles(4, 1024, dot=False, prefetch=True),  # two tiles in flight, the first early
    SkinnyTiles(8, 512, dot=False, prefetch=True),
)


# Candidates for a batch of 128-256 rows (`block_m` past the rule's 64, so that W is read once
# or twice rather than four times: at 256 rows with 64-row blocks the skinny GEMM lost to cuBLAS
# on Moonlight's fused query-and-latent projection, 12.3 against 9.6 µs). Timed by
# `python -m bench.skinny_gemm --rows 128,256 --tiles wide` (`session.sh b4`); each compiles
# for sm_90 without spilling. On an H100 cuBLAS was faster than all of them at every shape timed
# (Moonlight's fused query-and-latent 9.2 / 11.3 µs at 128 / 256 rows, its O, Qwen3-30B-A3B's
# and Llama-3-8B's QKV and O): no `TUNED` row uses them; kept as candidates for other GPUs.
WIDE_TILES = (
    SkinnyTiles(64, 64, block_m=128),
    SkinnyTiles(128, 64, num_warps=8, block_m=128),
    SkinnyTiles(64, 64, num_stages=4, tma=True, block_m=128),
    SkinnyTiles(128, 64, num_warps=8, num_stages=4, tma=True, block_m=128),
    SkinnyTiles(64, 128, tma=True, block_m=128),
    SkinnyTiles(64, 64, num_warps=8, num_stages=4, tma=True, block_m=256),
    SkinnyTiles(128, 64, num_warps=8, tma=True, block_m=256),
    SkinnyTiles(64, 64, split_k=2, num_stages=4, tma=True, block_m=128),
)


def pick_tiles(
    m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16, gated: bool = False
) -> SkinnyTiles:
    """The rule: CUDA-core products for one row; else the widest `block_n` of `DOT_TILES`
    that still gives two programs per SM; K split only when even that leaves SMs idle (into
    as many splits as make two programs per SM, each of two K tiles or more). `gated` (two
    accumulators, `skinny_gate_up`) in float32 halves K tiles once more: 64 rows of the
    widest tile spill registers otherwise."""
    if m == 1:
        tiles = GEMV_TILES
    else:
        fills = (t for t in DOT_TILES if triton.cdiv(n, t.block_n) >= 2 * SM_COUNT)
        tiles = next(fills, DOT_TILES[-1])
    programs = triton.cdiv(n, tiles.block_n)
    block_k = tiles.block_k // 2 if dtype == torch.float32 else tiles.block_k
    if gated and dtype == torch.float32 and tiles.dot:
        block_k = max(16, block_k // 2)
    split_k = 1
    if programs < SM_COUNT:
        split_k = max(1, min(triton.cdiv(2 * SM_COUNT, programs), k // (2 * block_k)))
    return replace(tiles, block_k=block_k, split_k=split_k)


# Where the skinny GEMM beat cuBLAS on the H200 (`python -m bench.skinny_gemm`), per weight
# shape: ("linear" or "gate_up", rows N of W, K, dtype) -> ((max_rows, tiles), ...) in
# ascending order; a product of M rows takes the first row with M <= max_rows (tiles None:
# cuBLAS), and beyond the last row (or for a shape not here) cuBLAS. `--gemm-backend auto`
# reads it on Hopper GPUs.
TunedKey = tuple[str, int, int, str]
# Whether a preloading launch at batch 1 lets the kernel after it be scheduled as it starts (the
# norm with the gate's logits after O then loads its gate rows meanwhile). Off: Qwen3-30B-A3B 1
# x 128 on an H100 (`bash bench/gpu/session.sh b13`, the twentieth session) 3.07 ms off against
# 3.13 on, back to back.
PRELOAD_TRIGGERS_FIRST = False
# Where a layer's first projection at one row takes preloading tiles, whether the RMSNorm before
# it runs inside its launch (`preload_norm_linear`, `Linear.forward_normed`): each program
# normalises the row itself, one launch and one PDL wait fewer on each layer's chain. Off: on an
# H100 (`bash bench/gpu/session.sh b23`, the twenty-first session, alternating) Qwen3-30B-A3B 1
# x 128 2.94 / 2.95 ms off against 2.95 / 2.95 on, Moonlight 2.40 / 2.39 against 2.38 / 2.42:
# what 640 programs' own norm costs takes back the link it saves. Greedy tokens equal either way.
NORM_IN_PRELOAD = False
# One row's preloading tiles (`TUNED`): a program's `[block_n, K]` slab of W, 32 KB at 4 warps
# (80 registers a thread for 8 x 2,048, 96 for 4 x 4,096 on sm_90, no spills).
PRELOAD_4096 = SkinnyTiles(4, 4096, dot=False, num_warps=4, preload=True)
PRELOAD_2048 = SkinnyTiles(8, 2048, dot=False, num_warps=4, preload=True)
TUNED: dict[TunedKey, tuple[tuple[int, SkinnyTiles | None], ...]] = {
    # Llama-3-8B's gate-up with silu(gate) * up in the epilogue, against cuBLAS followed by
    # fused.silu_and_mul: 57.4 / 59.5 / 59.1 / 63.9 µs against 62.9 / 59.1 / 61.4 / 66.1 µs
    # at 1 / 4 / 16 / 64 rows (floor 55.5-56.1). At 64 rows the TMA tiles, 128 x 64 with 8
    # warps and 4 stages, took 62.4-62.8 µs against 64.2-64.5 (`bench/gpu/session.sh p`;
    # at 16 rows 60.1 against 59.0). At 256 rows the same tiles over 128 rows of x a program:
    # 103.9-105.3 µs against cuBLAS's 110.9-112.6 with the activation's launch on an H100
    # (floor 80.5-81.0; the twenty-seventh session: Llama-3-8B 256 x 512 back to back 14.40
    # -> 14.24 ms); cuBLAS kept O, down and QKV at 256 rows against every wide tile. Between
    # (`session.sh b37`, H100, twenty-eighth session): 72 / 96 / 128 / 160 / 192 / 224 / 248
    # rows 96.4 / 94.3 / 94.4 / 118.6 / 111.3 / 104.5 / 104.3 µs against cuBLAS's 93.3 / 96.1 /
    # 95.6 / 101.2 / 103.3 / 108.5 / 111.9: taken from 224 rows (the 65-128 gains are 1-2%,
    # within a run's noise); engine 256 x 128 10.29 / 10.14 -> 9.94 / 9.94 ms a step.
    ("gate_up", 28672, 4096, "bfloat16"): (
        (32, SkinnyTiles(64, 128)),
        (64, SkinnyTiles(128, 64, num_warps=8, num_stages=4, tma=True)),
        (223, None),
        (256, SkinnyTiles(128, 64, num_warps=8, num_stages=4, tma=True, block_m=128)),
    ),
    # The O and down projections' split sums are left to the next norm
    # (engine.layers.pending): their rows below are timed without the reduce launch, as the
    # engine runs them (`python3 -m bench.skinny_gemm --shapes qwen3_o,o,down --rows 1,16,64
    # --defer --tiles ...`, bench/gpu/session.sh A; a caller that needs the tensor pays about
    # 1-1.5 µs more for the reduce).
    # Llama-3-8B's down (4096 x 14336): TMA tiles of 64 x 128 with K split in four, 30.2 / 31.0
    # µs at 1 / 16 rows against cuBLAS's 32.9 / 33.7 (floor 27.7-27.8); at 64 rows in two,
    # 33.5 against 37.1 (floor 28.2; in four 35.7).
    ("linear", 4096, 14336, "bfloat16"): (
        (16, SkinnyTiles(64, 128, split_k=4, num_stages=4, tma=True)),
        (64, SkinnyTiles(64, 128, split_k=2, num_stages=4, tma=True)),
    ),
    # Qwen3-30B-A3B's O projection (2048 x 4096): TMA tiles of 64 x 128, K split in four, 6.5
    # / 6.6 / 7.2 µs at 1 / 16 / 64 rows against cuBLAS's 8.7 / 9.7 / 10.3 (floor 4.0-4.1)
    # and, at one row, the prefetching CUDA-core 4 x 1024 tiles' 7.1 (the row before). Its QKV
    # (5120 x 2048): cuBLAS past one row (at one row, timed alone, cuBLAS's 8.2 against 8.4).
    # At one row both take the preloading tiles (`SkinnyTiles.preload`): each program's whole
    # slab of W loaded into registers while the kernels before it run (they trigger first at
    # batch 1: `pdl.TRIGGER_FIRST_MAX_ROWS`). Their gain is the overlap, so they are timed in
    # the engine, not alone: Qwen3-30B-A3B 1 x 128 on an H100 (`bench/gpu/preload_ab.py`,
    # back to back, same machine) 3.28-3.29 ms -> 3.08 with O on 4 x 4,096 tiles and QKV on 8 x
    # 2,048 (8 x 4,096 for O: 3.12; 16 x 4,096 at 16 warps: 3.15-3.18; O alone: 3.24).
    ("linear", 2048, 4096, "bfloat16"): (
        (1, PRELOAD_4096),
        (64, SkinnyTiles(64, 128, split_k=4, num_stages=4, tma=True)),
    ),
    ("linear", 5120, 2048, "bfloat16"): ((1, PRELOAD_2048),),
    # Moonlight-16B-A3B's MLA output projection (2048 x 2048): TMA tiles of 64 x 128, K split
    # in four, 5.7 / 6.4 µs at 1 / 64 rows with the reduce launch against cuBLAS's 6.2 / 6.5
    # (floor 2.0-2.1; `bench.skinny_gemm --shapes moonlight_o`, session.sh O). Its fused
    # query-and-latent projection (3648 x 2048): cuBLAS at 1, 64 and 256 rows (7.0 / 7.3 / 9.6
    # against 7.3 / 8.0 / 12.3 at best). At one row both take the preloading 8 x 2,048 tiles:
    # Moonlight 1 x 128 on an H100, back to back, 2.64-2.65 ms -> 2.53-2.54 (step alone 2.66-2.82
    # -> 2.55-2.67; O on 4 x 2,048 tiles 2.55, 16 x 2,048 at 8 warps 2.57).
    ("linear", 2048, 2048, "bfloat16"): (
        (1, PRELOAD_2048),
        (64, SkinnyTiles(64, 128, split_k=4, num_stages=4, tma=True)),
    ),
    ("linear", 3648, 2048, "bfloat16"): ((1, PRELOAD_2048),),
    # Llama-3-8B's O projection (4096 x 4096): TMA tiles of 64 x 128, K split in four, 10.5 /
    # 11.1 µs at 1 / 16 rows against cuBLAS's 13.8 / 13.9 and the prefetching 8 x 512 tiles'
    # 12.2 at one row (floor 7.9-8.0); at 64 rows in two, 12.2 against 13.2 (in four 15.1).
    # Its QKV (6144 x 4096): cuBLAS past one row (16.3-16.7 against 16.0-16.8 for the best TMA
    # tiles). At one row both preload 4 x 4,096 slabs: Llama-3-8B 1 x 128 on an H100, back to
    # back, alternating (`bash bench/gpu/session.sh b17`, the twentieth session) 5.69-5.70 ms
    # -> 5.61-5.62 (O alone on them 5.70, O on 8 x 4,096 5.73: b16).
    ("linear", 4096, 4096, "bfloat16"): (
        (1, PRELOAD_4096),
        (16, SkinnyTiles(64, 128, split_k=4, num_stages=4, tma=True)),
        (64, SkinnyTiles(64, 128, split_k=2, num_stages=4, tma=True)),
    ),
    ("linear", 6144, 4096, "bfloat16"): ((1, PRELOAD_4096),),
}


def tuned_tiles(kind: str, m: int, n: int, k: int, dtype: torch.dtype) -> SkinnyTiles | None:
    """TUNED's tiles for `m` rows of a `kind` product with a weight `[n, k]`, or None."""
    for max_rows, tiles in TUNED.get((kind, n, k, str(dtype).removeprefix("torch.")), ()):
        if m <= max_rows:
            return tiles
    return None


def rows_per_program(m: int, tiles: SkinnyTiles) -> int:
    """BLOCK_M of a launch for `m` rows: the tiles' own `block_m` where they give one, else a
    power of two of 16 to `MAX_BLOCK_M` on the tensor cores, one on the CUDA cores."""
    if tiles.block_m:
        return tiles.block_m
    if tiles.dot:
        return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(m)))
    return 1


@overload
def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: SkinnyTiles | None = None,
    defer: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: SkinnyTiles | None = None,
    *,
    defer: bool,
) -> torch.Tensor | PendingSum: ...


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: SkinnyTiles | None = None,
    defer: bool = False,
) -> torch.Tensor | PendingSum:
    """`F.linear(x, weight, bias)` for `x` `[..., K]` of few rows and `weight` `[N, K]` (as
    nn.Linear stores it), both of one dtype (float32, float16 or bfloat16); `bias` `[N]` of
    any float dtype. Sums in float32 and returns `[..., N]` in x's dtype. `tiles`: the launch
    (default `pick_tiles` of the shape); every split count gives the same result on every
    run. `defer`: where K is split (and there is no bias, `x` being `[M, K]`), return the
    float32 partial sums as a `PendingSum` for the next RMSNorm to add, without the reduce
    launch."""
    return _launch(x, weight, bias, tiles, gated=False, defer=defer)


def preload_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tiles: SkinnyTiles,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(rms_norm(x + residual) @ weight.T + bias, x + residual)` for one row `x` `[1, K]` in
    one launch on preloading `tiles` holding K whole (`_preload_norm_gemv_kernel`); the new
    residual stream is a new tensor. The norm's output equals `fused.rms_norm(x, norm_weight,
    eps, residual=...)`'s up to the float32 order of its sum of squares. None where it does
    not apply (more rows, tiles that are not preloading or split K, dtypes the norm would
    round differently): the caller then runs the norm and the product apart."""
    k = x.shape[-1]
    if (
        x.dim() != 2
        or x.shape[0] != 1
        or not tiles.preload
        or tiles.block_k < k
        or weight.dim() != 2
        or weight.shape[1] != k
        or weight.stride(-1) != 1
        or x.stride(-1) != 1
        or residual.shape != x.shape
        or not residual.is_contiguous()
        or len({x.dtype, weight.dtype, residual.dtype}) != 1
        or norm_weight.shape != (k,)
        or norm_weight.stride(0) != 1
        or torch.promote_types(norm_weight.dtype, x.dtype) != x.dtype
        or (bias is not None and bias.shape != (weight.shape[0],))
    ):
        return None
    n = weight.shape[0]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(residual)
    _preload_norm_gemv_kernel[(1, triton.cdiv(n, tiles.block_n))](
        x, residual, new_residual, norm_weight, weight, bias if bias is not None else y, y,
        n, k, eps, weight.stride(0),
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        HAS_BIAS=bias is not None,
        num_warps=tiles.num_warps,
        num_stages=1,
        **pdl.launch_args(x, trigger_first=PRELOAD_TRIGGERS_FIRST and pdl.trigger_first(1)),
    )  # fmt: skip
    return y, new_residual


def skinny_gate_up(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: SkinnyTiles | None = None,
) -> torch.Tensor:
    """`silu(gate) * up` of `F.linear(x, weight, bias)` in one launch (two with K split),
    for a gate-up projection `weight` `[2N, K]` holding the gate rows then the up rows (as
    `MLP.gate_up_proj` does); returns `[..., N]`. Rounded as the unfused path rounds (the
    GEMM's outputs to x's dtype, then silu(gate)); the sums themselves are in float32, in a
    different order from cuBLAS's."""
    if weight.dim() == 2 and weight.shape[0] % 2:
        raise ValueError(f"a gate-up weight has an even number of rows, got {weight.shape[0]}")
    if tiles is not None and (tiles.prefetch or tiles.preload):
        raise ValueError(
            "prefetching and preloading tiles are for skinny_linear (the gate-up reads two rows)"
        )
    y = _launch(x, weight, bias, tiles, gated=True)
    assert isinstance(y, torch.Tensor)  # never deferred
    return y


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tiles: SkinnyTiles | None,
    gated: bool,
    defer: bool = False,
) -> torch.Tensor | PendingSum:
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    if weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    rows = weight.shape[0]
    if bias is not None and bias.shape != (rows,):
        raise ValueError(f"bias must be [{rows}], got {tuple(bias.shape)}")
    n = rows // 2 if gated else rows  # output columns
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    if k == 0:
        full = bias.expand(m, rows).to(x.dtype) if bias is not None else x2.new_zeros(m, rows)
        if gated:
            gate, up = full.float().chunk(2, dim=-1)
            full = (torch.nn.functional.silu(gate).to(x.dtype).float() * up).to(x.dtype)
        y.copy_(full)
        return y.view(*x.shape[:-1], n)
    # A gated launch reads two rows of W per output column: the tiles of N = 2n's rule.
    tiles = tiles or pick_tiles(m, rows, k, x.dtype, gated)
    # The preloading kernel's one program along M multiplies every row by the tile it holds.
    block_m = m if tiles.preload else rows_per_program(m, tiles)
    if triton.cdiv(n, tiles.block_n) > 65535:  # CUDA's limit on a grid's second axis
        raise ValueError(f"N = {n} needs block_n > {tiles.block_n} (65,535 blocks at most)")
    # Splits of whole K tiles, the last one possibly shorter; no split is empty.
    split_len = triton.cdiv(k, tiles.block_k * tiles.split_k) * tiles.block_k
    split_k = triton.cdiv(k, split_len)
    if tiles.preload and split_len > tiles.block_k:
        raise ValueError(
            f"preloading tiles hold a whole split: block_k x split_k must cover K = {k}, "
            f"got {tiles.block_k} x {tiles.split_k}"
        )
    direct = split_k == 1
    if direct:
        part = y.new_empty(0, 1, 1, dtype=torch.float32)  # not written
    else:
        part = torch.empty(split_k, m, rows, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else y  # not read
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, tiles.block_n), split_k)
    if tiles.tma and tma.ready(x2, weight):
        _skinny_gemm_tma_kernel[grid](
            tma.descriptor(x2, [block_m, tiles.block_k]),
            tma.descriptor(weight, [tiles.block_n, tiles.block_k]),
            bias_arg, y, part,
            m, n, k, split_len,
            y.stride(0), part.stride(0), part.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            PRECISION=dot_precision(x),
            HAS_BIAS=bias is not None,
            DIRECT=direct,
            GATED=gated,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
            **pdl.launch_args(x2),
        )  # fmt: skip
    elif tiles.preload:
        _preload_gemv_kernel[grid](
            x2, weight, bias_arg, y, part,
            m, n, k, split_len,
            x2.stride(0), weight.stride(0), y.stride(0), part.stride(0), part.stride(1),
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            HAS_BIAS=bias is not None,
            DIRECT=direct,
            ONE_ROW=m == 1,
            num_warps=tiles.num_warps,
            num_stages=1,
            **pdl.launch_args(x2, trigger_first=PRELOAD_TRIGGERS_FIRST and pdl.trigger_first(m)),
        )  # fmt: skip
    else:  # the pointer kernel (also the TMA tiles' fallback)
        _skinny_gemm_kernel[grid](
            x2, weight, bias_arg, y, part,
            m, n, k, split_len,
            x2.stride(0), weight.stride(0), y.stride(0), part.stride(0), part.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            DOT=tiles.dot,
            PRECISION=dot_precision(x),
            EVEN_K=k % tiles.block_k == 0,
            HAS_BIAS=bias is not None,
            DIRECT=direct,
            GATED=gated,
            PREFETCH=tiles.prefetch,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
            **pdl.launch_args(x2),
        )  # fmt: skip
    if not direct and defer and bias is None and not gated and x.dim() == 2:
        # [split, M, N] seen as [M, split, N]: the reduce below, left to the next norm.
        return PendingSum(part.transpose(0, 1), x.dtype)
    if not direct:
        _sum_splits(part, bias, y, gated)
    return y.view(*x.shape[:-1], n)


def _sum_splits(
    part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, gated: bool
) -> None:
    """y `[M, N]` from the split-K partial sums `part` `[split, M, rows]` (float32; rows = 2N
    gated), with the bias and silu(gate) * up as `_store_rows` applies them at one split."""
    split_k, m, _ = part.shape
    n = y.shape[1]
    block = min(1024, triton.next_power_of_2(n))
    _split_sum_kernel[(m, triton.cdiv(n, block))](
        part, bias if bias is not None else y, y,
        n, part.stride(0), part.stride(1), y.stride(0),
        SPLIT_K=split_k,
        BLOCK=block,
        HAS_BIAS=bias is not None,
        GATED=gated,
        num_warps=4,
        **pdl.launch_args(y),
    )  # fmt: skip
