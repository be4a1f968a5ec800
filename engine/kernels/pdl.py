"""Programmatic dependent launch (PDL) for the decode step's small Triton kernels (Hopper and
later).

In a decode step at batch 1 most kernels run for a few microseconds, and each one's launch and
ramp-up waits for the previous kernel to finish entirely. A kernel launched with PDL is
scheduled as soon as every program of the kernel before it has signalled, and its programs
then wait at `griddepcontrol.wait` until that kernel has finished and its writes are visible:
only the launch and the set-up before the wait overlap, so the results are the same.

Each kernel that takes part has a `PDL: tl.constexpr` argument and calls `start(PDL)` before
its first load or store; `launch_args(x)` gives the launch keywords (`PDL` and Triton's
`launch_pdl`) for a launch whose tensors are like `x`. `PDSERVE_PDL=1` (or `early`) lets each
kernel's successor be scheduled as soon as it starts, `wait` only as its programs finish. Off
unless set, and
never under Triton's interpreter, off CUDA, before sm_90, or with a Triton that lacks
`launch_pdl`; `bench.engine` measures it on against off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


MODES = {"1": 2, "early": 2, "wait": 1}  # PDSERVE_PDL -> the kernels' PDL argument


@functools.cache
def _mode() -> int:
    mode = MODES.get(os.environ.get("PDSERVE_PDL", ""), 0)
    if not mode or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return 0
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return 0
    return mode if "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) else 0


def launch_args(x: torch.Tensor) -> dict[str, int | bool]:
    """Keywords for a launch of a kernel with a `PDL` argument, on tensors like `x`."""
    mode = _mode() if x.is_cuda else 0
    if mode:
        return {"PDL": mode, "launch_pdl": True}
    return {"PDL": 0}


@triton.jit
def start(PDL: tl.constexpr):
    """Wait for the kernel before this one (a no-op without PDL); with PDL 2 then let the next
    one be scheduled at once (it too waits before touching memory), with 1 only as this
    kernel's programs finish."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
