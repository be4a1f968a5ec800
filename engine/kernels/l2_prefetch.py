"""Asking L2 for a weight before the kernel that reads it (Hopper's bulk prefetch), so that a
decode step's memory bus works while latency-bound kernels run.

At batch 1 a decode layer alternates kernels that stream weights (the projections, the
experts) with kernels that are latency-bound and leave the bus idle for several µs (RoPE and
the KV store, attention, norms, routing). `cp.async.bulk.prefetch.L2` (sm_90) asks L2 for up
to a whole range of bytes in one instruction, issued by one thread, with no SM resources held
while the bytes arrive; the kernel that then reads the weight finds it in L2.

`PDSERVE_L2_PREFETCH` (engine.config) names where the engine asks, off by default until it is
measured (`python -m bench.l2_prefetch` for the mechanism; engine A/Bs in bench/NOTES.md):

- `o`: the O projection's weight, launched right after the QKV projection (it streams while
  RoPE, the KV store and attention run);
- `down`: the routed experts' down weights, asked by the small-batch MoE's gate-up kernel
  once it has routed (`engine.kernels.fused_moe_small`), so they stream beside the gate-up's
  own reads;
- `qkv`: the next layer's first projection (QKV; MLA's fused query-and-latent), asked just
  before a MoE layer's experts run on the small-batch path (`MoEBackend.prefetch_ahead`), so
  that it streams beside them, which leave about a third of the bus unused at batch 1.

With `down` or `qkv` the small-batch MoE's kernels read the experts' weights with an
evict-first hint: each is read once, and a weight asked ahead should outlive them in L2.

The prefetch reads only weights, which no kernel of the step writes, so it is issued before
the PDL wait; the kernel then waits as every kernel in the chain does, so the ordering of the
kernels around it is unchanged. It changes no result. Off CUDA, before sm_90 and under Triton's
interpreter (which cannot run inline PTX) nothing is launched.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from engine.config import l2_prefetch_targets_from_env
from engine.kernels import pdl

CHUNK = 65536  # bytes a prefetch instruction asks for
SLOTS = 128  # instructions a program issues at once (one a thread of 4 warps)
# A weight larger than this is not asked for whole: it would evict itself from a 50 MB L2
# (an H100's or H200's) before its GEMM reads it.
MAX_BYTES = 40 << 20


@triton.jit
def prefetch_bytes(base, nbytes, CHUNK: tl.constexpr, SLOTS: tl.constexpr):
    """Ask L2 for `nbytes` bytes from `base` (16-byte aligned), one bulk prefetch of up to
    CHUNK bytes (a multiple of 16) a slot; lanes past the end ask for `base`'s first 16 bytes
    again (harmless) instead of leaving the range."""
    start_ptr = base.to(tl.pointer_type(tl.int8))
    slots = tl.arange(0, SLOTS).to(tl.int64)
    total = nbytes.to(tl.int64)
    for first in range(0, total, SLOTS * CHUNK):
        start = first + slots * CHUNK
        live = start + 16 <= total
        size = (tl.minimum(total - start, CHUNK) // 16) * 16
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
            "=r,l,r",
            [start_ptr + tl.where(live, start, 0), tl.where(live, size, 16).to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def l2_prefetch_kernel(base, nbytes, CHUNK: tl.constexpr, SLOTS: tl.constexpr, PDL: tl.constexpr):
    """Program i asks for bytes `[i * SLOTS * CHUNK, (i + 1) * SLOTS * CHUNK)` of the range,
    then takes its place in the PDL chain."""
    first = tl.program_id(0).to(tl.int64) * (SLOTS * CHUNK)
    span = tl.minimum(nbytes - first, SLOTS * CHUNK)
    prefetch_bytes(base.to(tl.pointer_type(tl.int8)) + first, span, CHUNK, SLOTS)
    pdl.start(PDL)


@functools.cache
def targets() -> frozenset[str]:
    """`PDSERVE_L2_PREFETCH`'s targets, read once (EngineConfig checked the value at start)."""
    return l2_prefetch_targets_from_env()


@functools.cache
def _supported(device_index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(target: str, x: torch.Tensor) -> bool:
    """Whether `PDSERVE_L2_PREFETCH` names `target` and a prefetch can run beside `x`."""
    if target not in targets() or not x.is_cuda:
        return False
    return _supported(x.device.index if x.device.index is not None else 0)


def prefetchable(t: torch.Tensor, max_bytes: int = MAX_BYTES) -> bool:
    """A contiguous, 16-byte-aligned range of at most `max_bytes` (what the instruction and
    the cache can take)."""
    nbytes = t.numel() * t.element_size()
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and 16 <= nbytes <= max_bytes


def prefetch(t: torch.Tensor) -> None:
    """Launch `l2_prefetch_kernel` over `t`'s bytes (a no-op where `prefetchable` says no)."""
    if not prefetchable(t):
        return
    nbytes = t.numel() * t.element_size()
    grid = (triton.cdiv(nbytes, SLOTS * CHUNK),)
    l2_prefetch_kernel[grid](t, nbytes, CHUNK=CHUNK, SLOTS=SLOTS, num_warps=4, **pdl.launch_args(t))
