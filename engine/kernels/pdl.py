"""Programmatic dependent launch (PDL) for the decode step's small Triton kernels (Hopper and
later).

In a decode step at batch 1 most kernels run for a few microseconds, and each one's launch and
ramp-up waits for the previous kernel to finish entirely. A kernel launched with PDL is
scheduled as soon as every program of the kernel before it has signalled, and its programs
then wait at `griddepcontrol.wait` until that kernel has finished and its writes are visible:
only the launch and the set-up before the wait overlap, so the results are the same.

Each kernel that takes part has a `PDL: tl.constexpr` argument and calls `start(PDL)` before
its first load or store; `launch_args(x)` gives the launch keywords (`PDL` and Triton's
`launch_pdl`) for a launch whose tensors are like `x`. `PDSERVE_PDL=wait` (the default; also
`1`) lets each kernel's successor be scheduled as this kernel's programs finish; `early` as
soon as they start (the successor's programs then hold SM resources while they wait: on the
H200 a batch-16 Llama-3-8B step went from 5.2 to 7.0 ms, the RMSNorm kernels waiting on the
skinny GEMMs); `0` turns it off. Measured with `bench.engine --preset llama3-8b` on the H200,
PDL off / wait at 1x128, 16x128, 64x128: 4.85 / 4.46, 5.39 / 4.75, 5.56 / 5.40 ms (two
machines of that kind). Off, whatever the setting, under Triton's interpreter, off CUDA,
before sm_90, with CUDA before 12.3 (graph capture of such launches), and with a Triton that
lacks `launch_pdl`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from engine.config import pdl_mode_from_env


@functools.cache
def _mode() -> int:
    mode = pdl_mode_from_env()  # unset: "wait" (measured faster, above)
    if not mode or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return 0
    # CUDA graphs capture programmatic launches as graph edges from CUDA 12.3 on.
    version = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if version < (12, 3):
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
