"""How close one launch that only reads can come to the copy rate, at a decode layer's sizes.

    python -m bench.read_kernel                             # 8-126 MB, 1-4 programs an SM
    python -m bench.read_kernel --sizes-mb 75 --programs-per-sm 3 --chain 50,25

Every memory-bound kernel's floor here is its bytes over the device-to-device copy rate
(`bench.ceiling`), measured on 2 GiB. A decode step at batch 1 reads each layer's weights in
pieces of 8-126 MB (Qwen3-30B-A3B: QKV 21 MB, O 17, the eight experts' gate-up 50 and down
25), where a launch's ramp and tail are a larger share. This times launches of a kernel that
only reads (each program sums its contiguous share of the bytes, `--unroll` steps of
`--block` bytes a thread in flight, and stores one value) at each size and grid, as CUDA graphs
of `--layers` launches over as many buffers (so that no launch finds its bytes in L2), and
prints each one's time against that floor. `--chain A,B` also times a read of A MB then one of
B MB in two launches with programmatic dependent launch (the engine's default mode), against
one launch of A + B: what the boundary between two memory-bound kernels costs where neither
waits for the other's data. The ratios say how much of a kernel's distance from its floor
is the memory system's, and how much is the kernel's own.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from bench.args import int_list
from bench.ceiling import copy_bandwidth
from bench.moe_kernel import time_graph
from engine.kernels import pdl
from engine.kernels.sms import sm_count


@triton.jit
def read_kernel(x, out, per_program, total, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                PDL: tl.constexpr):  # fmt: skip
    """Program p sums int32 words `[p * per_program, (p + 1) * per_program)` of `x` (up to
    `total`), UNROLL loads of BLOCK words in flight a step, and stores the sum to `out[p]`."""
    pdl.start(PDL)
    start = tl.program_id(0).to(tl.int64) * per_program
    end = tl.minimum(start + per_program, total)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for base in range(start, end, BLOCK * UNROLL):
        for u in tl.static_range(UNROLL):
            at = base + u * BLOCK + offs
            acc += tl.load(x + at, mask=at < end, other=0)
    tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))


def launch_read(
    x: torch.Tensor, out: torch.Tensor, programs: int, block: int, unroll: int, warps: int
) -> None:
    """One read of all of `x` (int32) by `programs` programs into `out` `[programs]`."""
    total = x.numel()
    per_program = triton.cdiv(triton.cdiv(total, programs), block) * block
    read_kernel[(programs,)](
        x, out, per_program, total, BLOCK=block, UNROLL=unroll, num_warps=warps,
        **pdl.launch_args(x),
    )  # fmt: skip


def buffers(nbytes: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """`count` int32 buffers of `nbytes` each (filled: no first-touch cost in the timing)."""
    return [torch.ones(nbytes // 4, dtype=torch.int32, device=device) for _ in range(count)]


def time_reads(bufs: list[torch.Tensor], programs: int, block: int, unroll: int, warps: int,
               reps: int) -> float:  # fmt: skip
    """Seconds a launch: a graph of one launch per buffer, over the buffers' count."""
    out = torch.empty(programs, dtype=torch.int32, device=bufs[0].device)

    def run() -> None:
        for b in bufs:
            launch_read(b, out, programs, block, unroll, warps)

    return time_graph(run, reps) / len(bufs)


def time_chain(first: list[torch.Tensor], second: list[torch.Tensor], programs: tuple[int, int],
               block: int, unroll: int, warps: int, reps: int) -> float:  # fmt: skip
    """Seconds a pair: a read of a `first` buffer then one of a `second` buffer, two launches."""
    outs = [torch.empty(p, dtype=torch.int32, device=first[0].device) for p in programs]

    def run() -> None:
        for a, b in zip(first, second, strict=True):
            launch_read(a, outs[0], programs[0], block, unroll, warps)
            launch_read(b, outs[1], programs[1], block, unroll, warps)

    return time_graph(run, reps) / len(first)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int_list, default=[8, 17, 25, 50, 75, 126])
    parser.add_argument("--programs-per-sm", type=int_list, default=[1, 2, 3, 4])
    parser.add_argument("--block", type=int_list, default=[1024], help="int32 words a load")
    parser.add_argument("--unroll", type=int_list, default=[1, 2, 4], help="loads in flight")
    parser.add_argument("--num-warps", type=int_list, default=[4, 8])
    parser.add_argument("--chain", default="", help="A,B: two reads in two launches (MB)")
    parser.add_argument("--layers", type=int, default=8, help="buffers cycled per replay")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a smoke run under TRITON_INTERPRET=1 (no meaningful times)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here (--device cpu with TRITON_INTERPRET=1 smokes it)")
    device = torch.device(args.device)
    rate = copy_bandwidth(device)
    sms = sm_count(device) if device.type == "cuda" else 4
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}: copy {rate / 1e9:,.0f} GB/s (read + write), {sms} SMs; {args.layers} "
          f"buffers cycled a replay, median of {args.reps}\n")  # fmt: skip
    print(
        "| MB | programs | warps | bytes a load step | loads in flight | µs | floor µs | x floor |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    configs = list(itertools.product(args.programs_per_sm, args.num_warps, args.block, args.unroll))
    best: dict[int, tuple[float, str]] = {}
    for mb in args.sizes_mb:
        nbytes = mb << 20
        bufs = buffers(nbytes, args.layers, device)
        floor = nbytes / rate
        for per_sm, warps, block, unroll in configs:
            programs = per_sm * sms
            seconds = time_reads(bufs, programs, block, unroll, warps, args.reps)
            label = f"{programs} x {warps} warps, {block * 4} B x {unroll}"
            if seconds < best.get(mb, (float("inf"), ""))[0]:
                best[mb] = (seconds, label)
            print(f"| {mb} | {programs} | {warps} | {block * 4} | {unroll} | "
                  f"{seconds * 1e6:.1f} | {floor * 1e6:.1f} | {seconds / floor:.2f} |")  # fmt: skip
        del bufs
    print("\nbest a size: " + "; ".join(
        f"{mb} MB {s * 1e6:.1f} µs ({s / ((mb << 20) / rate):.2f}x, {label})"
        for mb, (s, label) in best.items()
    ))  # fmt: skip
    if args.chain:
        a_mb, b_mb = (int(v) for v in args.chain.split(","))
        per_sm, warps, block, unroll = configs[0]
        first = buffers(a_mb << 20, args.layers, device)
        second = buffers(b_mb << 20, args.layers, device)
        both = buffers((a_mb + b_mb) << 20, args.layers, device)
        programs = per_sm * sms
        chained = time_chain(first, second, (programs, programs), block, unroll, warps, args.reps)
        single = time_reads(both, programs, block, unroll, warps, args.reps)
        floor = ((a_mb + b_mb) << 20) / rate
        print(f"\nchain {a_mb} + {b_mb} MB ({programs} programs a launch, {warps} warps, "
              f"{block * 4} B x {unroll}): two launches {chained * 1e6:.1f} µs, one launch of "
              f"{a_mb + b_mb} MB {single * 1e6:.1f} µs, floor {floor * 1e6:.1f} µs; the "
              f"boundary {(chained - single) * 1e6:.1f} µs")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
