"""Paged decode attention on the GPU (`engine.kernels.attention.decode_attention`): each launch
configuration of the split kernel against the bytes floor, to pick `DecodeTiles`.

    python -m bench.attention_kernel                      # Llama-3-8B heads, the engine's shapes
    python -m bench.attention_kernel --shapes 64x2048 --block-n 32,64 --num-warps 4,8
    python -m bench.attention_kernel --shapes 64x129,64x2048 --block-n 64 --num-warps 4 \
        --num-stages 3 --short 0,32:256
    TRITON_INTERPRET=1 python -m bench.attention_kernel --device cpu --shapes 2x40 \
        --heads 4/2/16 --block-n 16 --num-warps 4 --num-stages 2 --layers 1 --reps 1

One layer's decode attention (one query per sequence, bfloat16, pages of `--page-size` tokens
scattered over the pool) for each shape `BxL` (B sequences of L cached tokens) and each tile
configuration (keys per tile, warps, stages, and `--short`'s second loop for short ranges:
`DecodeTiles.short_n`), the split count chosen as the engine does (`decode_splits`, for the shape's
context or `--graph-context`'s, as a decode graph captured for that longest context launches it).
Times are medians of CUDA-graph replays of `--layers` calls cycling as many layers' caches (so
consecutive calls read different memory), divided by `--layers`. Floor: the bytes the step must read
(every cached token's K and V once, plus the queries and outputs) over the device-to-device copy
bandwidth measured in the same run (`bench.ceiling`). Each configuration's output is checked against
the default's (bf16 max abs difference). The engine's configuration for the shape's split count
(`default_tiles`) is marked `*`, the fastest per shape `<`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.args import int_list, split_list
from bench.ceiling import copy_bandwidth
from bench.moe_kernel import time_graph
from engine.kernels.attention import DecodeTiles, decode_attention, decode_splits, default_tiles
from engine.kernels.sms import sm_count

DEFAULT_SHAPES = "1x128,1x2048,16x128,64x128,64x2048,256x512"


@dataclass
class Case:
    """`layers` layers' caches and one step's inputs for B sequences of L tokens."""

    q: torch.Tensor  # [B, Hq, D]
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [slots, Hkv, D]
    table: torch.Tensor  # [B, pages per sequence] int32
    rows: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32
    page_size: int
    out: torch.Tensor
    max_len: int  # the bound the split count is chosen for: seq_lens' largest, or a graph's

    def splits(self, tiles: DecodeTiles, forced: int = 0) -> int:
        """`forced` splits, or (0) the engine's count (`decode_splits`)."""
        bsz = self.q.shape[0]
        kv_heads = self.caches[0][0].shape[1]
        sms = sm_count(self.caches[0][0].device)
        return forced or decode_splits(bsz, kv_heads, self.max_len, tiles.block_n, sms)

    def run(self, tiles: DecodeTiles, forced_splits: int = 0) -> None:
        dim = self.q.shape[2]
        splits = self.splits(tiles, forced_splits)
        for k, v in self.caches:
            decode_attention(
                self.q, k, v, self.table, self.rows, self.seq_lens, self.page_size,
                dim**-0.5, splits, out=self.out, tiles=tiles,
            )  # fmt: skip

    def floor_bytes(self) -> int:
        k = self.caches[0][0]
        kv_heads, dim = k.shape[1], k.shape[2]
        tokens = int(self.seq_lens.sum())
        return 2 * tokens * kv_heads * dim * k.element_size() + 2 * self.q.numel() * 2


