"""One `bench.engine` run with the O projection at batch 1 on `skinny_gemm`'s preloading tiles
(`--tiles pre:BLOCK_N:BLOCK_K[:split[:warps]]`, as `bench.skinny_gemm` spells them; none: the
TUNED default), the first projection of a layer likewise (`--qkv-tiles`), and the launches
before them triggering their successors first or not (`--trigger-first 0|1`), for
`session.sh`'s A/B:

    python3 bench/gpu/preload_ab.py --tiles pre:16:4096:1:16 --trigger-first 1 -- \
        --preset qwen3-30b-a3b --skip-hf --prefill '' --decode 1x128 --repeats 3
"""

from __future__ import annotations

import argparse
import sys

from bench.engine import main as engine_main
from bench.skinny_gemm import parse_tiles
from engine.kernels import pdl, skinny_gemm


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", default="", help="the O projection's tiles at one row")
    parser.add_argument("--qkv-tiles", default="", help="the first projection's, at one row")
    parser.add_argument("--trigger-first", type=int, default=1)
    args, rest = parser.parse_known_args(argv)
    pdl.TRIGGER_FIRST_MAX_ROWS = 1 if args.trigger_first else 0
    if args.tiles:
        (tiles,) = parse_tiles(args.tiles)
        for key in (("linear", 2048, 4096, "bfloat16"), ("linear", 2048, 2048, "bfloat16"),
                    ("linear", 4096, 4096, "bfloat16")):  # fmt: skip
            span = tiles.block_k * tiles.split_k
            if key[2] <= span < 2 * key[2]:  # the O projections these tiles hold whole
                rows = skinny_gemm.TUNED.get(key, ())
                skinny_gemm.TUNED[key] = ((1, tiles), *rows)
    if args.qkv_tiles:
        (tiles,) = parse_tiles(args.qkv_tiles)
        # Qwen3-30B-A3B's QKV, Moonlight's fused query-and-latent, Llama-3-8B's QKV.
        for key in (("linear", 5120, 2048, "bfloat16"), ("linear", 3648, 2048, "bfloat16"),
                    ("linear", 6144, 4096, "bfloat16")):  # fmt: skip
            span = tiles.block_k * tiles.split_k
            if key[2] <= span < 2 * key[2]:
                skinny_gemm.TUNED[key] = ((1, tiles), *skinny_gemm.TUNED.get(key, ()))
    print(
        f"O at one row: {args.tiles or 'TUNED'}, QKV: {args.qkv_tiles or 'TUNED'}, "
        f"trigger first: {args.trigger_first}"
    )
    engine_main([a for a in rest if a != "--"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
