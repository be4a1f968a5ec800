"""Multi-head latent attention prefill/extend in Triton, in the non-absorbed form.

DeepSeek-V3, Kimi-K2 and Moonlight cache one latent `c` `[R]` and one rotary key `k_pe` `[P]`
per token. For an extend step the caller up-projects each sequence's whole context (the cached
prefix's latents gathered from the paged pool, then the new tokens') with `kv_b_proj` into
per-head no-rope keys `k_nope` `[L, H, Dn]` and values `v` `[L, H, Dv]`; this kernel then runs
causal flash attention of the new tokens' queries over them, with the rotary key shared by the
heads:

    out[t, h] = softmax_j(scale * (q_nope[t, h] . k_nope[j, h] + q_pe[t, h] . k_pe[j])) @ v[:, h]

Why not absorbed: per query, per context token and head, the absorbed form does about
2 (R + P) + 2 R = 2,176 FLOPs (R = 512, P = 64); this one 2 (Dn + P) + 2 Dv = 640 (Dn = Dv =
128), plus the up-projection of every context token once per step (2 R H (Dn + Dv) FLOPs,
shared by all its queries). From a few dozen new tokens per sequence on, the non-absorbed form
does less work; for one token over a long prefix (decode) the absorbed form wins, which is why
decode runs `mla_decode`.

Layout: the new queries are flattened `[T, H, *]` (sequence b's from row `q_starts[b]`), the
context `[L, ...]` (sequence b's `prefix_lens[b] + extend_lens[b]` tokens from row
`kv_starts[b]`, in position order). Variable lengths, no padding: the host lists the
`(sequence, first query)` of every query block (`attention.extend_blocks`). The scores are
two dots (Dn and P wide, each a power of two for the published models), so a 192-wide key
costs no padding to 256. Softmax in float32, log2 domain, the tile step shared with the other
attention kernels (`attention.online_softmax_step`). `Tiles(tma=True)` loads the context's
tiles (k_nope, k_pe, v) by TMA descriptors where their layouts allow (16-byte aligned bases and
strides), else by pointers; not yet the default (not timed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import tma
from engine.kernels.attention import LOG2E, dot_precision, online_softmax_step
from engine.kernels.sms import H200_SHARED_MEMORY, shared_memory


@triton.jit
def mla_extend_kernel(
    q_nope_ptr,  # [T, H, Dn]
    q_pe_ptr,  # [T, H, P]
    k_nope_ptr,  # [L, H, Dn]
    k_pe_ptr,  # [L, P]
    v_ptr,  # [L, H, Dv]
    k_nope_desc,  # TMA: k_nope's descriptor, [BLOCK_N, 1, BLOCK_NOPE] blocks; else None
    k_pe_desc,  # TMA: [BLOCK_N, BLOCK_ROPE] blocks
    v_desc,  # TMA: [BLOCK_N, 1, BLOCK_DV] blocks
    out_ptr,  # [T, H, Dv]
    prefix_lens_ptr,
    extend_lens_ptr,
    q_starts_ptr,
    kv_starts_ptr,
    block_seq_ptr,
    block_first_ptr,
    scale,
    stride_qnt,
    stride_qnh,
    stride_qpt,
    stride_qph,
    stride_knt,
    stride_knh,
    stride_kpt,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    D_NOPE: tl.constexpr,
    D_ROPE: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_NOPE: tl.constexpr,
    BLOCK_ROPE: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    # TMA: the context's tiles come through the tensor-memory accelerator, rows past L and
    # columns past D filled with zeros; in the causal diagonal a tile may reach into the next
    # sequence's rows, which the mask drops (finite values, weighted by zero).
    # Query blocks vary fastest: the blocks of one sequence and head, which read the same keys
    # and values, run side by side and share them through L2. Last block first: a block's work
    # grows with its position (causal), so that no long block is left for the tail.
    blk = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.load(block_seq_ptr + blk)
    first = tl.load(block_first_ptr + blk)  # index of the block's first query within sequence b
    prefix = tl.load(prefix_lens_ptr + b)
    ext = tl.load(extend_lens_ptr + b)
    q_row = tl.load(q_starts_ptr + b).to(tl.int64) + first  # the block's first query in [T]
    kv_start = tl.load(kv_starts_ptr + b).to(tl.int64)
    mi = tl.arange(0, BLOCK_M)
    ni = tl.arange(0, BLOCK_N)
    dn = tl.arange(0, BLOCK_NOPE)
    dp = tl.arange(0, BLOCK_ROPE)
    dv = tl.arange(0, BLOCK_DV)
    m_ok = first + mi < ext
    q_pos = prefix + first + mi  # [M] absolute positions
    q_nope = tl.load(
        q_nope_ptr + q_row * stride_qnt + h * stride_qnh + (mi[:, None] * stride_qnt + dn[None, :]),
        mask=m_ok[:, None] & (dn[None, :] < D_NOPE),
        other=0.0,
    )  # [M, Dn]
    q_pe = tl.load(
        q_pe_ptr + q_row * stride_qpt + h * stride_qph + (mi[:, None] * stride_qpt + dp[None, :]),
        mask=m_ok[:, None] & (dp[None, :] < D_ROPE),
        other=0.0,
    )  # [M, P]
    # Scalar 64-bit bases advanced by a tile per step, and loop-invariant 32-bit tile offsets:
    # per-element 64-bit addresses kept across the loop spill registers on sm_90.
    k_nope_base = k_nope_ptr + kv_start * stride_knt + h * stride_knh
    k_pe_base = k_pe_ptr + kv_start * stride_kpt
    v_base = v_ptr + kv_start * stride_vt + h * stride_vh
    k_nope_offs = ni[:, None] * stride_knt + dn[None, :]  # [N, Dn]
    k_pe_offs = ni[:, None] * stride_kpt + dp[None, :]  # [N, P]
    v_offs = ni[:, None] * stride_vt + dv[None, :]  # [N, Dv]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    nope_ok = dn[None, :] < D_NOPE
    rope_ok = dp[None, :] < D_ROPE
    dv_ok = dv[None, :] < D_V
    head = tl.program_id(1)  # 32-bit, for the descriptors' coordinates
    row = kv_start.to(tl.int32)  # the tile's first context row, for the descriptors
    # Keys before the block's first query are seen by every query of the block: whole tiles of
    # them need no mask; the loop after masks the rest (the causal diagonal).
    full_end = (prefix + first) // BLOCK_N * BLOCK_N
    for _ in range(0, full_end, BLOCK_N):
        if TMA:
            k_nope = k_nope_desc.load([row, head, 0]).reshape(BLOCK_N, BLOCK_NOPE)
            k_pe = k_pe_desc.load([row, 0])
        else:
            k_nope = tl.load(k_nope_base + k_nope_offs, mask=nope_ok, other=0.0)  # [N, Dn]
            k_pe = tl.load(k_pe_base + k_pe_offs, mask=rope_ok, other=0.0)  # [N, P]
        s = tl.dot(q_nope, tl.trans(k_nope), input_precision=PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=PRECISION) * scale  # [M, N]
        if TMA:
            v = v_desc.load([row, head, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v = tl.load(v_base + v_offs, mask=dv_ok, other=0.0)
        m, l_sum, acc = online_softmax_step(s, v, m, l_sum, acc, PRECISION)
        k_nope_base += BLOCK_N * stride_knt
        k_pe_base += BLOCK_N * stride_kpt
        v_base += BLOCK_N * stride_vt
        row += BLOCK_N
    kv_end = tl.minimum(prefix + first + BLOCK_M, prefix + ext)  # keys the block can see
    for n0 in range(full_end, kv_end, BLOCK_N):
        offs = n0 + ni
        n_ok = offs < kv_end
        if TMA:
            k_nope = k_nope_desc.load([row, head, 0]).reshape(BLOCK_N, BLOCK_NOPE)
            k_pe = k_pe_desc.load([row, 0])
        else:
            k_nope = tl.load(k_nope_base + k_nope_offs, mask=n_ok[:, None] & nope_ok, other=0.0)
            k_pe = tl.load(k_pe_base + k_pe_offs, mask=n_ok[:, None] & rope_ok, other=0.0)
        s = tl.dot(q_nope, tl.trans(k_nope), input_precision=PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=PRECISION) * scale  # [M, N]
        # Causal: query at q_pos sees keys 0..q_pos. Key 0 is always visible, so no row is
        # ever fully masked (padded query rows included).
        s = tl.where((offs[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        if TMA:
            v = v_desc.load([row, head, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v = tl.load(v_base + v_offs, mask=n_ok[:, None] & dv_ok, other=0.0)
        m, l_sum, acc = online_softmax_step(s, v, m, l_sum, acc, PRECISION)
        k_nope_base += BLOCK_N * stride_knt
        k_pe_base += BLOCK_N * stride_kpt
        v_base += BLOCK_N * stride_vt
        row += BLOCK_N
    tl.store(
        out_ptr + q_row * stride_ot + h * stride_oh + (mi[:, None] * stride_ot + dv[None, :]),
        (acc / l_sum[:, None]).to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & (dv[None, :] < D_V),
    )


@dataclass(frozen=True)
class Tiles:
    """Launch shape: `block_m` queries and `block_n` keys per tile (the query blocks a step
    lists with `attention.extend_blocks` must use this `block_m`)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 2
    tma: bool = False  # the context's tiles through the tensor-memory accelerator


