"""Whether asking L2 for a projection's weight while a latency-bound kernel runs makes that
projection faster (the batch-1 decode step: attention, norms and routing leave the memory
bus idle for several µs a layer, then each projection streams its weight from HBM).

    python -m bench.l2_prefetch                  # Qwen3-30B-A3B's and Llama-3-8B's O and QKV
    python -m bench.l2_prefetch --idle-us 3,6 --layers 8

Per layer, in one CUDA graph of `--layers` layers (their weights more than the L2): a spin
kernel of `--idle-us` (`torch.cuda._sleep`: the latency-bound work), then `F.linear` of one row
against that layer's weight. Variants: `none`; `inline`, the engine's prefetch kernel
(`engine.kernels.l2_prefetch`: `cp.async.bulk.prefetch.L2` over the weight, `--chunks` bytes an
instruction) launched on the stream just before the spin; `side`, the same kernel forked on a
second stream beside the spin; `lines`, the inline variant with one `prefetch.global.L2` per
128-byte line instead. Times are µs a layer (median of
graph replays); "saved" is the none variant's minus the variant's.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.args import int_list
from bench.ceiling import copy_bandwidth
from bench.moe_kernel import time_graph
from engine.kernels import l2_prefetch

SHAPES = {  # name: (out features, in features)
    "qwen3_o": (2048, 4096),
    "qwen3_qkv": (5120, 2048),
    "llama_o": (4096, 4096),
}


@triton.jit
def line_prefetch_kernel(base, nbytes, BLOCK: tl.constexpr):
    """One `prefetch.global.L2` per 128-byte line."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start = offs.to(tl.int64) * 128
    ptr = base.to(tl.pointer_type(tl.int8)) + tl.where(start < nbytes, start, 0)
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
        "=r,l",
        [ptr],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def prefetch(w: torch.Tensor, kind: str) -> None:
    """`bulk`: the engine's kernel (`engine.kernels.l2_prefetch`); `lines`: one instruction
    per 128-byte line."""
    if kind == "bulk":
        l2_prefetch.prefetch(w)
        return
    nbytes = w.numel() * w.element_size()
    block = 1024
    grid = (triton.cdiv(triton.cdiv(nbytes, 128), block),)
    line_prefetch_kernel[grid](w, nbytes, BLOCK=block, num_warps=4)


def run(
    xs: list[torch.Tensor], ws: list[torch.Tensor], idle_cycles: int, variant: str,
    side: torch.cuda.Stream,
) -> None:  # fmt: skip
    main = torch.cuda.current_stream()
    for i, x in enumerate(xs):
        if not ws:  # the spins alone
            torch.cuda._sleep(idle_cycles)
            continue
        w = ws[i]
        if variant == "side":
            side.wait_stream(main)
            with torch.cuda.stream(side):
                prefetch(w, "bulk")
        elif variant in ("inline", "lines"):
            prefetch(w, "bulk" if variant == "inline" else "lines")
        if idle_cycles:
            torch.cuda._sleep(idle_cycles)
        F.linear(x, w)
    if variant == "side":
        main.wait_stream(side)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--idle-us", type=int_list, default=(0, 3, 6))
    p.add_argument("--chunks", type=int_list, default=(65536,))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    unknown = sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        p.error(f"--shapes takes {', '.join(SHAPES)}; got {', '.join(unknown)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (the prefetch is sm_90 PTX)")
    bandwidth = copy_bandwidth()
    clock_hz = 1.98e9  # the H200's boost clock: "spin alone" shows what the cycles took
    print(
        f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e9:.0f} GB/s; µs a layer, median "
        f"of {args.reps} replays\n\n| weight | idle µs | chunk | spin alone | none | inline "
        "| side | lines | floor | saved inline | saved side |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    side = torch.cuda.Stream()
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        ws = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(args.layers)]
        xs = [torch.randn(1, k, device="cuda").bfloat16() for _ in range(args.layers)]
        floor_us = n * k * 2 / bandwidth * 1e6
        for idle in args.idle_us:
            cycles = int(idle * 1e-6 * clock_hz)
            spins = functools.partial(run, xs, [], cycles, "none", side)
            spin = time_graph(spins, args.reps) / args.layers * 1e6 if cycles else 0.0
            for chunk in args.chunks:
                l2_prefetch.CHUNK = chunk  # read by each launch
                us = {}
                for variant in ("none", "inline", "side", "lines"):
                    fn = functools.partial(run, xs, ws, cycles, variant, side)
                    try:
                        us[variant] = time_graph(fn, args.reps) / args.layers * 1e6
                    except Exception as exc:  # an assembler that refuses the PTX
                        print(f"  {variant}: {type(exc).__name__}: {str(exc)[:200]}")
                        us[variant] = float("nan")
                print(
                    f"| {name} {n}x{k} | {idle} | {chunk} | {spin:.1f} | {us['none']:.1f} "
                    f"| {us['inline']:.1f} | {us['side']:.1f} | {us['lines']:.1f} "
                    f"| {floor_us:.1f} | {us['none'] - us['inline']:.1f} "
                    f"| {us['none'] - us['side']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
