"""A decode layer at batch 1 in one persistent launch, against the engine's launches of the
same work.

    python -m bench.persistent_layer                          # Qwen3-30B-A3B, attention half
    python -m bench.persistent_layer --moe --layers 16        # and its MoE half: whole layers
    python -m bench.persistent_layer --preset llama3-8b --context 128,2048 --programs-per-sm 1,2

At batch 1 a Qwen3-30B-A3B layer is nine launches: the input norm, QKV, RoPE with the KV write,
the decode splits, their combine, O (about 27 µs on the H200 against about 9 µs of bytes,
session U's profile in bench/NOTES.md), then the norm with the router's logits, the experts'
gate-up with the routing in it, and their down projections with the combine (about 31 µs
against about 18). Each launch pays its ramp and tail. Here the same work is one launch a
layer: its programs take items from a counter in the layer's order (the norm; QKV's tiles; the
decode splits, each rotating its group's queries and the last writing the new key and value,
as `attention.DecodeRope` does; the combine of each head; O's tiles; with `--moe`, the norm
with the router's logits over blocks of experts; the gate-up blocks of each chosen expert,
each routing its token again as `fused_moe_small`'s kernel does; the down blocks), and an item
waits for the count of finished items of the phase before it, after loading the weights it can
(a dense product's tile loads its first weights before it waits; an expert's weights wait for
the routing). Each item runs the code of the kernel it replaces (`fused.rms_norm_row`,
`attention.decode_split_program` and `decode_combine_program`, `fused.rms_norm_gate_program`,
`fused_moe_small.small_gate_up_program` and `small_down_combine_program`,
`bench.persistent_chain`'s GEMV tile), so the launch gives the same bytes as those kernels
launched one after another with the same warps (`run_launches`; checked under the interpreter
in tests/bench/test_persistent_layer.py, and by the table's output column on the GPU).

The benchmark times, over `--layers` layers each with its own weights and KV cache (from
memory, not the L2) in a CUDA graph: the engine's launches (`fused.rms_norm`, QKV and O on the
GEMM backend `auto` picks on Hopper, `fused.rope_store_kv`, `attention.decode_attention`,
`fused.rms_norm_gate`, `fused_moe.fused_moe_routed`), the same launches with this module's
GEMV tiles, and the persistent launch at several programs an SM; against the floor of the
bytes a step reads (the layers' weights, the chosen experts' and the KV) at the copy bandwidth
measured in the same run. A persistent layer near the floor where the launches are not is
batch 1's way to 1.5x (bench/NOTES.md). On an H100 they were not: see bench.persistent_kernel.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from bench import persistent_kernel as kernel
from bench.persistent_chain import gemv_kernel
from engine.kernels import pdl
from engine.kernels.attention import DECODE_BLOCK_N, dot_precision
from engine.kernels.fused_moe_small import SmallBatchTiles
from engine.layers.pending import PendingSum


@dataclass(frozen=True)
class Shape:
    """A layer: sizes, whether q and k heads are RMS-normalised (Qwen3), and with `experts`
    a MoE half of softmax top-k routing (Qwen3-MoE's; 0: the attention half alone)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool
    eps: float = 1e-6
    rope_theta: float = 1e6
    experts: int = 0
    top_k: int = 0
    inter: int = 0
    renormalize: bool = True

    @property
    def n_qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @staticmethod
    def of_preset(name: str, moe: bool = False) -> Shape:
        from bench.engine import PRESETS

        c = PRESETS[name]
        heads = int(c["num_attention_heads"])
        if moe and "num_experts" not in c:
            raise SystemExit(f"--moe needs a softmax-routed MoE preset (qwen3-30b-a3b), not {name}")
        return Shape(
            hidden=int(c["hidden_size"]),
            heads=heads,
            kv_heads=int(c["num_key_value_heads"]),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            qk_norm=str(c.get("model_type", "")).startswith("qwen3"),
            eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta", 1e6)),
            experts=int(c["num_experts"]) if moe else 0,
            top_k=int(c["num_experts_per_tok"]) if moe else 0,
            inter=int(c["moe_intermediate_size"]) if moe else 0,
            renormalize=bool(c.get("norm_topk_prob", True)),
        )


@dataclass
class Layer:
    """One layer's weights and KV cache (one sequence's pages, in a scrambled order); the MoE
    half's weights where the shape has experts."""

    norm_w: torch.Tensor
    qkv_w: torch.Tensor
    o_w: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    post_norm_w: torch.Tensor | None = None
    gate_w: torch.Tensor | None = None  # [E, H]
    w13: torch.Tensor | None = None  # [E, 2 * inter, H]
    w2: torch.Tensor | None = None  # [E, H, inter]


@dataclass
class Stack:
    """`layers` layers of one shape at batch 1, the step's inputs and every buffer the
    launches write (the same ones whichever form runs)."""

    shape: Shape
    layers: list[Layer]
    context: int  # tokens in the cache, the new one included
    step: kernel.Step  # the page table (one row, pages scrambled), positions, slots, tables
    x0: torch.Tensor  # [1, H]: the first layer's input
    res0: torch.Tensor
    xs: list[torch.Tensor]  # layer l reads xs[l] and writes xs[l + 1]
    res: list[torch.Tensor]  # two: with MoE, layer l's norms read res[l % 2], write the other
    qkv: torch.Tensor
    attn: torch.Tensor
    o_out: torch.Tensor  # with MoE, O's output (without, xs[l + 1])
    block_n: int = 8
    block_k: int = 512
    moe_tiles: SmallBatchTiles | None = None  # None: MOE_TILES
    gemv_dot: bool = False  # the dense products' tiles on the tensor cores (block_n >= 16)

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
        moe_tiles: SmallBatchTiles | None = None,
        gemv_dot: bool = False,
    ) -> Stack:
        g = torch.Generator(device=device).manual_seed(seed)
        s = shape
        hq, hkv, d = s.heads, s.kv_heads, s.head_dim

        def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*size, device=device, generator=g) * scale).to(dtype)

        def moe_weights() -> dict[str, torch.Tensor]:
            if not s.experts:
                return {}
            e, i = s.experts, s.inter
            return {
                "post_norm_w": 1 + randn(s.hidden, scale=0.1),
                "gate_w": randn(e, s.hidden, scale=s.hidden**-0.5),
                "w13": randn(e, 2 * i, s.hidden, scale=s.hidden**-0.5),
                "w2": randn(e, s.hidden, i, scale=i**-0.5),
            }

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
                **moe_weights(),
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
            step=kernel.Step(
                page_table=table,
                rows=torch.zeros(1, dtype=torch.int32, device=device),
                seq_lens=torch.tensor([context], dtype=torch.int32, device=device),
                positions=torch.tensor([last], dtype=torch.int64, device=device),
                slots=torch.tensor([slot], dtype=torch.int64, device=device),
                cos=cos,
                sin=sin,
                interleaved=False,
                page_size=page_size,
                num_splits=num_splits,
            ),
            x0=randn(1, s.hidden),
            res0=randn(1, s.hidden),
            xs=[empty(1, s.hidden) for _ in range(layers + 1)],
            res=[empty(1, s.hidden), empty(1, s.hidden)],
            qkv=empty(1, s.n_qkv),
            attn=empty(1, hq, d),
            o_out=empty(1, s.hidden),
            block_n=block_n,
            block_k=block_k,
            moe_tiles=moe_tiles,
            gemv_dot=gemv_dot,
        )

    @property
    def tiles(self) -> SmallBatchTiles:
        return self.moe_tiles or MOE_TILES

    def reset(self) -> None:
        """The step's inputs as built, and every cache's new slot zero (each form writes it)."""
        self.xs[0].copy_(self.x0)
        self.res[0].copy_(self.res0)
        slot = int(self.step.slots[0])
        for layer in self.layers:
            layer.k_cache[slot].zero_()
            layer.v_cache[slot].zero_()

    def output(self) -> torch.Tensor:
        return self.xs[-1]

    def bytes_read(self) -> int:
        """Weights, the chosen experts' (top-k distinct ones at batch 1) and the KV the step
        reads: the floor's numerator."""
        s = self.shape
        total = 0
        for layer in self.layers:
            for t in (layer.norm_w, layer.qkv_w, layer.o_w, layer.post_norm_w, layer.gate_w):
                total += t.numel() * t.element_size() if t is not None else 0
            for t in (layer.w13, layer.w2):
                total += t[0].numel() * t.element_size() * s.top_k if t is not None else 0
        kv_row = 2 * s.kv_heads * s.head_dim * self.xs[0].element_size()
        return total + len(self.layers) * self.context * kv_row


