"""Skinny GEMMs on the GPU: `engine.kernels.skinny_gemm.skinny_linear` with each tile
configuration against cuBLAS (`F.linear`) at decode's few rows, to set `pick_tiles`.

    python -m bench.skinny_gemm                                   # Llama-3-8B, M = 1, 4, 16
    python -m bench.skinny_gemm --shapes qkv,o --rows 1 \
        --tiles fma:8:512,fma:8:1024,dot:16:256:1:4:4
    python -m bench.skinny_gemm --shapes moonlight_qkv_a,qkv --rows 256 --tiles wide
    TRITON_INTERPRET=1 python -m bench.skinny_gemm --device cpu --shapes tiny --rows 1,3 \
        --copies 1 --reps 1 --dtype float32

`y = x @ W.T` for Llama-3-8B's projections (`W` `[N, K]`: QKV 6144 x 4096, O 4096 x 4096,
gate-up 28672 x 4096, down 4096 x 14336, LM head 128256 x 4096; and Qwen3-30B-A3B's QKV 5120 x
2048 and O 2048 x 4096, `qwen3_qkv,qwen3_o`), no bias, bfloat16 (`--dtype`),
x of M rows. gate_up_silu: the gate-up projection with silu(gate) * up in the kernel's epilogue
(`skinny_gate_up`, output [M, 14336]) against cuBLAS followed by `fused.silu_and_mul`. Times
are medians of CUDA-graph replays of one call per weight copy, divided by the copies:
`--cycle-mib` (default 256 MiB, five times the 50 MB L2) of copies of W are cycled so that each
call reads its weight from memory, not from L2 (at least 2 copies; x stays the same, as the
previous kernel would have left it in L2). Floor: W plus x and y once, over the
device-to-device copy bandwidth measured in the same run (bytes read + written per second,
`bench.ceiling`). Tiles (`SkinnyTiles.label`): `dot`/`fma` (tensor or CUDA cores), block_n x
block_k, K splits, warps, stages; `*` marks `pick_tiles`' choice, `<` the fastest row of the
shape (cuBLAS included). CUDA-core tiles (a program per row of x) are left out above 4 rows.
rel err: max |y - y32| / max |y32| against `F.linear` in float32 on the same weights.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.args import int_list
from bench.ceiling import copy_bandwidth
from bench.moe_kernel import device_name, time_graph
from engine.kernels.skinny_gemm import (
    TILE_CONFIGS,
    WIDE_TILES,
    SkinnyTiles,
    pick_tiles,
    skinny_gate_up,
    skinny_linear,
)
from engine.layers.pending import materialize


def silu_times(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a gate-up output, rounded as the engine's unfused path rounds."""
    gate, up = y.chunk(2, dim=-1)
    return (F.silu(gate.float()).to(y.dtype).float() * up.float()).to(y.dtype)


def cublas_gate_up(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The engine's unfused path: cuBLAS, then fused.silu_and_mul (torch on the CPU)."""
    y = F.linear(x, w)
    if y.is_cuda:
        from engine.kernels import fused

        return fused.silu_and_mul(y)
    return silu_times(y)


# Llama-3-8B's projections, [N, K]; "tiny" for the CPU smoke run under the interpreter.
SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
    "gate_up_silu": (28672, 4096),  # gate-up with silu(gate) * up: y is [M, 14336]
    "qwen3_qkv": (5120, 2048),  # Qwen3-30B-A3B's attention (its MoE has its own kernels)
    "qwen3_o": (2048, 4096),
    # Moonlight-16B-A3B's MLA (no q-LoRA): the fused query and latent projection, the output.
    "moonlight_qkv_a": (3648, 2048),
    "moonlight_o": (2048, 2048),
    "tiny": (70, 300),
    "tiny_silu": (70, 300),
}
GATED = {"gate_up_silu", "tiny_silu"}  # against cuBLAS + fused.silu_and_mul
# The small ones first: what the kernel is for.
DEFAULT_SHAPES = "qkv,o,down,gate_up,gate_up_silu,lm_head"
FMA_MAX_ROWS = 4  # CUDA-core tiles (a program per row of x) are timed up to this many rows
Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, W) -> y


