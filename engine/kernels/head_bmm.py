"""A product batched over attention heads, for MLA's two weight absorptions in decode.

    out[t, h, :] = a[t, h, :] @ w[h]        a `[T, H, K]`, w `[H, K, N]`, out `[T, H, N]`

DeepSeek-V3, Kimi-K2 and Moonlight decode in the absorbed form (`engine.models.deepseek_v3`):
each step multiplies every head's no-rope query by its W_UK (`[128, 512]`) before the MLA
kernel, and the kernel's latent output by W_UV transposed (`[512, 128]`) after it. cuBLAS's
batched GEMM took about 5.5 µs for each at 256 rows on the H200 (Moonlight's 16 heads: 0.5
GFLOP and 2 MB of weights, a few µs of work), in launches that programmatic dependent launch
cannot overlap with the kernels around them. Here one launch takes a tile of rows of one head
and a block of its output columns per program, any strides (the weights are read as views of
`kv_b_proj`, the second one transposed), and takes part in PDL (`engine.kernels.pdl`).

The product accumulates in float32 and rounds once to the output dtype, as cuBLAS does; the
summation order differs, so bf16 results may differ from cuBLAS's in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import fused, pdl
from engine.kernels.attention import dot_precision
from engine.kernels.mla_decode import combine_columns
from engine.kernels.sms import sm_count
from engine.layers.pending import PendingCombine


@triton.jit
def head_bmm_kernel(
    a,  # [T, H, K], unit stride in K
    w,  # [H, K, N], any strides
    out,  # [T, H, N], unit stride in N
    T,
    N,
    K,
    stride_at,
    stride_ah,
    stride_wh,
    stride_wk,
    stride_wn,
    stride_ot,
    stride_oh,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    # Column blocks vary fastest: the programs sharing a tile of rows run together.
    _head_bmm_tile(
        tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2),
        a, w, out, T, N, K, stride_at, stride_ah, stride_wh, stride_wk, stride_wn, stride_ot,
        stride_oh, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _head_bmm_tile(
    pid_n,
    h,
    pid_m,
    a,
    w,
    out,
    T,
    N,
    K,
    stride_at,
    stride_ah,
    stride_wh,
    stride_wk,
    stride_wn,
    stride_ot,
    stride_oh,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows `pid_m * BLOCK_M ...` and columns `pid_n * BLOCK_N ...` of head `h` (int64)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < N
    a_ptrs = a + rows[:, None].to(tl.int64) * stride_at + h * stride_ah + ks[None, :]
    w_ptrs = w + h * stride_wh + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a_tile = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a_tile, w_tile, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    o_ptrs = out + rows[:, None].to(tl.int64) * stride_ot + h * stride_oh + cols[None, :]
    tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def mla_absorb_latent_kernel(
    a,
    w,
    out,
    T,
    N,
    K,
    stride_at,
    stride_ah,
    stride_wh,
    stride_wk,
    stride_wn,
    stride_ot,
    stride_oh,
    HEADS,
    q_pe_ptr,
    c_kv_ptr,
    k_pe_ptr,
    q_out_ptr,
    c_out_ptr,
    k_out_ptr,
    latent_cache_ptr,
    pe_cache_ptr,
    pos_ptr,
    slots_ptr,
    cos_ptr,
    sin_ptr,
    norm_ptr,
    eps,
    rank,
    stride_qt,
    stride_qh,
    stride_ct,
    stride_kt,
    stride_qot,
    stride_qoh,
    stride_cot,
    stride_kot,
    stride_latent,
    stride_pe,
    stride_table,
    num_tokens,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HQ: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    RETURN_KV: tl.constexpr,
    TOKENS: tl.constexpr,
    PDL: tl.constexpr,
):
    """`head_bmm_kernel`'s programs, then `fused.mla_latent_rope_store`'s, in one launch of
    one axis: the query's absorption and the latent side of an MLA decode step read only the
    fused query-and-latent product, so neither waits for the other."""
    pdl.trigger_early(PDL)
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(N, BLOCK_N)
    products = col_blocks * HEADS * tl.cdiv(T, BLOCK_M)
    if pid < products:
        pdl.wait(PDL)
        _head_bmm_tile(
            pid % col_blocks, ((pid // col_blocks) % HEADS).to(tl.int64),
            pid // (col_blocks * HEADS),
            a, w, out, T, N, K, stride_at, stride_ah, stride_wh, stride_wk, stride_wn,
            stride_ot, stride_oh, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        j = pid - products
        fused.mla_latent_program(
            j // (HQ + 1), j % (HQ + 1),
            q_pe_ptr, c_kv_ptr, k_pe_ptr, q_out_ptr, c_out_ptr, k_out_ptr, latent_cache_ptr,
            pe_cache_ptr, pos_ptr, slots_ptr, cos_ptr, sin_ptr, norm_ptr, eps, rank,
            stride_qt, stride_qh, stride_ct, stride_kt, stride_qot, stride_qoh, stride_cot,
            stride_kot, stride_latent, stride_pe, stride_table, num_tokens,
            HQ, HALF, BLOCK, BLOCK_R, INTERLEAVED, RETURN_KV, TOKENS, PDL,
        )  # fmt: skip


@triton.jit
def combine_head_bmm_kernel(
    mid_out,  # [T, H, S, K] float32: the MLA decode's ranges' partials
    mid_lse,  # [T, H, S] float32
    w,  # [H, K, N], unit stride in K (W_UV transposed, as a view of kv_b_proj's weight)
    out,  # [T, H, N], unit stride in N
    N,
    K,
    num_heads,
    stride_wh,
    stride_wn,
    stride_ot,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """Columns `pid_n * BLOCK_N ...` of head h's output for row t: the program's `[BLOCK_N,
    K]` slab of W loaded before the PDL wait (it streams in while the MLA decode runs), then
    head h's combined latent output (`mla_decode.combine_columns`, rounded to the output's
    dtype as the combine launch's store rounds it) multiplied by it on the CUDA cores."""
    pid_n, h, t = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    k_ok = ks < K
    held = tl.load(
        w + h * stride_wh + cols[:, None] * stride_wn + ks[None, :],
        mask=col_ok[:, None] & k_ok[None, :],
        other=0.0,
    )  # [BLOCK_N, BLOCK_K]
    pdl.start(PDL)
    latent = combine_columns(mid_out, mid_lse, t, h, num_heads, K, ks, k_ok, NUM_SPLITS, BLOCK_S)
    latent = latent.to(out.dtype.element_ty).to(tl.float32)
    acc = tl.sum(held.to(tl.float32) * latent[None, :], axis=1)  # [BLOCK_N]
    tl.store(out + t * stride_ot + h * stride_oh + cols, acc.to(out.dtype.element_ty), mask=col_ok)


