"""Fused small operations of a decoder layer, in Triton: RMSNorm (with the residual add),
SiLU-and-multiply, and rotary embedding.

Each replaces a chain of PyTorch element-wise kernels with one launch (in decode at batch 1 a
Llama layer ran about thirty kernels, most of them a few microseconds of launch and tail for
a few kilobytes of data). Every kernel rounds where the pure-torch path rounds (to the
activation dtype after each operation PyTorch runs in it), so in float32 it agrees with that
path to float32 rounding and in bfloat16 to one bf16 ulp where a reduction's order differs
(the RMS sum). The torch path stays the reference and the CPU/NPU path
(`engine/layers/norm.py`, `rotary.py`, `models/llama.py` choose through `use_fused`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.layers.pending import PendingSum


def use_fused(x: torch.Tensor) -> bool:
    """Whether the layers take these kernels for `x`: on CUDA devices."""
    return x.is_cuda


@triton.jit
def _rms_normalize(x, w, n, eps):
    """`x` (a row of `n` values, zeros past them) RMS-normalised and times `w`, rounded as the
    torch path rounds: the normalised row to x's dtype, the product in float32 (the caller
    casts it once, at its store)."""
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    return (xf * inv).to(x.dtype).to(tl.float32) * w.to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n,
    eps,
    stride_xs,  # PENDING: x_ptr holds parts [rows, S, n], slice s at x_ptr + s * stride_xs
    pw_ptr,  # PENDING with HAS_PW: the slices' weights [rows, S]
    ids_ptr,  # PENDING with HAS_IDS: ids [rows, S]; slices outside [0, num_experts) skipped
    num_experts,
    HAS_RESIDUAL: tl.constexpr,
    PENDING: tl.constexpr,  # S > 0: x is the sum of S slices (engine.layers.pending)
    HAS_PW: tl.constexpr,
    HAS_IDS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    rms_norm_row(
        tl.program_id(0), x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
        stride_xs, pw_ptr, ids_ptr, num_experts, HAS_RESIDUAL, PENDING, HAS_PW, HAS_IDS, BLOCK,
    )  # fmt: skip


@triton.jit
def rms_norm_row(
    row, x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps, stride_xs,
    pw_ptr, ids_ptr, num_experts, HAS_RESIDUAL: tl.constexpr, PENDING: tl.constexpr,
    HAS_PW: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program `row` of `rms_norm`'s launch (also an item of bench.persistent_kernel's)."""
    row = row.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = _row_in(
        x_ptr, out_ptr, row, cols, mask, stride_x, stride_xs, pw_ptr, ids_ptr, num_experts,
        PENDING, HAS_PW, HAS_IDS,
    )  # fmt: skip
    if HAS_RESIDUAL:
        x = _plus_residual(x, res_ptr + row * stride_r, cols, mask)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    y = _rms_normalize(x, tl.load(w_ptr + cols, mask=mask, other=0.0), n, eps)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _plus_residual(x, res_row, cols, mask):
    """x plus the residual stream's row at `res_row`, rounded to x's dtype as torch's add
    rounds."""
    r = tl.load(res_row + cols, mask=mask, other=0.0)
    return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)


