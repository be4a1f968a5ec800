"""Greedy sampling's argmax on the GPU: `engine.kernels.argmax` against `torch.argmax`, over
a float32 logits row of a 128,256-token vocabulary (Llama-3's) at batch 1 to 256.

    python -m bench.argmax [--vocab 128256] [--batches 1,8,64,256]

Two times each: "device", a CUDA-graph replay of the call (its kernels alone, as in a decode
step's timeline); "alone", the call from Python between two synchronizations, launch included
(what it costs the host; overlapped scheduling hides it behind the step). Medians of `--reps`.
The floor is its bytes (B x vocab x 4) over the copy bandwidth measured in the same run. Both
results are checked equal first.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch

from bench.ceiling import copy_bandwidth
from bench.moe_kernel import time_graph
from engine.kernels.argmax import argmax


def time_alone(fn: Callable[[], torch.Tensor], reps: int) -> float:
    """Median seconds of `fn` between two synchronizations, by CUDA events."""
    times = []
    for _ in range(reps + 3):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[3:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.argmax needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e9:.0f} GB/s, vocab {args.vocab}")
    print("| batch | floor µs | torch device µs | triton device µs | triton / floor "
          "| torch alone µs | triton alone µs |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.randn(b, args.vocab, device="cuda")
        if not torch.equal(argmax(x), x.argmax(-1)):
            raise SystemExit(f"batch {b}: the kernel's argmax differs from torch's")
        floor = b * args.vocab * 4 / bandwidth
        ours, theirs = functools.partial(argmax, x), functools.partial(torch.argmax, x, -1)
        ours_device, theirs_device = time_graph(ours, args.reps), time_graph(theirs, args.reps)
        ours_alone, theirs_alone = time_alone(ours, args.reps), time_alone(theirs, args.reps)
        print(f"| {b} | {floor * 1e6:.1f} | {theirs_device * 1e6:.1f} | "
              f"{ours_device * 1e6:.1f} | {ours_device / floor:.1f}x | "
              f"{theirs_alone * 1e6:.1f} | {ours_alone * 1e6:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
