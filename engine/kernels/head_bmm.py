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

from engine.kernels import pdl
from engine.kernels.attention import dot_precision
from engine.kernels.sms import sm_count


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
    pid_n, h, pid_m = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
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
    t, heads, k = a.shape
    n = w.shape[2]
    if w.shape[:2] != (heads, k) or out.shape != (t, heads, n):
        raise ValueError(f"head_bmm shapes do not match: a {a.shape}, w {w.shape}, out {out.shape}")
    if a.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("head_bmm needs unit stride in the last dim of a and out")
    if t == 0:
        return out
    block_m, block_n = head_bmm_tiles(t, heads, n, sm_count(a.device))
    grid = (triton.cdiv(n, block_n), heads, triton.cdiv(t, block_m))
    head_bmm_kernel[grid](
        a,
        w,
        out,
        t,
        n,
        k,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        PRECISION=dot_precision(a),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=64 if k >= 64 else max(16, triton.next_power_of_2(k)),
        num_warps=4,
        num_stages=3,
        **pdl.launch_args(a),
    )
    return out