# Our form's launches at the persistent kernel's warps and experts' tiles: on the GPU the warps
# set a reduction's order (the norms' sums of squares), so the two give the same bytes only so.
WARPS = kernel.WARPS
MOE_TILES = kernel.MOE_TILES


def run_launches(stack: Stack, engine_gemm: bool = False) -> None:
    """The layers as the engine launches them (their kernels one after another): the norm,
    QKV, the decode attention with RoPE and the KV write folded in (`DecodeRope`), O; with
    experts, the norm with the router's logits and the small MoE path's two launches. The
    products on this module's GEMV tiles and the norms at `WARPS` (the persistent kernel's
    code, bytes and warps), or with `engine_gemm` as the engine runs them: on `auto`'s backend
    for Hopper (cuBLAS, or the skinny GEMM where `skinny_gemm.TUNED` says, O's split-K sum
    left to the next norm), RoPE with the KV write in its own launch (the engine's default),
    the norms at their own warps, and `fused_moe_routed` (the small path's default tiles)."""
    from engine.kernels import fused
    from engine.kernels.attention import DecodeRope, decode_attention
    from engine.kernels.fused_moe import fused_moe_routed
    from engine.kernels.fused_moe_small import small_batch_moe_routed
    from engine.layers.pending import materialize

    s, step = stack.shape, stack.step
    hq, hkv, d = s.heads, s.kv_heads, s.head_dim
    warps = None if engine_gemm else WARPS
    x: torch.Tensor | PendingSum = stack.xs[0]
    res = stack.res[0]
    for i, layer in enumerate(stack.layers):
        h = fused.rms_norm(x, layer.norm_w, s.eps, residual=res, num_warps=warps)
        qkv = _product(h, layer.qkv_w, stack, engine_gemm, stack.qkv)
        assert isinstance(qkv, torch.Tensor)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(1, hq, d), k.view(1, hkv, d), v.view(1, hkv, d)
        qk_norm = (layer.q_norm, layer.k_norm, s.eps) if s.qk_norm else None
        query: torch.Tensor | DecodeRope
        if engine_gemm:
            query = fused.rope_store_kv(
                q, k, v, step.positions, step.cos, step.sin, step.interleaved, layer.k_cache,
                layer.v_cache, step.slots, qk_norm=qk_norm,
            )  # fmt: skip
        else:
            query = DecodeRope(
                q, k, v, step.positions, step.slots, step.cos, step.sin, step.interleaved,
                qk_norm,
            )  # fmt: skip
        attn = decode_attention(
            query, layer.k_cache, layer.v_cache, step.page_table, step.rows, step.seq_lens,
            step.page_size, d**-0.5, step.num_splits, out=stack.attn,
        )  # fmt: skip
        o_out = stack.o_out if s.experts else stack.xs[i + 1]
        x = _product(attn.view(1, hq * d), layer.o_w, stack, engine_gemm, o_out)
        if s.experts:
            assert layer.gate_w is not None and layer.w13 is not None and layer.w2 is not None
            assert layer.post_norm_w is not None
            normed = fused.rms_norm_gate(
                x, layer.post_norm_w, s.eps, res, layer.gate_w, layer.gate_w.dtype,
                num_warps=warps,
            )  # fmt: skip
            assert normed is not None, "one row: the norm with the logits applies"
            h2, res, logits = normed
            if engine_gemm:
                x = fused_moe_routed(h2, layer.w13, layer.w2, logits, s.top_k, s.renormalize)
            else:
                x, _, _ = small_batch_moe_routed(
                    h2, layer.w13, layer.w2, logits, s.top_k, s.renormalize, stack.tiles
                )
    if x is not stack.xs[-1]:
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
        w, x, out, n, k, BLOCK_N=stack.block_n, BLOCK_K=stack.block_k, num_warps=WARPS,
        DOT=stack.gemv_dot, PRECISION=dot_precision(x), num_stages=3,
        **pdl.launch_args(x),
    )  # fmt: skip
    return out