def make_case(
    batch: int, context: int, heads: tuple[int, int, int], page_size: int, layers: int, device: str
) -> Case:
    q_heads, kv_heads, dim = heads
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq + 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Scattered pages: a permutation of the pool, as a long-running server's would be.
    order = torch.randperm(num_pages - 1, generator=gen).to(torch.int32) + 1
    table = order.view(batch, pages_per_seq).to(device)
    dtype = torch.bfloat16
    caches = [
        (
            torch.randn(num_pages * page_size, kv_heads, dim, dtype=dtype, device=device),
            torch.randn(num_pages * page_size, kv_heads, dim, dtype=dtype, device=device),
        )
        for _ in range(layers)
    ]
    q = torch.randn(batch, q_heads, dim, dtype=dtype, device=device)
    rows = torch.arange(batch, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return Case(q, caches, table, rows, seq_lens, page_size, torch.empty_like(q), context)


def short_list(text: str) -> list[tuple[int, int]]:
    """`0,32:256` -> [(0, 0), (32, 256)]."""
    out = []
    for item in text.split(","):
        keys, _, most = item.partition(":")
        out.append((int(keys), int(most or 0)) if int(keys) else (0, 0))
    return out


def short_text(tiles: DecodeTiles) -> str:
    """The table's `short` cell: `KEYS:MAX`, or - for none."""
    return f"{tiles.short_n}:{tiles.short_max}" if tiles.short_n else "-"


def splits_text(splits: int, tiles: DecodeTiles) -> str:
    """The table's `splits` cell: the count, and each split's least tiles where more than one."""
    least = tiles.min_split_tiles
    return f"{splits}" if least == 1 or splits == 1 else f"{splits} (>= {least} tiles)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxL, comma-separated")
    p.add_argument("--heads", default="32/8/128", help="query heads / KV heads / head dim")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument(
        "--graph-context",
        type=int,
        default=0,
        help="choose the split count for this longest context, as the engine's decode graphs "
        "do for theirs (e.g. 8192); 0: each shape's own context",
    )
    p.add_argument("--block-n", type=int_list, default=[32, 64, 128])
    p.add_argument("--num-warps", type=int_list, default=[2, 4, 8])
    p.add_argument("--num-stages", type=int_list, default=[1, 2, 3])
    p.add_argument("--layers", type=int, default=8, help="layers' caches cycled per replay")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--splits",
        type=split_list,
        default=[0],
        help="context splits to time (0: the engine's decode_splits)",
    )
    p.add_argument(
        "--short",
        type=short_list,
        default=[(0, 0)],
        help="KEYS:MAX, comma-separated: ranges of at most MAX keys in tiles of KEYS "
        "(`DecodeTiles.short_n`); 0: none",
    )
    p.add_argument(
        "--min-split-tiles",
        type=int_list,
        default=[1],
        help="each of several splits at least this many tiles (`DecodeTiles.min_split_tiles`)",
    )
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    q_heads, kv_heads, dim = (int(x) for x in args.heads.split("/"))
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    configs = [
        DecodeTiles(n, w, s, short[0], short[1], min_split_tiles=least)
        for n, w, s, short, least in itertools.product(
            args.block_n, args.num_warps, args.num_stages, args.short, args.min_split_tiles
        )
        if not short[0] or short[0] < n
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"## Paged decode attention: {name}, torch {torch.__version__}; copy "
        f"{bandwidth / 1e12:.2f} TB/s (read + write); bfloat16; heads {q_heads}/{kv_heads}, "
        f"dim {dim}; page size {args.page_size}; {args.layers} layers' caches cycled\n"
    )
    print(
        "| shape | block_n | warps | stages | short | splits | µs | floor µs | x floor | diff |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for shape in args.shapes.split(","):
        batch, context = (int(x) for x in shape.split("x"))
        case = make_case(
            batch, context, (q_heads, kv_heads, dim), args.page_size, args.layers, args.device
        )
        case.max_len = max(context, args.graph_context)
        floor_us = case.floor_bytes() / bandwidth * 1e6
        # The engine's launch for this shape (its split count's stages), timed first.
        default = default_tiles(case.splits(DecodeTiles()))
        case.run(default)
        want = case.out.float().clone()
        rows: list[tuple[float, DecodeTiles, int, float, int]] = []
        for tiles, forced in itertools.product([default, *configs], args.splits):
            if tiles == default and forced == 0 and rows:
                continue  # the engine's own launch among the given: timed already
            try:
                run = functools.partial(case.run, tiles, forced)
                seconds = time_graph(run, args.reps) / args.layers
            except Exception as exc:  # a configuration that does not compile or launch
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                print(f"| {shape} | {tiles.block_n} | {tiles.num_warps} | {tiles.num_stages} "
                      f"| {short_text(tiles)} | - | failed: {why} | | | |")  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.synchronize()  # a sticky error shows here, not in every later row
                continue
            diff = (case.out.float() - want).abs().max().item()
            rows.append((seconds * 1e6, tiles, case.splits(tiles, forced), diff, forced))
        if not rows:
            continue
        best = min(r[0] for r in rows)
        for us, tiles, splits, diff, forced in rows:
            engine_choice = tiles == default and not forced
            mark = ("*" if engine_choice else "") + ("<" if us == best else "")
            print(
                f"| {shape} | {tiles.block_n} | {tiles.num_warps} | {tiles.num_stages} | "
                f"{short_text(tiles)} | {splits_text(splits, tiles)} | {us:.1f}{mark} | "
                f"{floor_us:.1f} | "
                f"{us / floor_us:.2f} | {diff:.1e} |",
                flush=True,
            )
        case.caches.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