@dataclass
class Case:
    """One projection at M rows: `copies` weights cycled by each timed call sequence."""

    x: torch.Tensor  # [M, K]
    weights: list[torch.Tensor]  # copies of W [N, K]

    def run(self, linear: Linear) -> torch.Tensor:
        out = self.x
        for w in self.weights:
            out = linear(self.x, w)
        return out

    def measure(
        self, linear: Linear, want: torch.Tensor, reps: int, check: Linear | None = None
    ) -> tuple[float, float]:
        """µs per call of `linear` (graph replays over the copies) and the max error of
        `check` (default `linear`) relative to `want` (the float32 product with the last
        copy)."""
        seconds = time_graph(functools.partial(self.run, linear), reps) / len(self.weights)
        out = self.run(check or linear)
        err = (out.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)
        return seconds * 1e6, float(err)

    def floor_bytes(self, gated: bool = False) -> int:
        (m, k), n = self.x.shape, self.weights[0].shape[0]
        return (n * k + m * k + m * (n // 2 if gated else n)) * self.x.element_size()


def split_partials(x: torch.Tensor, w: torch.Tensor, tiles: SkinnyTiles) -> torch.Tensor:
    """The product without its reduce launch, as the engine runs O and down (the next norm
    sums the partials, engine.layers.pending): the float32 partials where K is split."""
    y = skinny_linear(x, w, tiles=tiles, defer=True)
    return y if isinstance(y, torch.Tensor) else y.parts


def split_summed(x: torch.Tensor, w: torch.Tensor, tiles: SkinnyTiles) -> torch.Tensor:
    """`split_partials`' result summed (its error)."""
    return materialize(skinny_linear(x, w, tiles=tiles, defer=True))


def make_weights(
    n: int, k: int, copies: int, dtype: torch.dtype, device: str
) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return [
        torch.randn(n, k, generator=g, device=device, dtype=dtype).mul_(k**-0.5)
        for _ in range(copies)
    ]


def parse_tiles(text: str) -> list[SkinnyTiles]:
    """`dot|tma|fma|pf|pre:block_n:block_k[:split_k[:warps[:stages[:block_m]]]]`,
    comma-separated (`tma`: the tensor cores with tiles loaded by the tensor-memory accelerator;
    `pf`: the CUDA cores with W's tiles prefetched one step ahead; `pre`: the CUDA cores with
    the program's whole tile loaded before the PDL wait; `block_m`: rows of x a program, 16-256,
    tensor cores only, else the rule's); `wide` adds `WIDE_TILES`, the candidates for 128-256
    rows."""
    tiles: list[SkinnyTiles] = []
    for item in text.split(","):
        if item == "wide":
            tiles.extend(WIDE_TILES)
            continue
        kind, *numbers = item.split(":")
        if kind not in ("dot", "tma", "fma", "pf", "pre") or not 2 <= len(numbers) <= 6:
            raise argparse.ArgumentTypeError(
                "expected dot|tma|fma|pf|pre:block_n:block_k[:split_k[:warps[:stages[:block_m]]]], "
                f"got {item!r}"
            )
        values = [int(v) for v in numbers]
        names = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "block_m")
        try:
            tiles.append(
                SkinnyTiles(
                    dot=kind in ("dot", "tma"),
                    tma=kind == "tma",
                    prefetch=kind == "pf",
                    preload=kind == "pre",
                    **dict(zip(names, values, strict=False)),
                )
            )
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return tiles


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"of {', '.join(SHAPES)}")
    p.add_argument("--rows", type=int_list, default=[1, 4, 16], help="M values")
    p.add_argument(
        "--tiles",
        type=parse_tiles,
        default=None,
        help="configurations instead of TILE_CONFIGS (the rule's is always added)",
    )
    p.add_argument("--cycle-mib", type=int, default=256, help="weight copies cycled, MiB")
    p.add_argument("--copies", type=int, default=0, help="weight copies (0: from --cycle-mib)")
    p.add_argument("--reps", type=int, default=20, help="timed replays per measurement")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument(
        "--defer",
        action="store_true",
        help="also time each split tile without its reduce launch (`defer` in the label): the\n"
        "engine leaves that sum to the next norm for O and down",
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a smoke run under TRITON_INTERPRET=1 (no meaningful times)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; --device cpu smokes the script under the interpreter")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu needs TRITON_INTERPRET=1 in the environment")
    if args.device == "cpu" and args.dtype == "bfloat16":
        p.error("--device cpu: the interpreter's dot takes no bfloat16; add --dtype float32")
    for name in args.shapes.split(","):
        if name not in SHAPES:
            p.error(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    if args.reps < 1 or args.copies < 0 or args.cycle_mib < 1:
        p.error("--reps and --cycle-mib must be >= 1, --copies >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(args.device) if args.device == "cuda" else 1e12
    configs = args.tiles or list(TILE_CONFIGS)
    baseline = "cuBLAS" if args.device == "cuda" else "torch"
    print(
        f"## Skinny GEMM: {device_name()}, torch {torch.__version__}; copy "
        f"{bandwidth / 1e12:.2f} TB/s (read + write"
        f"{'' if args.device == 'cuda' else ', a placeholder'}); {args.dtype}; "
        f"{args.cycle_mib} MiB of weight copies cycled; median of {args.reps}\n"
    )
    print(
        f"| proj | N x K | M | kernel | µs | floor µs | x floor | {baseline} / this | rel err |\n"
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        wbytes = n * k * dtype.itemsize
        copies = args.copies or max(2, min(16, -(-(args.cycle_mib << 20) // wbytes)))
        weights = make_weights(n, k, copies, dtype, args.device)
        for m in args.rows:
            case = Case(torch.randn(m, k, device=args.device, dtype=dtype), weights)
            gated = name in GATED
            floor_us = case.floor_bytes(gated) / bandwidth * 1e6
            want = F.linear(case.x.float(), weights[-1].float())
            if gated:
                want = silu_times(want.to(dtype)).float()
            rule = pick_tiles(m, n, k, dtype)
            reference = cublas_gate_up if gated else F.linear
            kernel = skinny_gate_up if gated else skinny_linear
            rows = [(baseline, *case.measure(reference, want, args.reps))]  # (kernel, µs, err)
            for tiles in [*configs, *([rule] if rule not in configs else [])]:
                if not tiles.dot and m > FMA_MAX_ROWS:
                    continue  # a program per row: not a candidate
                if gated and (tiles.prefetch or tiles.preload):
                    continue  # the prefetching tiles read one row of W a column
                if tiles.preload and tiles.block_k * tiles.split_k < k:
                    continue  # a preloading program holds its whole split
                label = tiles.label() + ("*" if tiles == rule else "")
                try:
                    linear = functools.partial(kernel, tiles=tiles)
                    rows.append((label, *case.measure(linear, want, args.reps)))
                    if args.defer and tiles.split_k > 1 and not gated:
                        timed = functools.partial(split_partials, tiles=tiles)
                        check = functools.partial(split_summed, tiles=tiles)
                        rows.append(
                            (f"{label} defer", *case.measure(timed, want, args.reps, check))
                        )
                except Exception as exc:  # a configuration that does not compile or launch
                    why = f"{type(exc).__name__}: {str(exc).splitlines()[:1]}"[:120]
                    print(f"| {name} | {n} x {k} | {m} | {label} | failed: {why} | | | | |")
                    if args.device == "cuda":
                        torch.cuda.synchronize()  # a sticky error shows here, not later
            baseline_us = rows[0][1]
            best = min(us for _, us, _ in rows)
            for label, us, err in rows:
                mark = "<" if us == best else ""
                print(
                    f"| {name} | {n} x {k} | {m} | {label}{mark} | {us:.1f} | {floor_us:.1f} | "
                    f"{us / floor_us:.2f} | {baseline_us / us:.2f} | {err:.1e} |",
                    flush=True,
                )
        del weights
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(
        f"\nfloor: W, x and y once over the copy bandwidth above. {baseline} / this > 1: faster "
        "than F.linear. *: pick_tiles' choice; <: the fastest at that shape and M. kernel: "
        "dot/fma (tensor/CUDA cores) block_n x block_k, K splits, warps, stages; defer: "
        "without the split's reduce launch (--defer)."
    )


if __name__ == "__main__":
    main()