@dataclass
class Persistent:
    """`kernel.decode_layer` over a stack: one launch a layer, each with its own counters
    (a launch's programs take their first number before waiting for the launch before)."""

    stack: Stack
    programs: int
    scratch: torch.Tensor  # [layers, SCRATCH_SIZE]
    spin_ns: int = 0
    num_stages: int = kernel.NUM_STAGES

    @staticmethod
    def build(
        stack: Stack, programs: int, spin_ns: int = 0, num_stages: int = kernel.NUM_STAGES
    ) -> Persistent:
        scratch = torch.zeros(
            len(stack.layers), kernel.SCRATCH_SIZE, dtype=torch.int32, device=stack.x0.device
        )
        return Persistent(stack, programs, scratch, spin_ns, num_stages)

    def run(self) -> None:
        st, s = self.stack, self.stack.shape
        x = st.xs[0]
        for i, layer in enumerate(st.layers):
            attn = kernel.Attention(
                layer.norm_w, layer.qkv_w, layer.o_w, layer.k_cache, layer.v_cache, s.heads,
                s.eps, layer.q_norm if s.qk_norm else None,
                layer.k_norm if s.qk_norm else None, s.eps if s.qk_norm else 0.0,
            )  # fmt: skip
            experts = None
            if s.experts:
                assert layer.post_norm_w is not None and layer.gate_w is not None
                assert layer.w13 is not None and layer.w2 is not None
                experts = kernel.Experts(
                    layer.post_norm_w, layer.gate_w, layer.w13, layer.w2, s.top_k,
                    s.renormalize,
                )  # fmt: skip
            residual = st.res[i % 2] if experts is not None else st.res[0]
            x = kernel.decode_layer(
                x, residual, attn, st.step, self.scratch[i], self.programs, experts,
                st.res[(i + 1) % 2], self.spin_ns, self.num_stages, st.tiles, st.block_n,
                st.block_k, st.gemv_dot,
            )  # fmt: skip
        st.xs[-1].copy_(x)


