"""One `bench.engine` run with the O projection at batch 1 on `skinny_gemm`'s preloading tiles
(`--tiles pre:BLOCK_N:BLOCK_K[:split[:warps]]`, as `bench.skinny_gemm` spells them; none: the
TUNED default), the first projection of a layer likewise (`--qkv-tiles`), and the launches
before them triggering their successors first or not (`--trigger-first 0|1`;
`--without-preload --trigger-first 0`: the engine before the preloading rows), for
`session.sh`'s A/B. `--greedy`: the tiny checkpoints' greedy tokens instead, each prompt alone,
against transformers (with `--every-one-row`, every one-row product on preloading tiles);
`--profile`: `bench.profile_decode`'s kernel table instead. `--down-preload N,K`: the small MoE
path's down routing again and loading its first K step before its PDL wait; `--norm-in-qkv 1`:
the input norm inside the first projection's preloading launch; `--tuned-row
gate_up:28672:4096:256=cublas`: a `TUNED` row replaced; `--moe-prefill-before`: the MoE
tables' prefill rows as before the thirtieth session:

    python3 bench/gpu/preload_ab.py --tiles pre:16:4096:1:16 --trigger-first 1 -- \
        --preset qwen3-30b-a3b --skip-hf --prefill '' --decode 1x128 --repeats 3
    python3 bench/gpu/preload_ab.py --every-one-row --greedy -- qwen3-moe deepseek-v3
    python3 bench/gpu/preload_ab.py --tiles pre:16:4096:1:16 --profile -- \
        --preset qwen3-30b-a3b --decode 1x128 --top 24
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

from bench.skinny_gemm import parse_tiles
from engine.kernels import pdl, skinny_gemm

# The O projections (Qwen3-30B-A3B's, Moonlight's, Llama-3-8B's) and the first projections
# (Qwen3-30B-A3B's QKV, Moonlight's fused query-and-latent, Llama-3-8B's QKV), [N, K].
O_SHAPES = ((2048, 4096), (2048, 2048), (4096, 4096))
QKV_SHAPES = ((5120, 2048), (3648, 2048), (6144, 4096))


def tune_one_row(text: str, shapes: tuple[tuple[int, int], ...]) -> None:
    """`TUNED`'s tiles at one row for the shapes whose K the tiles hold whole."""
    (tiles,) = parse_tiles(text)
    span = tiles.block_k * tiles.split_k
    for n, k in shapes:
        if k <= span < 2 * k:
            key = ("linear", n, k, "bfloat16")
            skinny_gemm.TUNED[key] = ((1, tiles), *skinny_gemm.TUNED.get(key, ()))


def moe_prefill_before() -> None:
    """The MoE tables' `_PREFILL_TILES` rows (a 4-stage gate-up, a 128 x 256 down) back to
    the one config they replaced, for an engine A/B."""
    from engine.kernels import fused_moe_configs as configs

    before = configs.MoEKernelConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3, tma=True)
    for key, rows in configs.TUNED.items():
        configs.TUNED[key] = tuple(
            (t, before if c is configs._PREFILL_TILES else c) for t, c in rows
        )


def without_preload() -> None:
    """`TUNED` without its preloading rows: the products they took go as before them."""
    for key, rows in list(skinny_gemm.TUNED.items()):
        kept = tuple((m, t) for m, t in rows if t is None or not t.preload)
        if kept:
            skinny_gemm.TUNED[key] = kept
        else:
            del skinny_gemm.TUNED[key]


def every_one_row() -> None:
    """Every one-row product on preloading tiles (8 rows of W a program, K whole), whichever
    of the skinny GEMM backend's lookups asks (`tuned_tiles` for `auto`, `pick_tiles`)."""
    tuned, rule = skinny_gemm.tuned_tiles, skinny_gemm.pick_tiles

    def preload(k: int) -> skinny_gemm.SkinnyTiles:
        return skinny_gemm.SkinnyTiles(
            8, triton.next_power_of_2(k), dot=False, num_warps=4, preload=True
        )

    def tiles(
        kind: str, m: int, n: int, k: int, dtype: torch.dtype
    ) -> skinny_gemm.SkinnyTiles | None:
        return preload(k) if m == 1 and kind == "linear" else tuned(kind, m, n, k, dtype)

    def picked(
        m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16, gated: bool = False
    ) -> skinny_gemm.SkinnyTiles:
        return preload(k) if m == 1 and not gated else rule(m, n, k, dtype, gated)

    skinny_gemm.tuned_tiles = tiles
    skinny_gemm.pick_tiles = picked


def tuned_row(text: str) -> None:
    """`KIND:N:K:ROWS=TILES` (TILES as `bench.skinny_gemm --tiles` spells one, or `cublas`):
    `TUNED`'s rows for that weight from ROWS up replaced by one, so that the row counts after
    the last row kept up to ROWS take TILES."""
    key_text, spec = text.split("=")
    kind, n, k, rows = key_text.split(":")
    tiles = None if spec == "cublas" else parse_tiles(spec)[0]
    key = (kind, int(n), int(k), "bfloat16")
    kept = tuple(row for row in skinny_gemm.TUNED.get(key, ()) if row[0] < int(rows))
    skinny_gemm.TUNED[key] = (*kept, (int(rows), tiles))


def down_preload(text: str) -> None:
    """The small MoE path's down on `fused_moe_small.small_down_preload_kernel` for every
    model (`SmallBatchTiles.down_preload`), at `DOWN_N,DOWN_K` columns and K step ("": each
    default tiles' own)."""
    import dataclasses

    from engine.kernels import fused_moe_small

    sizes = {}
    if text:
        down_n, down_k = (int(v) for v in text.split(","))
        sizes = {"down_n": down_n, "down_k": down_k}
    for name in ("DEFAULT_TILES", "DOT_TILES"):
        tiles = getattr(fused_moe_small, name)
        setattr(fused_moe_small, name, dataclasses.replace(tiles, down_preload=True, **sizes))


