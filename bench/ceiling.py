"""What a device does at best, measured in the benchmark's own run: the floors' denominators."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _best_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Fastest of `reps` runs of `fn` (between CUDA events on a GPU, else the wall clock)."""
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            if device.type != "cpu":
                torch.accelerator.synchronize()
            start_s = time.perf_counter()
            fn()
            if device.type != "cpu":
                torch.accelerator.synchronize()
            best = min(best, time.perf_counter() - start_s)
    return best


def copy_bandwidth(device: torch.device | str = "cuda") -> float:
    """Device-to-device copy, bytes read + written per second: best of 10 copies of 2 GiB on
    an accelerator (far beyond its caches), of 3 copies of 256 MiB on the CPU."""
    device = torch.device(device)
    big = device.type != "cpu"
    nbytes = (2 << 30) if big else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device, 10 if big else 3)


def matmul_rate(device: torch.device | str, dtype: torch.dtype) -> float:
    """FLOP/s of an N^3 matrix product in `dtype` (N = 8192 on accelerators, 1024 on the CPU),
    best of 10 (3) after a warm-up (library heuristics, clocks)."""
    device = torch.device(device)
    big = device.type != "cpu"
    n = 8192 if big else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    return 2 * n**3 / _best_seconds(lambda: a @ b, device, 10 if big else 3)