def reference(stack: Stack) -> torch.Tensor:
    """The stack in float32 torch from the weights and caches as built (each layer's new key
    and value put in their slot of a copy), for the error column."""
    s = stack.shape
    hq, hkv, d = s.heads, s.kv_heads, s.head_dim
    x, res = stack.x0.float(), stack.res0.float()
    step = stack.step
    pos = int(step.positions[0])
    c, sn = step.cos[pos].float(), step.sin[pos].float()
    pages = step.page_table[0].long()
    slots = pages[:, None] * step.page_size + torch.arange(step.page_size, device=x.device)
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
        if s.experts:
            assert layer.gate_w is not None and layer.w13 is not None and layer.w2 is not None
            assert layer.post_norm_w is not None
            res = res + x
            h2 = rms(res, layer.post_norm_w)
            probs = (h2 @ layer.gate_w.float().t()).softmax(-1)[0]
            weights, ids = probs.topk(s.top_k)
            if s.renormalize:
                weights = weights / weights.sum()
            out = torch.zeros_like(h2)
            for w, e in zip(weights.tolist(), ids.tolist(), strict=True):
                gate, up = (h2 @ layer.w13[e].float().t()).chunk(2, -1)
                out = out + w * ((torch.nn.functional.silu(gate) * up) @ layer.w2[e].float().t())
            x = out
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
    gemv_dot: bool = False,
) -> list[str]:
    """The table's rows for one context: each form timed (CUDA graphs on a GPU, eager
    elsewhere), its µs a layer against the floor, and its output against the float32
    reference and against the first row's bytes."""
    from bench.moe_kernel import time_graph
    from engine.kernels.attention import decode_splits

    splits = decode_splits(1, shape.kv_heads, context, DECODE_BLOCK_N, sms)
    stack = Stack.build(
        shape, layers, context, dtype, device, num_splits=splits, block_n=block_n,
        block_k=block_k, gemv_dot=gemv_dot,
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
        if stack.x0.is_cuda:
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
    p.add_argument("--moe", action="store_true", help="whole layers: the MoE half too")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--context", default="128", help="tokens in the cache, comma-separated")
    p.add_argument("--programs-per-sm", default="1,2,3")
    p.add_argument("--block-n", type=int, default=8)
    p.add_argument("--block-k", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--spin-ns", type=int, default=0, help="also time waits that sleep this long")
    p.add_argument("--stages", default="1", help="the split items' pipeline stages to time")
    p.add_argument(
        "--gemv-dot", action="store_true",
        help="the dense products' tiles on the tensor cores, pipelined --stages deep "
        "(both forms; --block-n 16 or more)",
    )  # fmt: skip
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (tests/bench/test_persistent_layer.py runs it on the CPU)")
    from bench.ceiling import copy_bandwidth
    from engine.kernels.sms import sm_count

    shape = Shape.of_preset(args.preset, args.moe)
    bandwidth = copy_bandwidth()
    half = "whole layers" if args.moe else "attention half"
    print(
        f"\n## {args.preset}'s {half} at batch 1, {args.layers} layers: "
        f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e12:.2f} TB/s; GEMV tiles "
        f"{args.block_n} x {args.block_k}{' on the tensor cores' if args.gemv_dot else ''}.\n\n"
        "| context | form | µs a layer | floor µs | x floor | output |\n"
        "| ---: | :--- | ---: | ---: | ---: | :--- |"
    )
    for context in (int(v) for v in args.context.split(",")):
        table_rows(
            shape, args.layers, context, "cuda", torch.bfloat16,
            sm_count(torch.device("cuda")), bandwidth,
            [int(v) for v in args.programs_per_sm.split(",")],
            [int(v) for v in args.stages.split(",")],
            args.spin_ns, args.reps, args.block_n, args.block_k, args.gemv_dot,
        )  # fmt: skip


if __name__ == "__main__":
    main()
