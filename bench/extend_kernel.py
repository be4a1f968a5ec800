"""Prefill/extend attention on the GPU (`engine.kernels.attention.extend_attention`): each launch
configuration of the kernel against the FLOPs floor, to pick `ExtendTiles`.

    python -m bench.extend_kernel                                   # Llama-3-8B and Qwen3 heads
    python -m bench.extend_kernel --heads 32/4/128 --cases 8x2048 --tiles 128x64x8x3,64x64x8x2
    TRITON_INTERPRET=1 python -m bench.extend_kernel --device cpu --heads 4/2/32 \
        --cases 2x40+8 --tiles 16x16x4x1 --reps 1                  # a smoke run (no real times)

One layer's causal attention of new tokens over a paged cache (bfloat16, pages of
`--page-size` tokens scattered over the pool), for heads `Hq/Hkv/D` and cases `BxE+P`: B
sequences of E new tokens each over a cached prefix of P (`+P` optional: chunked prefill,
prefix hits). Tiles `MxNxWxS`: queries and keys a tile, warps, pipeline stages; the engine's
default for the shape is marked `*`, the fastest per case `<`. FLOPs: 2 (Dk + Dv) Hq per
visible (query, key) pair; the floor is them over the bfloat16 matrix-product rate measured in
the same run (`bench.ceiling.matmul_rate`). Times: medians of CUDA-graph replays. "max err":
each configuration's output against `scaled_dot_product_attention` on the gathered context
(float32), over the largest reference value.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.ceiling import matmul_rate
from bench.moe_kernel import time_graph
from engine.kernels.attention import ExtendTiles, extend_attention, extend_blocks, extend_tiles

DEFAULT_HEADS = "32/8/128,32/4/128"  # Llama-3-8B; Qwen3-30B-A3B
DEFAULT_CASES = "64x128,8x2048,1x8192,4x1024+3072"
DEFAULT_TILES = "128x128x8x3,128x64x8x3,64x64x4x3,64x64x8x2,128x128x8x4,128x64x4x3"


@dataclass(frozen=True)
class Case:
    batch: int
    new: int
    prefix: int = 0

    @classmethod
    def parse(cls, text: str) -> Case:
        shape, _, prefix = text.partition("+")
        batch, new = (int(v) for v in shape.split("x"))
        return cls(batch, new, int(prefix or 0))

    def __str__(self) -> str:
        return f"{self.batch}x{self.new}" + (f"+{self.prefix}" if self.prefix else "")

    def flops(self, hq: int, dk: int, dv: int) -> float:
        # Query i (0-based among the new) sees prefix + i + 1 keys.
        pairs = self.batch * (self.new * self.prefix + self.new * (self.new + 1) // 2)
        return 2.0 * (dk + dv) * hq * pairs


def parse_tiles(text: str) -> ExtendTiles:
    m, n, w, s = (int(v) for v in text.split("x"))
    return ExtendTiles(m, n, w, s)


def run_case(
    heads: tuple[int, int, int], case: Case, tiles: list[ExtendTiles], args: argparse.Namespace
) -> None:
    hq, hkv, d = heads
    device, dtype, ps = torch.device(args.device), getattr(torch, args.dtype), args.page_size
    gen = torch.Generator(device=device).manual_seed(0)
    ctx = case.prefix + case.new
    pages_per = -(-ctx // ps)
    num_pages = case.batch * pages_per
    order = torch.randperm(num_pages, generator=gen, device=device).to(torch.int32)
    table = order.view(case.batch, pages_per)
    k_cache = torch.randn(num_pages * ps, hkv, d, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(num_pages * ps, hkv, d, generator=gen, device=device, dtype=dtype)
    t = case.batch * case.new
    q = torch.randn(t, hq, d, generator=gen, device=device, dtype=dtype)
    i32 = torch.int32
    rows = torch.arange(case.batch, dtype=i32, device=device)
    prefix = torch.full((case.batch,), case.prefix, dtype=i32, device=device)
    ext = torch.full((case.batch,), case.new, dtype=i32, device=device)
    starts = torch.arange(case.batch, dtype=i32, device=device) * case.new
    # The reference: each sequence's context gathered in position order, SDPA with the causal
    # offset of its prefix as an explicit mask, in float32.
    pos = torch.arange(ctx, device=device)
    slots = (table.long()[:, pos // ps] * ps + pos % ps).view(-1)  # [B * ctx]
    keys = k_cache[slots].view(case.batch, ctx, hkv, d).transpose(1, 2).float()
    values = v_cache[slots].view(case.batch, ctx, hkv, d).transpose(1, 2).float()
    queries = q.view(case.batch, case.new, hq, d).transpose(1, 2).float()
    visible = pos[None, :] <= (case.prefix + torch.arange(case.new, device=device))[:, None]
    ref = (
        F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=visible, scale=d**-0.5, enable_gqa=True
        )
        .transpose(1, 2)
        .reshape(t, hq, d)
    )
    del keys, values, queries
    flops = case.flops(hq, d, d)
    default = extend_tiles(d, dtype, case.new)
    results = []
    for tile in tiles:
        seqs, firsts = extend_blocks([case.new] * case.batch, tile.block_m)
        blocks = torch.tensor([seqs, firsts], dtype=i32, device=device)
        out = torch.empty_like(q)

        def call(tile: ExtendTiles = tile, blocks: torch.Tensor = blocks, out=out) -> None:
            extend_attention(
                q, k_cache, v_cache, table, rows, prefix, ext, starts, blocks[0], blocks[1],
                ps, d**-0.5, out=out, tiles=tile,
            )  # fmt: skip

        try:
            seconds = time_graph(call, args.reps)
        except Exception as exc:  # a configuration that does not compile: report, go on
            print(f"| {hq}/{hkv}/{d} | {case} | {fmt(tile)} | failed: {type(exc).__name__} |")
            continue
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        results.append((tile, seconds, err))
    best = min(results, key=lambda r: r[1])[0] if results else None
    for tile, seconds, err in results:
        mark = ("*" if tile == default else "") + ("<" if tile == best else "")
        print(
            f"| {hq}/{hkv}/{d} | {case} | {fmt(tile)}{mark} | {flops / 1e9:.1f} "
            f"| {args.floor_s(flops) * 1e6:.0f} | {seconds * 1e6:.0f} "
            f"| {seconds / args.floor_s(flops):.2f} | {flops / seconds / 1e12:.0f} | {err:.1e} |",
            flush=True,
        )


def fmt(tile: ExtendTiles) -> str:
    return f"{tile.block_m}x{tile.block_n}x{tile.num_warps}x{tile.num_stages}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", default=DEFAULT_HEADS, help="Hq/Hkv/D,...")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="BxE[+P],...")
    parser.add_argument("--tiles", default=DEFAULT_TILES, help="MxNxWarpsxStages,...")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rate = matmul_rate(args.device, dtype)
    args.floor_s = lambda flops: flops / rate
    tiles = [parse_tiles(v) for v in args.tiles.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    print(
        f"\n## Extend attention: {name}, torch {torch.__version__}; {args.dtype} matmul "
        f"{rate / 1e12:.0f} TFLOP/s; page size {args.page_size}; median of {args.reps}.\n"
    )
    print(
        "| heads | case | tiles | GFLOP | floor µs | kernel µs | x floor | TFLOP/s | max err |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for spec in args.heads.split(","):
        hq, hkv, d = (int(v) for v in spec.split("/"))
        for text in args.cases.split(","):
            run_case((hq, hkv, d), Case.parse(text), tiles, args)
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