# Output columns a program of `combine_head_bmm_kernel` takes: Moonlight's W_UV (16 heads x 128
# columns x 512) in 128 programs of 16 KB.
COMBINE_BLOCK_N = 16


def combine_head_bmm(pending: PendingCombine, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`head_bmm(latent, w, out)` where `latent` is what the MLA decode's combine launch would
    have written from `pending` (`mla_decode(..., defer_combine=True)`): one launch instead of
    two. w `[H, K, N]` with unit stride in K (W_UV transposed), out `[T, H, N]` (unit stride in
    N); writes and returns `out`. The combined values are the combine launch's, rounded to
    `pending.dtype` as it stores them; the product sums in float32 in another order than
    `head_bmm`'s tiles (the last bit of the output may differ)."""
    t, heads, k = pending.shape
    splits = pending.mid_out.shape[2]
    n = w.shape[2]
    if w.shape[:2] != (heads, k) or out.shape != (t, heads, n):
        raise ValueError(
            f"combine_head_bmm shapes do not match: partials {tuple(pending.mid_out.shape)}, "
            f"w {tuple(w.shape)}, out {tuple(out.shape)}"
        )
    if w.stride(1) != 1 or out.stride(2) != 1:
        raise ValueError("combine_head_bmm needs unit stride in w's K and out's last dim")
    if out.dtype != pending.dtype:
        raise ValueError(f"out is {out.dtype} but the decode's output is {pending.dtype}")
    if t == 0:
        return out
    block_n = min(COMBINE_BLOCK_N, triton.next_power_of_2(n))
    combine_head_bmm_kernel[(triton.cdiv(n, block_n), heads, t)](
        pending.mid_out, pending.mid_lse, w, out, n, k, heads, w.stride(0), w.stride(2),
        out.stride(0), out.stride(1), NUM_SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(k), num_warps=4,
        **pdl.launch_args(pending.mid_out, trigger_first=pdl.trigger_first(t)),
    )  # fmt: skip
    return out


def head_bmm_tiles(t: int, heads: int, n: int, num_sms: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): row tiles of 16 to 64 (the rows a decode step has), and column
    blocks narrowed from 128 until the launch has about two programs an SM (at one row
    Moonlight's W_UV has 16 heads x 128 columns: 64 programs of 32)."""
    block_m = 16 if t <= 16 else 32 if t <= 32 else 64
    block_n = min(128, max(32, triton.next_power_of_2(n)))
    while block_n > 32 and triton.cdiv(t, block_m) * heads * triton.cdiv(n, block_n) < 2 * num_sms:
        block_n //= 2
    return block_m, block_n


def head_bmm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out[t, h] = a[t, h] @ w[h]` for a `[T, H, K]` (unit stride in K), w `[H, K, N]` (any
    strides) and out `[T, H, N]` (unit stride in N); writes and returns `out`."""
    args, constexprs, grid = _product_launch(a, w, out)
    if a.shape[0] == 0:
        return out
    early = pdl.trigger_first(a.shape[0])  # at batch 1 MLA's O loads its weight meanwhile
    head_bmm_kernel[grid](
        *args, **constexprs, num_warps=4, num_stages=3, **pdl.launch_args(a, trigger_first=early)
    )
    return out


def absorb_query_and_latent(
    q_nope: torch.Tensor,
    w_uk: torch.Tensor,
    latent: fused.MLALatentLaunch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_bmm(q_nope, w_uk)` (MLA's latent queries) and the latent side `latent` (a
    `fused.MLALatentLaunch` of a decode step, without `return_kv`) in one launch: `(q_latent
    [T, H, R], rope(q_pe))`. The same code as the two launches, so the same values bit for
    bit, but for the latent's RMS sum: the launch's 4 warps reduce it in another order than
    `mla_latent_rope_store`'s 1 warp on the GPU (the interpreter's sum is the same)."""
    t, heads, _ = q_nope.shape
    if latent.c_out is not None:
        raise ValueError("the absorbed launch is for decode: return_kv is extend's")
    if latent.q_out.shape[0] != t:
        raise ValueError(f"{t} query rows but a latent launch of {latent.q_out.shape[0]}")
    out = q_nope.new_empty(t, heads, w_uk.shape[2])
    args, constexprs, grid = _product_launch(q_nope, w_uk, out)
    if t == 0:
        return out, latent.q_out
    programs = grid[0] * grid[1] * grid[2] + latent.grid[0] * latent.grid[1]
    mla_absorb_latent_kernel[(programs,)](
        *args, heads, *latent.args, **constexprs, **latent.constexprs,
        num_warps=4, num_stages=3, **pdl.launch_args(q_nope),
    )  # fmt: skip
    return out, latent.q_out


def _product_launch(
    a: torch.Tensor, w: torch.Tensor, out: torch.Tensor
) -> tuple[tuple[object, ...], dict[str, object], tuple[int, int, int]]:
    """`head_bmm_kernel`'s arguments, constexprs and grid for these operands, checked."""
    t, heads, k = a.shape
    n = w.shape[2]
    if w.shape[:2] != (heads, k) or out.shape != (t, heads, n):
        raise ValueError(f"head_bmm shapes do not match: a {a.shape}, w {w.shape}, out {out.shape}")
    if a.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("head_bmm needs unit stride in the last dim of a and out")
    block_m, block_n = head_bmm_tiles(max(t, 1), heads, n, sm_count(a.device))
    grid = (triton.cdiv(n, block_n), heads, triton.cdiv(t, block_m))
    args = (
        a, w, out, t, n, k, a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
    )  # fmt: skip
    constexprs = {
        "PRECISION": dot_precision(a),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": 64 if k >= 64 else max(16, triton.next_power_of_2(k)),
    }
    return args, constexprs, grid
