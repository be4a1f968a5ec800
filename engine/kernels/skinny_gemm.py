"""A skinny GEMM in Triton: `y = x @ weight.T (+ bias)` for a few rows of `x`, as in decode.

At decode batch 1-16 a linear layer is a stream of its weight: `W` `[N, K]` is megabytes,
`x` `[M, K]` and `y` `[M, N]` kilobytes, so its time is W's bytes over the memory bandwidth
plus what the kernel loses ramping up and draining. On the H200 cuBLAS streams Llama-3-8B's
large projections near the copy rate but the 34-50 MB ones (QKV, O) at about 74% of it, and
splits some of them over K with a second reduce launch. This kernel is written for the
stream:

- Program `(i, s)` owns rows `i * block_n ...` of `W` (output columns of `y`) and the `s`-th
  of `split_k` equal runs of K; it reads its slab of `W` once, each `[block_n, block_k]` tile
  coalesced along K, and all M rows of `x` with it (x is tiny: L1/L2 serve its re-reads).
  More rows than one program holds (`MAX_BLOCK_M`, `MAX_BLOCK_M_FMA`) take more programs
  along a third grid axis, each reading W again: correct, but not what this kernel is for.
- Tiles with `dot` multiply on the tensor cores, `acc[n, m] += W_tile @ x_tile.T` (M padded
  to 16); without, on the CUDA cores (one row: products accumulated unreduced, summed over K
  once at the end; a few rows: summed per tile), which keep up with the stream at one or two
  rows and take W straight from global memory into registers.
- Sums are float32; the output is rounded once to x's dtype after the bias is added.
- `split_k == 1` (the default rule's choice for the shapes it knows) writes `y` directly.
  With more splits, each writes a float32 partial and a second launch adds them in split
  order: no atomics, so the result is bitwise the same on every run (greedy decoding stays
  token-exact run to run). Different tiles sum in different orders and agree only to
  rounding.

The tile rule `pick_tiles` is reasoned, not yet measured: the widest `block_n` that still
gives two programs per SM of a 132-SM H100/H200 (so every SM streams, with no second wave),
K tiles of 512 bytes a row, no split unless N is too small to fill the device that way.
`python -m bench.skinny_gemm` times every entry of `TILE_CONFIGS` against cuBLAS on
Llama-3-8B's projections on the GPU; the rule is to be set from that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from engine.kernels.attention import dot_precision

SM_COUNT = 132  # H100/H200: the device the rule's program counts are for
# Rows of x per program, with and without the tensor cores (the CUDA-core products hold
# rows x block_n x block_k values); more rows take more programs, each reading W again.
MAX_BLOCK_M = 64
MAX_BLOCK_M_FMA = 4


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
):
    # DIRECT (one split): y itself, with the bias; else this split's float32 partial.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of W = columns of y
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of x and y
    n_ok = rows_n < N
    m_ok = rows_m < M
    k_start = pid_s * split_len
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
    # The tensor cores accumulate y.T [BN, BM]; the CUDA cores y [BM, BN], or for one row the
    # unreduced products [BN, BK], summed over K once after the loop.
    if DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, tl.minimum(split_len, K - k_start), BLOCK_K):
        if EVEN_K:  # every tile whole: only the row masks, which do not change along K
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)  # [BN, BK]
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)  # [BM, BK]
        else:
            k_ok = (k_start + k0 + offs_k < K)[None, :]
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok, other=0.0)
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok, other=0.0)
        if DOT:
            acc += tl.dot(w, tl.trans(x), input_precision=PRECISION)
        elif BLOCK_M == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # [BM, BN, BK]
            acc += tl.sum(prod, 2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if DOT:
        acc = tl.trans(acc)
    elif BLOCK_M == 1:
        acc = tl.sum(acc, 1)[None, :]
    # acc: [BM, BN]
    mask = m_ok[:, None] & n_ok[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + rows_m.to(tl.int64)[:, None] * stride_ym + rows_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part = part_ptr + pid_s * stride_ps + rows_m[:, None] * stride_pm + rows_n[None, :]
        tl.store(part, acc, mask=mask)


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
):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT_K):  # in split order: the same sum on every run
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
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

    def __post_init__(self) -> None:
        smallest = 16 if self.dot else 1
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < smallest or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {smallest}, got {value}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, num_warps and num_stages must be >= 1 in {self}")

    def label(self) -> str:
        kind = "dot" if self.dot else "fma"
        split = f" split {self.split_k}" if self.split_k > 1 else ""
        return f"{kind} {self.block_n}x{self.block_k}{split} w{self.num_warps} s{self.num_stages}"


# The configurations bench.skinny_gemm compares, for 16-bit weights (K tiles of 512 bytes a
# row; the rule halves block_k for float32). The rule picks from the first four.
GEMV_TILES = SkinnyTiles(16, 256, dot=False)  # one or two rows: CUDA cores, no shared memory
DOT_TILES = (  # widest first: 64 for N of 28k and more, 16 for 4-6k (256-384 programs)
    SkinnyTiles(64, 128),
    SkinnyTiles(32, 256),
    SkinnyTiles(16, 256),
)
TILE_CONFIGS: tuple[SkinnyTiles, ...] = (
    GEMV_TILES,
    *DOT_TILES,
    SkinnyTiles(16, 256, split_k=2),  # long K (down: 14,336) over more programs, + a sum
    SkinnyTiles(32, 256, split_k=2),  # x is re-read per W tile: M / block_n of W's traffic
)


def pick_tiles(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> SkinnyTiles:
    """The rule: CUDA-core products for one or two rows; else the widest `block_n` of
    `DOT_TILES` that still gives two programs per SM; K split only when even that leaves SMs
    idle (into as many splits as make two programs per SM, each of four K tiles or more)."""
    if m <= 2:
        tiles = GEMV_TILES
    else:
        fills = (t for t in DOT_TILES if triton.cdiv(n, t.block_n) >= 2 * SM_COUNT)
        tiles = next(fills, DOT_TILES[-1])
    programs = triton.cdiv(n, tiles.block_n)
    block_k = tiles.block_k // 2 if dtype == torch.float32 else tiles.block_k
    split_k = 1
    if programs < SM_COUNT:
        split_k = max(1, min(triton.cdiv(2 * SM_COUNT, programs), k // (4 * block_k)))
    return replace(tiles, block_k=block_k, split_k=split_k)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: SkinnyTiles | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for `x` `[..., K]` of few rows and `weight` `[N, K]` (as
    nn.Linear stores it), both of one dtype (float32, float16 or bfloat16); `bias` `[N]` of
    any float dtype. Sums in float32 and returns `[..., N]` in x's dtype. `tiles`: the launch
    (default `pick_tiles` of the shape); every split count gives the same result on every
    run."""
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    if weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    n = weight.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
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
        y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
        return y.view(*x.shape[:-1], n)
    tiles = tiles or pick_tiles(m, n, k, x.dtype)
    if tiles.dot:
        block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(m)))
    else:
        block_m = min(MAX_BLOCK_M_FMA, triton.next_power_of_2(m))
    # Splits of whole K tiles, the last one possibly shorter; no split is empty.
    split_len = triton.cdiv(k, tiles.block_k * tiles.split_k) * tiles.block_k
    split_k = triton.cdiv(k, split_len)
    direct = split_k == 1
    if direct:
        part = y.new_empty(0, 1, 1, dtype=torch.float32)  # not written
    else:
        part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else y  # not read
    _skinny_gemm_kernel[(triton.cdiv(n, tiles.block_n), split_k, triton.cdiv(m, block_m))](
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
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip
    if not direct:
        block = min(1024, triton.next_power_of_2(n))
        _split_sum_kernel[(m, triton.cdiv(n, block))](
            part, bias_arg, y,
            n, part.stride(0), part.stride(1), y.stride(0),
            SPLIT_K=split_k,
            BLOCK=block,
            HAS_BIAS=bias is not None,
            num_warps=4,
        )  # fmt: skip
    return y.view(*x.shape[:-1], n)
