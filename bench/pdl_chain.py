"""What one link of a decode step's chain of launches costs: a chain of tiny dependent kernels.

    python -m bench.pdl_chain                           # 1, 132 and 640 programs, PDL modes
    python -m bench.pdl_chain --programs 1,640 --links 480 --modes 0,1,3

At batch 1 a layer is about nine launches (Qwen3-30B-A3B: norm, QKV, RoPE with the KV write,
decode split, combine, O, norm with the gate, gate-up, down), each reading what the one before
wrote. However little each moves, the next cannot read before the last has finished and its
writes are visible: with programmatic dependent launch (`engine.kernels.pdl`) the next one's
programs are resident and wait at `griddepcontrol.wait`, without it the next launch starts only
then. This times `--links` launches of a kernel whose programs each wait, read `--block`
values the previous link wrote, add one and store them, in a CUDA graph (as the engine's decode
step runs), per PDL mode (0 off, 1 the engine's default: the next link is scheduled as this
one's programs finish, 3 as they start) and number of programs, and prints the cost of a link.
That cost times the links a layer has is what fusing launches can win at batch 1; the floor
column is the link's bytes over the copy bandwidth measured here (far below the cost: a link is
latency, not bytes).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from bench.ceiling import copy_bandwidth
from bench.moe_kernel import time_graph
from engine.kernels import pdl


@triton.jit
def link_kernel(src, dst, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One link: after the wait, each program's BLOCK values of `src` plus one into `dst`."""
    if PDL == 3:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs) + 1.0)


def run_chain(a: torch.Tensor, b: torch.Tensor, links: int, programs: int, block: int,
              mode: int) -> None:  # fmt: skip
    """`links` launches, each from one buffer into the other (a's values end `links` higher,
    in a or b by the parity)."""
    launch = {"PDL": mode, "launch_pdl": True} if mode else {"PDL": 0}
    for i in range(links):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        link_kernel[(programs,)](src, dst, BLOCK=block, num_warps=4, **launch)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", default="1,132,640", help="programs a link, comma-separated")
    parser.add_argument(
        "--modes", default="0,1,3", help="PDL modes: 0 off, 1 wait, 3 trigger first"
    )
    parser.add_argument(
        "--links", type=int, default=480, help="links in the chain (48 layers x 10)"
    )
    parser.add_argument("--block", type=int, default=512, help="float32 values a program moves")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --device cpu (under TRITON_INTERPRET=1) for a smoke run")
    programs = [int(p) for p in args.programs.split(",")]
    # PDL needs Hopper (and a Triton with launch_pdl): elsewhere only mode 0 runs.
    modes = [int(m) for m in args.modes.split(",") if int(m) == 0 or pdl.launch_args(
        torch.empty(0, device=device))["PDL"]]  # fmt: skip
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else 0.0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"{name}, copy {bandwidth / 1e9:,.0f} GB/s, {args.links} links, {args.block} floats "
          "a program\n")  # fmt: skip
    print("| programs | PDL mode | µs a link | floor µs (bytes) | x floor |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for count in programs:
        a = torch.zeros(count * args.block, device=device)
        b = torch.zeros_like(a)
        floor_us = 2 * a.numel() * 4 / bandwidth * 1e6 if bandwidth else 0.0
        for mode in modes:
            a.zero_()
            chain = functools.partial(run_chain, a, b, args.links, count, args.block, mode)
            seconds = time_graph(chain, args.reps)
            per_link = seconds / args.links * 1e6
            ratio = f"{per_link / floor_us:,.0f}" if floor_us else "-"
            print(f"| {count} | {mode} | {per_link:.2f} | {floor_us:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
