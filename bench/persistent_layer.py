"""The attention half of a decode layer at batch 1 in one persistent launch, against the
engine's launches of the same work.

    python -m bench.persistent_layer                          # Qwen3-30B-A3B's shape, 48 layers
    python -m bench.persistent_layer --preset llama3-8b --context 128,2048 --programs-per-sm 1,2

At batch 1 a Qwen3-30B-A3B layer's attention half is six launches (the input norm, QKV, RoPE
with the KV write, the decode splits, their combine, O): about 27 µs a layer on the H200
against about 9 µs of bytes (session U's profile in bench/NOTES.md), each launch paying its
ramp and tail. Here the same work is one launch a layer: its programs take items from a
counter in the layer's order (the norm; QKV's tiles; the decode splits, each rotating its
group's queries and the last writing the new key and value, as `attention.DecodeRope` does;
the combine of each head; O's tiles), and an item waits for the count of finished items of the
phase before it, after loading the weights it can (a product's tile loads its first weights
before it waits). Each item runs the code of the kernel it replaces (`fused.rms_norm_row`,
`attention.decode_split_program` and `decode_combine_program`, `bench.persistent_chain`'s
GEMV tile), so the launch gives the same bytes as those kernels launched one after another
(`run_launches`; checked under the interpreter in tests/bench/test_persistent_layer.py).

The benchmark times, over `--layers` layers each with its own weights and KV cache (from
memory, not the L2) in a CUDA graph: the engine's launches (`fused.rms_norm`, QKV and O on the
GEMM backend `auto` picks on Hopper, `fused.rope_store_kv`, `attention.decode_attention`), the
same launches with this module's GEMV tiles, and the persistent launch at several programs an
SM; against the floor of the layers' weights and KV bytes at the copy bandwidth measured in the
same run. A persistent layer near the floor where the launches are not is batch 1's way to
1.5x (bench/NOTES.md); it is an experiment until then, not an engine path.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bench.persistent_chain import _DONE, _FINISHED, _TICKET, _gemv_tile, _wait_for, gemv_kernel
from engine.kernels import pdl
from engine.kernels.attention import (
    DECODE_BLOCK_N,
    LOG2E,
    decode_combine_program,
    decode_split_program,
    dot_precision,
)
from engine.kernels.fused import rms_norm_row
from engine.layers.pending import PendingSum

# Phases of a layer, in order (OUT: O's tiles); each one's finished items count at `_DONE + phase`.
NORM: tl.constexpr = tl.constexpr(0)
QKV: tl.constexpr = tl.constexpr(1)
SPLITS: tl.constexpr = tl.constexpr(2)
COMBINE: tl.constexpr = tl.constexpr(3)
OUT: tl.constexpr = tl.constexpr(4)
# Counters a launch takes: _TICKET, _FINISHED, then the five phases' (a power of two).
SCRATCH: tl.constexpr = tl.constexpr(8)


@triton.jit
def _release(counter):
    """One more item of a phase done: every thread's stores before the count."""
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="release")


@triton.jit
def attention_half_kernel(
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
    out_ptr,  # [H]
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
    SPIN_NS: tl.constexpr,
    PDL: tl.constexpr,
):
    """One layer's attention half at batch 1, items taken in order (a lower number never
    waits for a higher one: no deadlock, whatever is resident)."""
    qkv_tiles = tl.cdiv(n_qkv, BLOCK_N)
    o_tiles = tl.cdiv(hidden, BLOCK_N)
    split_items = HKV * num_splits
    combine_items = 0 if DIRECT else HQ
    end_qkv = 1 + qkv_tiles
    end_splits = end_qkv + split_items
    end_combine = end_splits + combine_items
    num_items = end_combine + o_tiles
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
                BLOCK_N, BLOCK_K, True, PDL, SPIN_NS,
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
                QK_NORM,
            )  # fmt: skip
            _release(scratch + _DONE + SPLITS)
        elif item < end_combine:
            pdl.start(PDL)
            _wait_for(scratch + _DONE + SPLITS, split_items, SPIN_NS)
            decode_combine_program(
                0, item - end_splits, part_o, part_lse, seq_lens_ptr, attn_ptr, stride_ob,
                stride_oh, stride_os, stride_lb, stride_lh, HQ * DV, DV, DV, BLOCK_DV,
                SPLIT_BLOCK_N, num_splits,
            )  # fmt: skip
            _release(scratch + _DONE + COMBINE)
        else:
            if DIRECT:
                before = scratch + _DONE + SPLITS
                need = split_items
            else:
                before = scratch + _DONE + COMBINE
                need = combine_items
            _gemv_tile(
                o_w, attn_ptr, out_ptr, item - end_combine, hidden, HQ * DV, before, need,
                BLOCK_N, BLOCK_K, True, PDL, SPIN_NS,
            )  # fmt: skip
            _release(scratch + _DONE + OUT)
        item = following
    finished = tl.atomic_add(scratch + _FINISHED, 1, sem="acq_rel")
    if finished == tl.num_programs(0) - 1:
        slots = tl.arange(0, SCRATCH)
        tl.store(scratch + slots, tl.zeros([SCRATCH], dtype=tl.int32))