@triton.jit
def _row_in(
    x_ptr, out_ptr, row, cols, mask, stride_x, stride_xs, pw_ptr, ids_ptr, num_experts,
    PENDING: tl.constexpr, HAS_PW: tl.constexpr, HAS_IDS: tl.constexpr,
):  # fmt: skip
    """Row `row` of the norm's input: x's, or with PENDING the sum that skinny_gemm's split
    reduce or fused_moe's combine would have stored, in their order and with their rounding
    (to the output's dtype)."""
    if PENDING > 0:
        acc = tl.zeros(cols.shape, tl.float32)
        for s in tl.static_range(PENDING):
            keep = True
            if HAS_IDS:
                e = tl.load(ids_ptr + row * PENDING + s)
                keep = (e >= 0) & (e < num_experts)
            if keep:
                piece = tl.load(x_ptr + row * stride_x + s * stride_xs + cols, mask=mask, other=0.0)
                if HAS_PW:
                    weight = tl.load(pw_ptr + row * PENDING + s).to(tl.float32)
                    acc += weight * piece.to(tl.float32)
                else:
                    acc += piece.to(tl.float32)
        x = acc.to(out_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    return x


@triton.jit
def _rms_norm_gate_kernel(
    x_ptr,
    res_ptr,
    res_out_ptr,  # the new residual stream (not res_ptr: every program reads that one)
    w_ptr,
    out_ptr,
    gate_ptr,  # [num_gate, n], contiguous along n
    logits_ptr,  # [rows, num_gate]
    stride_x,
    stride_r,
    stride_o,
    n,
    eps,
    stride_xs,
    pw_ptr,
    ids_ptr,
    num_experts,
    num_gate,
    stride_g,
    PENDING: tl.constexpr,
    HAS_PW: tl.constexpr,
    HAS_IDS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr,
):
    """`_rms_norm_kernel` and the MoE gate's logits of its output in one launch: program
    (row, j) normalises the row (every program of a row the same way) and takes the logits of
    experts `[j * BLOCK_E, (j + 1) * BLOCK_E)`; program (row, 0) stores the row's output and
    new residual. The gate's rows, a weight no kernel writes, are loaded before the PDL wait:
    where the launch before it lets it be scheduled first (the O projection's preloading tiles
    at batch 1, `skinny_gemm.PRELOAD_TRIGGERS_FIRST`), they arrive while that kernel runs."""
    block_e = tl.program_id(1)
    g = _gate_rows(gate_ptr, block_e, n, num_gate, stride_g, BLOCK, BLOCK_E)
    pdl.start(PDL)
    _rms_norm_gate_rows(
        tl.program_id(0), block_e, g, x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, logits_ptr,
        stride_x, stride_r, stride_o, n, eps, stride_xs, pw_ptr, ids_ptr, num_experts, num_gate,
        PENDING, HAS_PW, HAS_IDS, BLOCK, BLOCK_E,
    )  # fmt: skip


@triton.jit
def _gate_rows(gate_ptr, block_e, n, num_gate, stride_g, BLOCK: tl.constexpr,
               BLOCK_E: tl.constexpr):  # fmt: skip
    """The gate's rows of experts `[block_e * BLOCK_E, ...)`, `[BLOCK_E, BLOCK]`."""
    cols = tl.arange(0, BLOCK)
    experts = block_e * BLOCK_E + tl.arange(0, BLOCK_E)
    return tl.load(
        gate_ptr + experts[:, None] * stride_g + cols[None, :],
        mask=(experts < num_gate)[:, None] & (cols < n)[None, :],
        other=0.0,
    )


@triton.jit
def rms_norm_gate_program(
    row, block_e, x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, gate_ptr, logits_ptr, stride_x,
    stride_r, stride_o, n, eps, stride_xs, pw_ptr, ids_ptr, num_experts, num_gate, stride_g,
    PENDING: tl.constexpr, HAS_PW: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Program `(row, block_e)` of `rms_norm_gate`'s launch (also an item of
    bench.persistent_kernel's)."""
    g = _gate_rows(gate_ptr, block_e, n, num_gate, stride_g, BLOCK, BLOCK_E)
    _rms_norm_gate_rows(
        row, block_e, g, x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, logits_ptr, stride_x,
        stride_r, stride_o, n, eps, stride_xs, pw_ptr, ids_ptr, num_experts, num_gate, PENDING,
        HAS_PW, HAS_IDS, BLOCK, BLOCK_E,
    )  # fmt: skip


@triton.jit
def _rms_norm_gate_rows(
    row, block_e, g, x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, logits_ptr, stride_x, stride_r,
    stride_o, n, eps, stride_xs, pw_ptr, ids_ptr, num_experts, num_gate, PENDING: tl.constexpr,
    HAS_PW: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """`rms_norm_gate_program` with the gate's rows `g` (`_gate_rows`) already loaded."""
    row = row.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = _row_in(
        x_ptr, out_ptr, row, cols, mask, stride_x, stride_xs, pw_ptr, ids_ptr, num_experts,
        PENDING, HAS_PW, HAS_IDS,
    )  # fmt: skip
    x = _plus_residual(x, res_ptr + row * stride_r, cols, mask)
    if block_e == 0:
        tl.store(res_out_ptr + row * stride_r + cols, x, mask=mask)
    y = _rms_normalize(x, tl.load(w_ptr + cols, mask=mask, other=0.0), n, eps)
    y = y.to(out_ptr.dtype.element_ty)  # what the gate reads: the stored output
    if block_e == 0:
        tl.store(out_ptr + row * stride_o + cols, y, mask=mask)
    experts = block_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = experts < num_gate
    # Products and sums in float32, as router_logits_kernel's (up to summation order).
    logits = tl.sum(g.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)
    tl.store(
        logits_ptr + row * num_gate + experts, logits.to(logits_ptr.dtype.element_ty), mask=e_ok
    )


def rms_norm(
    x: torch.Tensor | PendingSum,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """`weight * rmsnorm(x)` over the last dimension of `x` `[..., n]`. With `residual` (same
    shape, contiguous), first `residual += x` in place and normalise that sum instead. `x` may
    be a `PendingSum` (`[T, n]` once summed): the kernel takes its sum first. `num_warps`: the
    launch's (default by n; the warps set the order of the sum of squares on the GPU)."""
    if isinstance(x, PendingSum):
        return _rms_norm_pending(x, weight, eps, residual, num_warps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    if rows == 0:
        return out
    _launch_rms_norm(x2, x2.stride(0), out.view(-1, n), weight, eps, residual, num_warps=num_warps)
    return out


def _rms_norm_pending(
    x: PendingSum,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    num_warps: int | None = None,
) -> torch.Tensor:
    parts = x.parts
    if parts.stride(-1) != 1:
        parts = parts.contiguous()
    rows, _, n = parts.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if out_dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        # The kernel rounds the sum to the output's dtype: where that is not the sum's own,
        # sum first (not a path the models take: their norms' weights share their dtype).
        return rms_norm(x.materialize(), weight, eps, residual, num_warps)
    out = torch.empty(rows, n, dtype=out_dtype, device=parts.device)
    if rows == 0:
        return out
    _launch_rms_norm(
        parts, parts.stride(0), out, weight, eps, residual, x, parts.stride(1), num_warps
    )
    return out


# Gate rows a program of `_rms_norm_gate_kernel` takes: the gate's weight spread over many
# programs, as `router_logits_kernel` spreads it.
GATE_BLOCK_E = 2


def rms_norm_gate(
    x: torch.Tensor | PendingSum,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor,
    gate: torch.Tensor,
    logits_dtype: torch.dtype,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`(rms_norm(x + residual), x + residual, gate logits of that output)` in one launch: the
    norm of `rms_norm(..., residual=residual)` (the new residual stream a new tensor, not
    `residual` updated) and `router_logits(out, gate, out_dtype=logits_dtype)` of its output,
    up to the logits' summation order. None where it does not apply (more rows than
    `ROUTER_SMALL_TOKENS`, whose logits take cuBLAS's product, or dtypes that would round
    differently): the caller then runs the two as before. `num_warps` as `rms_norm`'s."""
    from engine.kernels.moe_routing import ROUTER_SMALL_TOKENS

    parts = x.parts if isinstance(x, PendingSum) else x
    n = parts.shape[-1]
    rows = parts.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if (
        not 0 < rows <= ROUTER_SMALL_TOKENS
        or out_dtype != x.dtype
        or residual.dtype != x.dtype
        or gate.shape[1] != n
        or gate.stride(1) != 1
        or (isinstance(x, torch.Tensor) and (x.dim() != 2 or x.stride(-1) != 1))
        or (isinstance(x, PendingSum) and parts.stride(-1) != 1)
        or not residual.is_contiguous()
    ):
        return None
    out = torch.empty(rows, n, dtype=out_dtype, device=parts.device)
    new_residual = torch.empty_like(residual)
    num_gate = gate.shape[0]
    logits = torch.empty(rows, num_gate, dtype=logits_dtype, device=parts.device)
    pending = x if isinstance(x, PendingSum) else None
    res = residual.view(-1, n)
    block = triton.next_power_of_2(n)
    _rms_norm_gate_kernel[(rows, triton.cdiv(num_gate, GATE_BLOCK_E))](
        parts, res, new_residual.view(-1, n), weight, out, gate, logits,
        parts.stride(0), res.stride(0), out.stride(0),
        n, eps, parts.stride(1) if pending is not None else 0,
        pending.weights if pending is not None and pending.weights is not None else parts,
        pending.ids if pending is not None and pending.ids is not None else parts,
        pending.num_experts if pending is not None else 0,
        num_gate, gate.stride(0),
        PENDING=parts.shape[1] if pending is not None else 0,
        HAS_PW=pending is not None and pending.weights is not None,
        HAS_IDS=pending is not None and pending.ids is not None,
        BLOCK=block,
        BLOCK_E=GATE_BLOCK_E,
        num_warps=num_warps or norm_warps(block),
        **pdl.launch_args(parts, trigger_first=pdl.more_trigger_first(rows)),
    )  # fmt: skip
    return out, new_residual, logits


def _launch_rms_norm(
    x: torch.Tensor,
    stride_x: int,
    out: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    pending: PendingSum | None = None,
    stride_xs: int = 0,
    num_warps: int | None = None,
) -> None:
    """`_rms_norm_kernel` over `out`'s `[rows, n]`, reading rows of `x` (with `pending`, its
    slices `stride_xs` apart)."""
    n = out.shape[1]
    res = out if residual is None else residual.view(-1, n)  # not read without a residual
    pw = pending.weights if pending is not None else None
    ids = pending.ids if pending is not None else None
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(out.shape[0],)](
        x, res, weight, out,
        stride_x, res.stride(0), out.stride(0),
        n, eps, stride_xs,
        pw if pw is not None else x,
        ids if ids is not None else x,
        pending.num_experts if pending is not None else 0,
        HAS_RESIDUAL=residual is not None,
        PENDING=pending.parts.shape[1] if pending is not None else 0,
        HAS_PW=pw is not None,
        HAS_IDS=ids is not None,
        BLOCK=block,
        num_warps=num_warps or norm_warps(block),
        # At one row the projection after the norm (on preloading tiles) loads meanwhile.
        **pdl.launch_args(x, trigger_first=pdl.trigger_first(out.shape[0])),
    )  # fmt: skip


def norm_warps(block: int) -> int:
    """The norm kernels' warps for a row of `block` (a power of two) values."""
    return min(16, max(1, block // 256))


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):  # fmt: skip
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu, rounded to the input's dtype
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `x` `[T, 2n]` holding gate then up; returns `[T, n]`."""
    n = x.shape[-1] // 2
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](
        x2, out, x2.stride(0), out.stride(0), n, BLOCK=block, num_warps=4,
        **pdl.launch_args(x2),
    )  # fmt: skip
    return out


# Whether the decode step's launches that read the step's metadata (positions, cache slots,
# sequence lengths, page-table rows: its inputs, which no kernel of the step writes) read it,
# and what depends only on it (RoPE's cos/sin rows), before their PDL wait: a round of loads
# fewer after it. RoPE with the KV store here (one token a program); the decode attention
# kernels (`attention.METADATA_BEFORE_WAIT`, the same switch). Kernels read it by its bare
# name only: Triton's cache key takes in the values of the globals a kernel names, not of a
# module's attributes (`pdl.X`), so a switch read through a module would compile once for both
# settings. On (H100, `session.sh b35`, two alternations back to back: Qwen3-30B-A3B 1 x 128
# 2.89 / 2.90 ms off against 2.84 / 2.84 on; Moonlight and Llama-3-8B level);
# `PDSERVE_METADATA_BEFORE_WAIT=0` turns it off.
METADATA_BEFORE_WAIT = tl.constexpr(os.environ.get("PDSERVE_METADATA_BEFORE_WAIT", "1") == "1")


@triton.jit
def _rotate_head(
    src, dst, pos, cos_ptr, sin_ptr, stride_table, HALF, BLOCK, INTERLEAVED, w_ptr, eps, NORM
):
    """Rotate one head `src` -> `dst` (contiguous halves): x * cos + rotate_half(x) * sin.
    With NORM, the head is first RMS-normalised with weight `w_ptr` (Qwen3's q/k norm),
    rounded as `_rms_norm_kernel` rounds."""
    c, s = rope_tables(pos, cos_ptr, sin_ptr, stride_table, HALF, BLOCK, src.dtype.element_ty)
    _rotate_head_by(src, dst, c, s, HALF, BLOCK, INTERLEAVED, w_ptr, eps, NORM)


@triton.jit
def rope_tables(pos, cos_ptr, sin_ptr, stride_table, HALF, BLOCK: tl.constexpr,
                DT: tl.constexpr):  # fmt: skip
    """Position `pos`'s cos and sin `[BLOCK]` for `_rotate_head_by`: the table is [cos(f),
    cos(f)] per position (float32), cast to the activations' dtype `DT` (then float32)."""
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    c = tl.load(cos_ptr + pos * stride_table + i, mask=mask, other=0.0).to(DT).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_table + i, mask=mask, other=0.0).to(DT).to(tl.float32)
    return c, s


@triton.jit
def _rotate_head_by(src, dst, c, s, HALF, BLOCK, INTERLEAVED, w_ptr, eps, NORM):
    """`_rotate_head` with its position's `rope_tables` given."""
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    if INTERLEAVED:  # pairs (x0, x1), (x2, x3), ...: de-interleaved into halves on the way
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, HALF + i
    x1 = tl.load(src + i1, mask=mask, other=0.0)
    x2 = tl.load(src + i2, mask=mask, other=0.0)
    dt = x1.dtype
    if NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(f1 * f1, 0) + tl.sum(f2 * f2, 0)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + i1, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + i2, mask=mask, other=0.0).to(tl.float32)
        x1 = ((f1 * inv).to(dt).to(tl.float32) * w1).to(dt)
        x2 = ((f2 * inv).to(dt).to(tl.float32) * w2).to(dt)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # Each product and the sum rounded as torch rounds them.
    o1 = ((a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    tl.store(dst + i, o1, mask=mask)
    tl.store(dst + HALF + i, o2, mask=mask)


@triton.jit
def rotate_group(
    src, stride_h, GROUP, GROUP_PAD, pos, cos_ptr, sin_ptr, stride_table, HALF, INTERLEAVED,
    w_ptr, eps, NORM,
):  # fmt: skip
    """`_rotate_head` of GROUP consecutive heads from `src` (head g at `src + g * stride_h`)
    at once, returned rather than stored: `[GROUP_PAD, 2 * HALF]` in the heads' dtype (rows
    past GROUP zeros), halves contiguous as `_rotate_head` stores them, every value rounded
    as it rounds it. HALF a power of two."""
    g = tl.arange(0, GROUP_PAD)
    i = tl.arange(0, HALF)
    g_ok = (g < GROUP)[:, None]
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, HALF + i
    rows = src + g[:, None] * stride_h
    x1 = tl.load(rows + i1[None, :], mask=g_ok, other=0.0)  # [G, HALF]
    x2 = tl.load(rows + i2[None, :], mask=g_ok, other=0.0)
    dt = x1.dtype
    if NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + i1).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + i2).to(tl.float32)[None, :]
        x1 = ((f1 * inv).to(dt).to(tl.float32) * w1).to(dt)
        x2 = ((f2 * inv).to(dt).to(tl.float32) * w2).to(dt)
    c = tl.load(cos_ptr + pos * stride_table + i).to(dt).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_table + i).to(dt).to(tl.float32)[None, :]
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = ((a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    return tl.reshape(tl.permute(tl.join(o1, o2), (0, 2, 1)), (GROUP_PAD, 2 * HALF))


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_table,
    num_tokens,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    TOKENS: tl.constexpr,
):
    # TOKENS tokens of one head per program (`rope_tokens_per_program`).
    h = tl.program_id(1).to(tl.int64)
    for i in range(TOKENS):
        t = tl.program_id(0).to(tl.int64) * TOKENS + i
        if t < num_tokens:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            src = x_ptr + t * stride_xt + h * stride_xh
            dst = out_ptr + t * stride_ot + h * stride_oh
            _rotate_head(
                src, dst, pos, cos_ptr, sin_ptr, stride_table, HALF, BLOCK, INTERLEAVED,
                cos_ptr, 0.0, False,
            )  # fmt: skip


@triton.jit
def _rope_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    pos_ptr,
    slots_ptr,
    cos_ptr,
    sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    stride_table,
    num_tokens,
    HQ: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    NORM: tl.constexpr,
    TOKENS: tl.constexpr,
    PDL: tl.constexpr,
):
    # One program per TOKENS tokens (`rope_tokens_per_program`) of one head, over the query
    # heads, then the KV heads: a query head is rotated into q_out; a KV head's key is rotated
    # into its cache slot and its value copied there (a slot < 0, a padded row, writes nothing).
    h = tl.program_id(1).to(tl.int64)
    # With METADATA_BEFORE_WAIT, one token a program reads its position, slot and cos/sin rows
    # (the positions and slots are the step's inputs, the tables constants: nothing in the
    # step writes them) before the PDL wait, its head after it.
    EARLY: tl.constexpr = METADATA_BEFORE_WAIT and TOKENS == 1
    pdl.trigger_early(PDL)
    if not EARLY:
        pdl.wait(PDL)
    for i in range(TOKENS):
        t = tl.program_id(0).to(tl.int64) * TOKENS + i
        here = t < num_tokens
        slot, c, s = _rope_token_inputs(
            t, h, here, pos_ptr, slots_ptr, cos_ptr, sin_ptr, stride_table, HQ, HALF, BLOCK,
            q_ptr.dtype.element_ty,
        )  # fmt: skip
        if EARLY:
            pdl.wait(PDL)
        if here:
            _rope_store_head(
                t, h, slot, c, s, q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                q_norm_ptr, k_norm_ptr, eps, stride_qt, stride_qh, stride_kt, stride_kh,
                stride_vt, stride_vh, stride_qot, stride_qoh, stride_kcs, stride_kch, stride_vcs,
                stride_vch, HQ, HALF, BLOCK, DV, BLOCK_DV, INTERLEAVED, NORM,
            )  # fmt: skip


@triton.jit
def _rope_token_inputs(
    t, h, here, pos_ptr, slots_ptr, cos_ptr, sin_ptr, stride_table, HQ: tl.constexpr,
    HALF: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    """Token t's cache slot (for a KV head `h >= HQ`; -1 otherwise or where not `here`) and
    its position's `rope_tables`."""
    pos = tl.load(pos_ptr + t, mask=here, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + t, mask=here & (h >= HQ), other=-1).to(tl.int64)
    c, s = rope_tables(pos, cos_ptr, sin_ptr, stride_table, HALF, BLOCK, DT)
    return slot, c, s


@triton.jit
def _rope_store_head(
    t, h, slot, c, s, q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, q_norm_ptr,
    k_norm_ptr, eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_kcs, stride_kch, stride_vcs, stride_vch, HQ: tl.constexpr,
    HALF: tl.constexpr, BLOCK: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    INTERLEAVED: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """Head h of token t by its position's tables `c`, `s`: a query head rotated into q_out,
    a KV head's key rotated into cache slot `slot` and its value copied there (nothing where
    the slot is < 0)."""
    if h < HQ:
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = q_out_ptr + t * stride_qot + h * stride_qoh
        _rotate_head_by(src, dst, c, s, HALF, BLOCK, INTERLEAVED, q_norm_ptr, eps, NORM)
    elif slot >= 0:
        hk = h - HQ
        src = k_ptr + t * stride_kt + hk * stride_kh
        dst = k_cache_ptr + slot * stride_kcs + hk * stride_kch
        _rotate_head_by(src, dst, c, s, HALF, BLOCK, INTERLEAVED, k_norm_ptr, eps, NORM)
        j = tl.arange(0, BLOCK_DV)
        v = tl.load(v_ptr + t * stride_vt + hk * stride_vh + j, mask=j < DV)
        tl.store(v_cache_ptr + slot * stride_vcs + hk * stride_vch + j, v, mask=j < DV)


def rope_tokens_per_program(tokens: int) -> int:
    """Tokens each RoPE program rotates (of one head). A head of one token is a few hundred
    bytes: at a prefill's thousands of tokens one program each made the launch
    block-scheduling-bound (Qwen3-30B-A3B, 8,192 tokens x 36 heads: 180 µs a layer for 75 MB,
    9x its bytes, on the H200), so long batches take 16 a program; a decode step's few tokens
    keep one each, for enough programs."""
    return 1 if tokens <= 512 else 16


def rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotary embedding of `x` `[T, H, D]` (any strides but the last) at `positions` `[T]`,
    from float32 tables `cos`, `sin` `[max_position, D]`; returns a new contiguous `[T, H,
    D]`, de-interleaved when `interleaved`."""
    tokens, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(tokens, heads, dim, dtype=x.dtype, device=x.device)
    if tokens == 0 or heads == 0:
        return out
    half = dim // 2
    per_program = rope_tokens_per_program(tokens)
    _rope_kernel[(triton.cdiv(tokens, per_program), heads)](
        x, out, positions, cos, sin,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), tokens,
        HALF=half,
        BLOCK=triton.next_power_of_2(half),
        INTERLEAVED=interleaved,
        TOKENS=per_program,
        num_warps=1,
    )  # fmt: skip
    return out


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """`rope` of q `[T, Hq, D]` and k `[T, Hkv, D]`, and the rotated k with v `[T, Hkv, Dv]`
    written into cache slots `slots` `[T]` (`[slots, Hkv, D]` caches; a slot < 0 writes
    nothing), in one launch; returns the rotated q, contiguous. The same values as `rope`
    twice and `attention.store_kv`. `qk_norm` `(q weight, k weight, eps)`: each head is
    first RMS-normalised, as `rms_norm` does (Qwen3)."""
    tokens, num_heads, dim = q.shape
    num_kv_heads, dv = v.shape[1], v.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    out = torch.empty(tokens, num_heads, dim, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    half = dim // 2
    q_w, k_w, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    per_program = rope_tokens_per_program(tokens)
    _rope_store_kv_kernel[(triton.cdiv(tokens, per_program), num_heads + num_kv_heads)](
        q, k, v, out, k_cache, v_cache, positions, slots, cos, sin, q_w, k_w, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), cos.stride(0), tokens,
        TOKENS=per_program,
        HQ=num_heads,
        HALF=half,
        BLOCK=triton.next_power_of_2(half),
        DV=dv,
        BLOCK_DV=triton.next_power_of_2(dv),
        INTERLEAVED=interleaved,
        NORM=qk_norm is not None,
        num_warps=1,
        **pdl.launch_args(q, trigger_first=pdl.more_trigger_first(tokens)),
    )  # fmt: skip
    return out


@triton.jit
def _mla_latent_kernel(
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
    HQ: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    RETURN_KV: tl.constexpr,
    TOKENS: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.trigger_early(PDL)
    mla_latent_program(
        tl.program_id(0), tl.program_id(1),
        q_pe_ptr, c_kv_ptr, k_pe_ptr, q_out_ptr, c_out_ptr, k_out_ptr, latent_cache_ptr,
        pe_cache_ptr, pos_ptr, slots_ptr, cos_ptr, sin_ptr, norm_ptr, eps, rank,
        stride_qt, stride_qh, stride_ct, stride_kt, stride_qot, stride_qoh, stride_cot,
        stride_kot, stride_latent, stride_pe, stride_table, num_tokens,
        HQ, HALF, BLOCK, BLOCK_R, INTERLEAVED, RETURN_KV, TOKENS, PDL,
    )  # fmt: skip


@triton.jit
def mla_latent_program(
    pid_t,
    pid_h,
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
    HQ: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    RETURN_KV: tl.constexpr,
    TOKENS: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Program `(pid_t, pid_h)` of `mla_latent_rope_store`'s launch (also run by
    `head_bmm.mla_absorb_latent_kernel`'s programs past the product's). The caller has run
    `pdl.trigger_early(PDL)`; the program waits (`pdl.wait`) before its first load, or after
    its token's metadata where `METADATA_BEFORE_WAIT`."""
    # One program per TOKENS tokens (`rope_tokens_per_program`) of one query head, then of
    # the shared latent: a query head's rotary part is rotated into q_out; the latent is
    # RMS-normalised and its rotary key rotated, both into the token's cache slot (a slot < 0,
    # a padded row, writes nothing there) and, with RETURN_KV, into c_out and k_out.
    h = pid_h.to(tl.int64)
    # With METADATA_BEFORE_WAIT, one token a program reads its position, slot and cos/sin rows
    # before the PDL wait (as RoPE with the KV store does), its head or latent after it.
    EARLY: tl.constexpr = METADATA_BEFORE_WAIT and TOKENS == 1
    if not EARLY:
        pdl.wait(PDL)
    for i in range(TOKENS):
        t = pid_t.to(tl.int64) * TOKENS + i
        here = t < num_tokens
        slot, c, s = _rope_token_inputs(
            t, h, here, pos_ptr, slots_ptr, cos_ptr, sin_ptr, stride_table, HQ, HALF, BLOCK,
            q_pe_ptr.dtype.element_ty,
        )  # fmt: skip
        if EARLY:
            pdl.wait(PDL)
        if here:
            _mla_latent_head(
                t, h, slot, c, s, q_pe_ptr, c_kv_ptr, k_pe_ptr, q_out_ptr, c_out_ptr, k_out_ptr,
                latent_cache_ptr, pe_cache_ptr, norm_ptr, eps, rank, stride_qt, stride_qh,
                stride_ct, stride_kt, stride_qot, stride_qoh, stride_cot, stride_kot,
                stride_latent, stride_pe, HQ, HALF, BLOCK, BLOCK_R, INTERLEAVED, RETURN_KV,
            )  # fmt: skip


@triton.jit
def _mla_latent_head(
    t, h, slot, c, s, q_pe_ptr, c_kv_ptr, k_pe_ptr, q_out_ptr, c_out_ptr, k_out_ptr,
    latent_cache_ptr, pe_cache_ptr, norm_ptr, eps, rank, stride_qt, stride_qh, stride_ct,
    stride_kt, stride_qot, stride_qoh, stride_cot, stride_kot, stride_latent, stride_pe,
    HQ: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
    INTERLEAVED: tl.constexpr, RETURN_KV: tl.constexpr,
):  # fmt: skip
    """Head h of token t by its position's tables `c`, `s`: a query head's rotary part rotated
    into q_out; the latent (h == HQ) normalised and its rotary key rotated into cache slot
    `slot` (nothing where it is < 0) and, with RETURN_KV, into c_out and k_out."""
    if h < HQ:
        _rotate_head_by(
            q_pe_ptr + t * stride_qt + h * stride_qh,
            q_out_ptr + t * stride_qot + h * stride_qoh,
            c, s, HALF, BLOCK, INTERLEAVED, norm_ptr, 0.0, False,
        )  # fmt: skip
    else:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < rank
        # Rounded as `_rms_norm_kernel` rounds; the product is cast once, at each store.
        x = tl.load(c_kv_ptr + t * stride_ct + r, mask=r_ok, other=0.0)
        w = tl.load(norm_ptr + r, mask=r_ok, other=0.0)
        y = _rms_normalize(x, w, rank, eps)
        k_src = k_pe_ptr + t * stride_kt
        if slot >= 0:
            tl.store(latent_cache_ptr + slot * stride_latent + r, y, mask=r_ok)
            _rotate_head_by(
                k_src, pe_cache_ptr + slot * stride_pe, c, s, HALF, BLOCK, INTERLEAVED,
                norm_ptr, 0.0, False,
            )  # fmt: skip
        if RETURN_KV:
            tl.store(c_out_ptr + t * stride_cot + r, y, mask=r_ok)
            _rotate_head_by(
                k_src, k_out_ptr + t * stride_kot, c, s, HALF, BLOCK, INTERLEAVED, norm_ptr,
                0.0, False,
            )  # fmt: skip


def mla_latent_rope_store(
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    norm_weight: torch.Tensor,
    eps: float,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    slots: torch.Tensor,
    return_kv: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The latent side of an MLA layer in one launch (four before: the latent's RMSNorm, two
    `rope`s, `attention.store_kv`).

    `q_pe` `[T, H, P]` (the heads' rotary queries), `c_kv` `[T, 1, R]` (the latent, before
    its norm) and `k_pe` `[T, 1, P]` (the rotary key), any strides but the last, at
    `positions` `[T]`: writes `rms_norm(c_kv, norm_weight, eps)` into `latent_cache` and the
    rotated `k_pe` into `pe_cache` (`[slots, 1, R | P]`) at `slots` `[T]` (a slot < 0 writes
    nothing). Returns `(rope(q_pe), normed c_kv, rope(k_pe))`, the last two only with
    `return_kv` (else None), all contiguous: the same values as `rms_norm`, `rope` twice and
    `store_kv`."""
    launch = MLALatentLaunch.of(
        q_pe, c_kv, k_pe, positions, cos, sin, interleaved, norm_weight, eps, latent_cache,
        pe_cache, slots, return_kv,
    )  # fmt: skip
    if launch.grid[0]:
        _mla_latent_kernel[launch.grid](
            *launch.args, **launch.constexprs, num_warps=1, **pdl.launch_args(q_pe)
        )
    return launch.q_out, launch.c_out, launch.k_out


@dataclass(frozen=True)
class MLALatentLaunch:
    """`mla_latent_rope_store`'s launch: its outputs, its grid `(token blocks, heads + 1)` and
    the arguments `mla_latent_program` takes after the program's two ids, for the kernels
    that run its programs (`_mla_latent_kernel`, `head_bmm.mla_absorb_latent_kernel`)."""

    q_out: torch.Tensor
    c_out: torch.Tensor | None
    k_out: torch.Tensor | None
    grid: tuple[int, int]
    args: tuple[Any, ...]
    constexprs: dict[str, Any]

    @staticmethod
    def of(
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        interleaved: bool,
        norm_weight: torch.Tensor,
        eps: float,
        latent_cache: torch.Tensor,
        pe_cache: torch.Tensor,
        slots: torch.Tensor,
        return_kv: bool = False,
    ) -> MLALatentLaunch:
        tokens, num_heads, dim = q_pe.shape
        rank = c_kv.shape[-1]
        q_pe, c_kv, k_pe = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_pe, c_kv, k_pe))
        q_out = torch.empty(tokens, num_heads, dim, dtype=q_pe.dtype, device=q_pe.device)
        c_out = k_out = None
        if return_kv:
            c_dtype = torch.result_type(norm_weight, c_kv)
            c_out = torch.empty(tokens, 1, rank, dtype=c_dtype, device=c_kv.device)
            k_out = torch.empty(tokens, 1, dim, dtype=k_pe.dtype, device=k_pe.device)
        half = dim // 2
        per_program = rope_tokens_per_program(tokens)
        args = (
            q_pe, c_kv, k_pe, q_out,
            q_out if c_out is None else c_out, q_out if k_out is None else k_out,
            latent_cache, pe_cache, positions, slots, cos, sin, norm_weight, eps, rank,
            q_pe.stride(0), q_pe.stride(1), c_kv.stride(0), k_pe.stride(0),
            q_out.stride(0), q_out.stride(1),
            0 if c_out is None else c_out.stride(0), 0 if k_out is None else k_out.stride(0),
            latent_cache.stride(0), pe_cache.stride(0), cos.stride(0), tokens,
        )  # fmt: skip
        constexprs = {
            "HQ": num_heads,
            "HALF": half,
            "BLOCK": triton.next_power_of_2(half),
            "BLOCK_R": triton.next_power_of_2(rank),
            "INTERLEAVED": interleaved,
            "RETURN_KV": return_kv,
            "TOKENS": per_program,
        }
        grid = (triton.cdiv(tokens, per_program), num_heads + 1)
        return MLALatentLaunch(q_out, c_out, k_out, grid, args, constexprs)