def greedy_one_by_one(families: list[str]) -> None:
    """`bench.gpu.greedy_gpu`'s float32 check with each prompt alone (a decode batch of one,
    where the preloading tiles and the early triggers run), CUDA graphs on and off, against
    transformers on the CPU."""
    from pathlib import Path

    from bench.gpu.greedy_gpu import GREEDY, engine
    from engine.testing.tiny_models import write_tiny_models
    from tests.engine.greedy import divergences
    from tests.engine.reference import reference

    for family, path in write_tiny_models(Path("/tmp/pdserve-tiny")).items():
        if families and family not in families:
            continue
        ref = reference(path, device="cpu")
        for graphs in (True, False):
            eng = engine(path, "float32", "triton", graphs)
            outs = [eng.generate([p], GREEDY)[0].output_ids for p in ref.prompts]
            del eng
            found = [(d.prompt, d.step, f"{d.gap:.2e}") for d in divergences(outs, ref)]
            print(
                f"{family}: float32 triton graphs={graphs!s:5} one by one vs transformers: {found}"
            )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", default="", help="the O projection's tiles at one row")
    parser.add_argument("--qkv-tiles", default="", help="the first projection's, at one row")
    parser.add_argument(
        "--without-preload",
        action="store_true",
        help="TUNED's one-row preloading rows left out (cuBLAS or TMA tiles there, as before)",
    )
    parser.add_argument(
        "--preload-trigger",
        type=int,
        help="1 or 0: preloading launches let their successor be scheduled first or not "
        "(default: skinny_gemm.PRELOAD_TRIGGERS_FIRST)",
    )
    parser.add_argument(
        "--output-absorb-rows",
        type=int,
        help="triton_attention.HEAD_BMM_OUTPUT_MAX_ROWS: MLA's W_UV product on head_bmm up to "
        "these rows (in the PDL chain before O)",
    )
    parser.add_argument(
        "--down-preload",
        metavar="DOWN_N,DOWN_K",
        help="the small MoE path's down routing again and preloading its first K step, at "
        "these tiles ('': the defaults')",
    )
    parser.add_argument(
        "--norm-in-qkv",
        type=int,
        help="1 or 0: the input norm inside the first projection's preloading launch at one "
        "row (default: skinny_gemm.NORM_IN_PRELOAD)",
    )
    parser.add_argument(
        "--more-trigger-first",
        type=int,
        help="1 or 0: RoPE with the KV write and the norm with the gate's logits trigger first "
        "at one row too (default: pdl.MORE_TRIGGER_FIRST)",
    )
    parser.add_argument(
        "--tuned-row",
        action="append",
        default=[],
        metavar="KIND:N:K:ROWS=TILES",
        help="TUNED's rows for a weight from ROWS up replaced by TILES (or cublas), repeatable",
    )
    parser.add_argument(
        "--moe-prefill-before",
        action="store_true",
        help="the MoE tables' prefill rows as before the thirtieth session (one 128 x 128 x 64 "
        "TMA config, 3 stages, for both GEMMs)",
    )
    parser.add_argument("--every-one-row", action="store_true")
    parser.add_argument("--trigger-first", type=int, default=1)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="bench.profile_decode's kernel table instead"
    )
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    pdl.TRIGGER_FIRST_MAX_ROWS = 1 if args.trigger_first else 0
    if args.preload_trigger is not None:
        skinny_gemm.PRELOAD_TRIGGERS_FIRST = bool(args.preload_trigger)
    if args.output_absorb_rows is not None:
        from engine.layers import triton_attention

        triton_attention.HEAD_BMM_OUTPUT_MAX_ROWS = args.output_absorb_rows
    if args.without_preload:
        without_preload()
    if args.tiles:
        tune_one_row(args.tiles, O_SHAPES)
    if args.qkv_tiles:
        tune_one_row(args.qkv_tiles, QKV_SHAPES)
    for row in args.tuned_row:
        tuned_row(row)
    if args.every_one_row:
        every_one_row()
    if args.moe_prefill_before:
        moe_prefill_before()
    if args.down_preload is not None:
        down_preload(args.down_preload)
    if args.norm_in_qkv is not None:
        skinny_gemm.NORM_IN_PRELOAD = bool(args.norm_in_qkv)
    if args.more_trigger_first is not None:
        pdl.MORE_TRIGGER_FIRST = bool(args.more_trigger_first)
    print(
        f"O at one row: {args.tiles or 'TUNED'}, QKV: {args.qkv_tiles or 'TUNED'}, TUNED's "
        f"preloading rows: {not args.without_preload}, every one-row product preloaded: "
        f"{args.every_one_row}, trigger first: {args.trigger_first}, preloading launches "
        f"trigger first: {skinny_gemm.PRELOAD_TRIGGERS_FIRST}, MoE down preloaded: "
        f"{args.down_preload}, norm in the first projection: {skinny_gemm.NORM_IN_PRELOAD}, more "
        f"trigger first: {pdl.MORE_TRIGGER_FIRST}, TUNED rows replaced: {args.tuned_row or '-'}, "
        f"MoE prefill rows as before: {args.moe_prefill_before}"
    )
    if args.greedy:
        greedy_one_by_one(rest)
    elif args.profile:
        from bench.profile_decode import main as profile_main

        profile_main(rest)
    else:
        from bench.engine import main as engine_main

        engine_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