@dataclass(frozen=True)
class Shape:
    """A layer's attention half: sizes, and whether q and k heads are RMS-normalised (Qwen3)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool
    eps: float = 1e-6
    rope_theta: float = 1e6

    @property
    def n_qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @staticmethod
    def of_preset(name: str) -> Shape:
        from bench.engine import PRESETS

        c = PRESETS[name]
        heads = int(c["num_attention_heads"])
        return Shape(
            hidden=int(c["hidden_size"]),
            heads=heads,
            kv_heads=int(c["num_key_value_heads"]),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            qk_norm=str(c.get("model_type", "")).startswith("qwen3"),
            eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta", 1e6)),
        )


@dataclass
class Layer:
    """One layer's weights and KV cache (one sequence's pages, in a scrambled order)."""

    norm_w: torch.Tensor
    qkv_w: torch.Tensor
    o_w: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


@dataclass
class Stack:
    """`layers` layers of one shape at batch 1, the step's inputs and every buffer the
    launches write (the same ones whichever form runs)."""

    shape: Shape
    layers: list[Layer]
    context: int  # tokens in the cache, the new one included
    page_size: int
    num_splits: int
    table: torch.Tensor  # [1, pages]
    rows: torch.Tensor
    seq_lens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    x0: torch.Tensor  # [1, H]: the first layer's input
    res0: torch.Tensor
    xs: list[torch.Tensor]  # layer l reads xs[l] and writes xs[l + 1]
    res: torch.Tensor
    h: torch.Tensor
    qkv: torch.Tensor
    q_rot: torch.Tensor
    part_o: torch.Tensor
    part_lse: torch.Tensor
    attn: torch.Tensor
    block_n: int = 8
    block_k: int = 512

    @staticmethod
    def build(
        shape: Shape,
        layers: int,
        context: int,
        dtype: torch.dtype,
        device: str,
        page_size: int = 64,
        num_splits: int = 1,
        block_n: int = 8,
        block_k: int = 512,
        seed: int = 0,
    ) -> Stack:
        g = torch.Generator(device=device).manual_seed(seed)
        s = shape
        hq, hkv, d = s.heads, s.kv_heads, s.head_dim

        def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*size, device=device, generator=g) * scale).to(dtype)

        pages = -(-context // page_size)
        num_pages = pages + 2  # page 0 unused, and one spare
        order = torch.randperm(pages, generator=torch.Generator().manual_seed(seed)) + 1
        table = order.to(torch.int32).view(1, pages).to(device)
        stack_layers = [
            Layer(
                norm_w=1 + randn(s.hidden, scale=0.1),
                qkv_w=randn(s.n_qkv, s.hidden, scale=s.hidden**-0.5),
                o_w=randn(s.hidden, hq * d, scale=(hq * d) ** -0.5),
                q_norm=1 + randn(d, scale=0.1),
                k_norm=1 + randn(d, scale=0.1),
                k_cache=randn(num_pages * page_size, hkv, d),
                v_cache=randn(num_pages * page_size, hkv, d),
            )
            for _ in range(layers)
        ]
        last = context - 1  # the new token's position and slot
        slot = int(table[0, last // page_size]) * page_size + last % page_size
        positions = torch.arange(context, dtype=torch.float32)
        inv_freq = s.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        freqs = positions[:, None] * inv_freq[None, :]
        cos = torch.cat([freqs.cos(), freqs.cos()], 1).to(device)
        sin = torch.cat([freqs.sin(), freqs.sin()], 1).to(device)

        def empty(*size: int, float32: bool = False) -> torch.Tensor:
            return torch.zeros(*size, dtype=torch.float32 if float32 else dtype, device=device)

        return Stack(
            shape=shape,
            layers=stack_layers,
            context=context,
            page_size=page_size,
            num_splits=num_splits,
            table=table,
            rows=torch.zeros(1, dtype=torch.int32, device=device),
            seq_lens=torch.tensor([context], dtype=torch.int32, device=device),
            positions=torch.tensor([last], dtype=torch.int64, device=device),
            slots=torch.tensor([slot], dtype=torch.int64, device=device),
            cos=cos,
            sin=sin,
            x0=randn(1, s.hidden),
            res0=randn(1, s.hidden),
            xs=[empty(1, s.hidden) for _ in range(layers + 1)],
            res=empty(1, s.hidden),
            h=empty(1, s.hidden),
            qkv=empty(1, s.n_qkv),
            q_rot=empty(1, hq, d),
            part_o=empty(1, hq, num_splits, d, float32=True),
            part_lse=empty(1, hq, num_splits, float32=True),
            attn=empty(1, hq, d),
            block_n=block_n,
            block_k=block_k,
        )

    def reset(self) -> None:
        """The step's inputs as built, and every cache's new slot zero (each form writes it)."""
        self.xs[0].copy_(self.x0)
        self.res.copy_(self.res0)
        slot = int(self.slots[0])
        for layer in self.layers:
            layer.k_cache[slot].zero_()
            layer.v_cache[slot].zero_()

    def output(self) -> torch.Tensor:
        return self.xs[-1]

    def bytes_read(self) -> int:
        """Weights and the KV the step reads (the floor's numerator)."""
        total = 0
        for layer in self.layers:
            for t in (layer.norm_w, layer.qkv_w, layer.o_w):
                total += t.numel() * t.element_size()
        kv_row = 2 * self.shape.kv_heads * self.shape.head_dim * self.xs[0].element_size()
        return total + len(self.layers) * self.context * kv_row


def run_launches(stack: Stack, engine_gemm: bool = False) -> None:
    """The attention half as the engine launches it (its kernels one after another): the norm,
    QKV, the decode attention with RoPE and the KV write folded in (`DecodeRope`), O. The
    products on this module's GEMV tiles (the persistent kernel's code), or with
    `engine_gemm` as the engine runs them: on `auto`'s backend for Hopper (cuBLAS, or the
    skinny GEMM where `skinny_gemm.TUNED` says, O's split-K sum left to the next norm), RoPE
    with the KV write in its own launch (the engine's default)."""
    from engine.kernels import fused
    from engine.kernels.attention import DecodeRope, decode_attention
    from engine.layers.pending import materialize

    s = stack.shape
    hq, hkv, d = s.heads, s.kv_heads, s.head_dim
    x: torch.Tensor | PendingSum = stack.xs[0]
    for i, layer in enumerate(stack.layers):
        h = fused.rms_norm(x, layer.norm_w, s.eps, residual=stack.res)
        qkv = _product(h, layer.qkv_w, stack, engine_gemm, stack.qkv)
        assert isinstance(qkv, torch.Tensor)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(1, hq, d), k.view(1, hkv, d), v.view(1, hkv, d)
        qk_norm = (layer.q_norm, layer.k_norm, s.eps) if s.qk_norm else None
        query: torch.Tensor | DecodeRope
        if engine_gemm:
            query = fused.rope_store_kv(
                q, k, v, stack.positions, stack.cos, stack.sin, False, layer.k_cache,
                layer.v_cache, stack.slots, qk_norm=qk_norm,
            )  # fmt: skip
        else:
            query = DecodeRope(
                q, k, v, stack.positions, stack.slots, stack.cos, stack.sin, False, qk_norm
            )
        attn = decode_attention(
            query, layer.k_cache, layer.v_cache, stack.table, stack.rows, stack.seq_lens,
            stack.page_size, d**-0.5, stack.num_splits, out=stack.attn,
        )  # fmt: skip
        x = _product(attn.view(1, hq * d), layer.o_w, stack, engine_gemm, stack.xs[i + 1])
    if isinstance(x, PendingSum):
        stack.xs[-1].copy_(materialize(x))


def _product(
    x: torch.Tensor, w: torch.Tensor, stack: Stack, engine_gemm: bool, out: torch.Tensor
) -> torch.Tensor | PendingSum:
    """`x @ w.T` into `out`: by the engine's choice (which may leave a split-K sum pending)
    or on one `gemv_kernel` launch."""
    n, k = w.shape
    if engine_gemm:
        from engine.kernels.skinny_gemm import skinny_linear
        from engine.layers.linear import SkinnyGemmBackend

        tiles = SkinnyGemmBackend(tuned=True, max_rows=256).tiles("linear", 1, n, k, x.dtype)
        if tiles is None:
            return torch.mm(x, w.t(), out=out)
        return skinny_linear(x, w, None, tiles, defer=True)
    gemv_kernel[(triton.cdiv(n, stack.block_n),)](
        w, x, out, n, k, BLOCK_N=stack.block_n, BLOCK_K=stack.block_k, num_warps=4,
        **pdl.launch_args(x),
    )  # fmt: skip
    return out


@dataclass
class Persistent:
    """`attention_half_kernel` over a stack: one launch a layer, each with its own scratch
    (a launch's programs take their first number before waiting for the launch before)."""

    stack: Stack
    programs: int
    scratch: torch.Tensor  # [layers, SCRATCH]
    spin_ns: int = 0
    # Software-pipeline stages of the split items' loop: on sm_90 one keeps the kernel at 162
    # registers (three programs an SM), three takes 184 and 39 KB of shared memory (two).
    num_stages: int = 1

    @staticmethod
    def build(stack: Stack, programs: int, spin_ns: int = 0, num_stages: int = 1) -> Persistent:
        scratch = torch.zeros(
            len(stack.layers), int(SCRATCH), dtype=torch.int32, device=stack.h.device
        )
        return Persistent(stack, programs, scratch, spin_ns, num_stages)

    def run(self) -> None:
        st, s = self.stack, self.stack.shape
        for i, layer in enumerate(st.layers):
            norms = (layer.q_norm, layer.k_norm) if s.qk_norm else (st.cos, st.cos)
            attention_half_kernel[(self.programs,)](
                st.xs[i], st.res, layer.norm_w, st.h, s.eps, s.hidden,
                layer.qkv_w, st.qkv, s.n_qkv,
                st.q_rot, layer.k_cache, layer.v_cache, st.table, st.rows, st.seq_lens,
                st.part_o, st.part_lse, st.attn, s.head_dim**-0.5 * LOG2E,
                layer.k_cache.stride(0), layer.k_cache.stride(1),
                layer.v_cache.stride(0), layer.v_cache.stride(1), st.table.stride(0),
                st.part_o.stride(0), st.part_o.stride(1), st.part_o.stride(2),
                st.part_lse.stride(0), st.part_lse.stride(1),
                st.positions, st.slots, st.cos, st.sin, norms[0], norms[1],
                s.eps if s.qk_norm else 0.0, st.cos.stride(0), st.num_splits,
                layer.o_w, st.xs[i + 1], self.scratch[i],
                HQ=s.heads, HKV=s.kv_heads,
                GROUP_PAD=max(16, triton.next_power_of_2(s.heads // s.kv_heads)),
                DK=s.head_dim, DV=s.head_dim, BLOCK_DK=triton.next_power_of_2(s.head_dim),
                BLOCK_DV=triton.next_power_of_2(s.head_dim),
                BLOCK_HALF=triton.next_power_of_2(s.head_dim // 2),
                PAGE_SIZE=st.page_size, SPLIT_BLOCK_N=DECODE_BLOCK_N,
                NORM_BLOCK=triton.next_power_of_2(s.hidden),
                BLOCK_N=st.block_n, BLOCK_K=st.block_k,
                PRECISION=dot_precision(st.h), INTERLEAVED=False, QK_NORM=s.qk_norm,
                DIRECT=st.num_splits == 1, SPIN_NS=self.spin_ns, num_warps=4,
                num_stages=self.num_stages,
                **pdl.launch_args(st.h),
            )  # fmt: skip


def reference(stack: Stack) -> torch.Tensor:
    """The stack in float32 torch from the weights and caches as built (each layer's new key
    and value put in their slot of a copy), for the error column."""
    s = stack.shape
    hq, hkv, d = s.heads, s.kv_heads, s.head_dim
    x, res = stack.x0.float(), stack.res0.float()
    pos = int(stack.positions[0])
    c, sn = stack.cos[pos].float(), stack.sin[pos].float()
    pages = stack.table[0].long()
    slots = pages[:, None] * stack.page_size + torch.arange(stack.page_size, device=x.device)
    slots = slots.flatten()[: stack.context]

    def rms(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + s.eps) * w.float()

    def rotate(t: torch.Tensor) -> torch.Tensor:
        half = d // 2
        rot = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * c + rot * sn

    for layer in stack.layers:
        res = res + x
        h = rms(res, layer.norm_w)
        q, k, v = (h @ layer.qkv_w.float().t()).split([hq * d, hkv * d, hkv * d], -1)
        q, k, v = q.view(hq, d), k.view(hkv, d), v.view(hkv, d)
        if s.qk_norm:
            q, k = rms(q, layer.q_norm), rms(k, layer.k_norm)
        q, k = rotate(q), rotate(k)
        keys = layer.k_cache[slots].float().clone()
        values = layer.v_cache[slots].float().clone()
        keys[-1], values[-1] = k, v
        group = hq // hkv
        keys = keys.repeat_interleave(group, 1)  # [N, Hq, D]
        values = values.repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q, keys) * d**-0.5
        attn = torch.einsum("hn,nhd->hd", scores.softmax(-1), values)
        x = attn.reshape(1, hq * d) @ layer.o_w.float().t()
    return x


def table_rows(
    shape: Shape,
    layers: int,
    context: int,
    device: str,
    dtype: torch.dtype,
    sms: int,
    bandwidth: float,
    programs_per_sm: list[int],
    stages: list[int],
    spin_ns: int = 0,
    reps: int = 20,
    block_n: int = 8,
    block_k: int = 512,
) -> list[str]:
    """The table's rows for one context: each form timed (CUDA graphs on a GPU, eager
    elsewhere), its µs a layer against the floor, and its output against the float32
    reference and against the first row's bytes."""
    from bench.moe_kernel import time_graph
    from engine.kernels.attention import decode_splits

    splits = decode_splits(1, shape.kv_heads, context, DECODE_BLOCK_N, sms)
    stack = Stack.build(
        shape, layers, context, dtype, device, num_splits=splits, block_n=block_n,
        block_k=block_k,
    )  # fmt: skip
    floor_us = stack.bytes_read() / bandwidth * 1e6 / layers
    stack.reset()
    want = reference(stack)
    baseline: list[torch.Tensor] = []
    out: list[str] = []

    def row(name: str, fn: Callable[[], object]) -> None:
        seconds = time_graph(fn, reps)
        stack.reset()
        fn()
        if stack.h.is_cuda:
            torch.cuda.synchronize()
        got = stack.output().clone()
        if not baseline:
            baseline.append(got)
        err = (got.float() - want).abs().max().item() / want.abs().max().item()
        same = "same bytes as ours" if torch.equal(got, baseline[0]) else "differs"
        us = seconds * 1e6 / layers
        out.append(
            f"| {context} | {name} | {us:.2f} | {floor_us:.2f} | {us / floor_us:.2f} "
            f"| {same}, err {err:.1e} |"
        )
        print(out[-1], flush=True)

    row(f"our launches ({splits} splits)", lambda: run_launches(stack))
    row("the engine's launches", lambda: run_launches(stack, engine_gemm=True))
    for per_sm in programs_per_sm:
        for spin in sorted({0, spin_ns}):
            for num_stages in stages:
                persistent = Persistent.build(stack, per_sm * sms, spin, num_stages)
                sleep = f", {spin} ns sleeps" if spin else ""
                row(f"persistent, {per_sm} a SM, {num_stages} stages{sleep}", persistent.run)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--context", default="128", help="tokens in the cache, comma-separated")
    p.add_argument("--programs-per-sm", default="1,2,3")
    p.add_argument("--block-n", type=int, default=8)
    p.add_argument("--block-k", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--spin-ns", type=int, default=0, help="also time waits that sleep this long")
    p.add_argument("--stages", default="1", help="the split items' pipeline stages to time")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (tests/bench/test_persistent_layer.py runs it on the CPU)")
    from bench.ceiling import copy_bandwidth
    from engine.kernels.sms import sm_count

    shape = Shape.of_preset(args.preset)
    bandwidth = copy_bandwidth()
    print(
        f"\n## {args.preset}'s attention half at batch 1, {args.layers} layers: "
        f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e12:.2f} TB/s; GEMV tiles "
        f"{args.block_n} x {args.block_k}.\n\n"
        "| context | form | µs a layer | floor µs | x floor | output |\n"
        "| ---: | :--- | ---: | ---: | ---: | :--- |"
    )
    for context in (int(v) for v in args.context.split(",")):
        table_rows(
            shape, args.layers, context, "cuda", torch.bfloat16,
            sm_count(torch.device("cuda")), bandwidth,
            [int(v) for v in args.programs_per_sm.split(",")],
            [int(v) for v in args.stages.split(",")],
            args.spin_ns, args.reps, args.block_n, args.block_k,
        )  # fmt: skip


if __name__ == "__main__":
    main()