# The shared memory a program needs for the 16-bit default tiles, with margin: 172 KB compiled
# for sm_90 and 128 KB for sm_89 (`bench.compile_kernels`, the launch's aligned pointers).
# Devices with less (an L40S's, A10's or RTX card's 99 KB) take `SMALL_SHARED_TILES`.
DEFAULT_TILES_SHARED = 135168
# 128 queries x 32 keys, 8 warps, 3 stages: 88 KB on sm_89 without spills (128 x 64 in two
# stages spills; 64 x 64 spills in two and three). Chosen by the compile, not timed: no such
# device is lent here.
SMALL_SHARED_TILES = Tiles(128, 32, 8, 3)


def default_tiles(dtype: torch.dtype, shared: int = H200_SHARED_MEMORY) -> Tiles:
    """The tiles measured fastest on the H200 at DeepSeek-V3's head dims, 16 heads
    (`python -m bench.mla_kernel --mode extend --extend-cases 64x128 8x2048 1x8192 --block-m M
    --block-n N --num-warps W --num-stages S`, µs of the kernel alone): 128 x 64 keys, 8 warps,
    3 stages took 75 / 551 / 1,004 µs where the earlier default, the largest tiles without
    register spills (64 x 32, 8 warps, 2 stages), took 85 / 1,100 / - (its 64 B of spills
    cost less than the smaller tiles' extra passes; 64 x 64 x 4 warps: 62 / 573 / 1,088;
    128 x 128: 80 / 604 / 1,099). With the unmasked loop over the keys before each block and
    the longest blocks first, 128 x 64 took 82 / 449 µs at 64 x 128 and 8 x 2,048 (Moonlight's
    16 heads); 128 x 128 with 3 stages does not fit the shared memory (288 KB). float32 (exact
    checks only) needs small ones. A device with less than `DEFAULT_TILES_SHARED` of `shared`
    memory a program takes `SMALL_SHARED_TILES` (the same 128 queries a block)."""
    if dtype == torch.float32:
        return Tiles(16, 32, 4, 1)
    if shared < DEFAULT_TILES_SHARED:
        return SMALL_SHARED_TILES
    return Tiles(128, 64, 8, 3)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def mla_extend_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    q_starts: torch.Tensor,
    kv_starts: torch.Tensor,
    block_seq: torch.Tensor,
    block_first: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """Causal non-absorbed MLA of the new tokens over their sequences' up-projected context.

    `q_nope` `[T, H, Dn]`, `q_pe` `[T, H, P]` (rotated); `k_nope` `[L, H, Dn]`, `k_pe` `[L, P]`
    or `[L, 1, P]` (rotated, shared by the heads), `v` `[L, H, Dv]`; any strides but a
    contiguous last dim (`k_nope` and `v` may be views into one up-projection). Sequence b's
    queries sit at rows `q_starts[b]` onwards of `q_*` (`extend_lens[b]` of them, at positions
    `prefix_lens[b]` onwards), its context at rows `kv_starts[b]` onwards of `k_*`/`v`
    (`prefix_lens[b] + extend_lens[b]` of them). `block_seq`/`block_first` come from
    `attention.extend_blocks(extend_lens, tiles.block_m)`, `tiles` defaulting to
    `default_tiles(q_nope.dtype)`. Returns `[T, H, Dv]` in `q_nope`'s dtype.
    """
    t, num_heads, d_nope = q_nope.shape
    d_rope, d_v = q_pe.shape[-1], v.shape[-1]
    k_pe = k_pe.reshape(k_pe.shape[0], d_rope) if k_pe.dim() == 3 else k_pe
    if k_nope.shape[1:] != (num_heads, d_nope) or v.shape[1] != num_heads:
        raise ValueError(
            f"k_nope {tuple(k_nope.shape)} and v {tuple(v.shape)} do not match q_nope's "
            f"{num_heads} heads of {d_nope}"
        )
    if k_pe.shape[-1] != d_rope or not k_nope.shape[0] == k_pe.shape[0] == v.shape[0]:
        raise ValueError(
            f"context tensors disagree: k_nope {tuple(k_nope.shape)}, k_pe "
            f"{tuple(k_pe.shape)}, v {tuple(v.shape)} (q_pe is {d_rope} wide)"
        )
    if out is None:
        out = q_nope.new_empty(t, num_heads, d_v)
    nblocks = block_seq.shape[0]
    if t == 0 or nblocks == 0:
        return out
    q_nope, q_pe, k_nope, k_pe, v = map(_last_dim_contiguous, (q_nope, q_pe, k_nope, k_pe, v))
    # tl.dot needs every dimension to be at least 16 on the GPU.
    block_nope = max(16, triton.next_power_of_2(d_nope))
    block_rope = max(16, triton.next_power_of_2(d_rope))
    block_dv = max(16, triton.next_power_of_2(d_v))
    tiles = tiles or default_tiles(q_nope.dtype, shared_memory(q_nope.device))
    use_tma = tiles.tma and tma.ready(k_nope, k_pe, v)
    descriptors: tuple[object, object, object] = (None, None, None)
    if use_tma:
        descriptors = (
            tma.descriptor(k_nope, [tiles.block_n, 1, block_nope]),
            tma.descriptor(k_pe, [tiles.block_n, block_rope]),
            tma.descriptor(v, [tiles.block_n, 1, block_dv]),
        )
    mla_extend_kernel[(nblocks, num_heads)](
        q_nope,
        q_pe,
        k_nope,
        k_pe,
        v,
        *descriptors,
        out,
        prefix_lens,
        extend_lens,
        q_starts,
        kv_starts,
        block_seq,
        block_first,
        scale * LOG2E,
        q_nope.stride(0),
        q_nope.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        k_nope.stride(0),
        k_nope.stride(1),
        k_pe.stride(0),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        D_NOPE=d_nope,
        D_ROPE=d_rope,
        D_V=d_v,
        BLOCK_NOPE=block_nope,
        BLOCK_ROPE=block_rope,
        BLOCK_DV=block_dv,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        PRECISION=dot_precision(q_nope),
        TMA=use_tma,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out
