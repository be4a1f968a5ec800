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


# `launch_args(trigger_first=True)`: the kernel lets its successor be scheduled before it waits
# on its own predecessor, so that a chain of such kernels has the kernel after it resident from
# the chain's start; that one (`skinny_gemm`'s preloading tiles) loads its weights before its
# own wait. At batch 1: the decode attention's split and combine launches (MLA's decode,
# combine and output absorption) before the O projection, while they leave the memory bus
# idle; the small MoE path's down launch and the RMSNorm after it before the next layer's
# first projection, beside the down's own loads. Each kernel still waits for its predecessor
# before touching memory, and each predecessor for its own, so what every kernel reads is the
# same.
TRIGGER_FIRST = 3
# The decode rows at or under which those launches trigger first: at batch 1 the attention's
# programs are few and leave the SMs free for the preloading product's (`skinny_gemm.TUNED`'s
# one-row rows). On an H100, back to back, Qwen3-30B-A3B 1 x 128 3.28 -> 3.08 ms and Moonlight
# 2.65 -> 2.54 with both; Llama-3-8B (whose O does not fit the registers) 5.70 -> 5.69.
TRIGGER_FIRST_MAX_ROWS = 1
# Whether, at those rows, two more launches trigger first: RoPE with the KV write (its successor
# the decode attention's split, a few programs) and the norm with the gate's logits (the small
# MoE path's gate-up, so that its programs are resident when the logits land). Off: on an H100
# (`bash bench/gpu/session.sh b24`, the twenty-first session, alternating) Qwen3-30B-A3B 1 x
# 128 2.94 / 2.95 ms off against 2.96 / 2.97 on, Moonlight level (2.41 / 2.40 against 2.40 /
# 2.39). Safe either way: each successor still waits before it reads.
MORE_TRIGGER_FIRST = False


def trigger_first(rows: int) -> bool:
    """Whether a launch of `rows` decode rows lets its successor be scheduled first."""
    return rows <= TRIGGER_FIRST_MAX_ROWS


def more_trigger_first(rows: int) -> bool:
    """`trigger_first` for the launches `MORE_TRIGGER_FIRST` adds."""
    return MORE_TRIGGER_FIRST and trigger_first(rows)


def launch_args(
    x: torch.Tensor, trigger_first: bool = False, trigger_after_wait: bool = False
) -> dict[str, int | bool]:
    """Keywords for a launch of a kernel with a `PDL` argument, on tensors like `x`;
    `trigger_first`: its successor is scheduled as this kernel's programs start, before they
    wait; `trigger_after_wait`: as they pass their wait (mode 2: the successor may then read,
    before its own wait, what this kernel's predecessor wrote); either whatever the mode, where
    PDL is on."""
    mode = _mode() if x.is_cuda else 0
    if mode:
        if trigger_first:
            mode = TRIGGER_FIRST
        elif trigger_after_wait:
            mode = 2
        return {"PDL": mode, "launch_pdl": True}
    return {"PDL": 0}


@triton.jit
def start(PDL: tl.constexpr):
    """Wait for the kernel before this one (a no-op without PDL); with PDL 2 then let the next
    one be scheduled at once (it too waits before touching memory), with 1 only as this
    kernel's programs finish; with 3 (TRIGGER_FIRST) let the next one be scheduled first,
    then wait."""
    trigger_early(PDL)
    wait(PDL)


@triton.jit
def trigger_early(PDL: tl.constexpr):
    """`start`'s first half: with PDL 3 let the next kernel be scheduled now."""
    if PDL == 3:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """`start`'s second half, for a kernel that loads what no kernel writes in between
    (`trigger_early` first): the wait, then with PDL 2 the next kernel's scheduling."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
