"""The one place that picks the device, its dtype and its collective backend.

`npu` imports `torch_npu` only when chosen: on hosts without Ascend's CANN, installing
torch_npu breaks `import torch` itself, so it is an optional extra (`pdserve[npu]`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICE_KINDS = ("auto", "cpu", "cuda", "npu")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Device:
    """A resolved device: where tensors live, which dtype by default, which collectives."""

    kind: str
    index: int = 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu") if self.kind == "cpu" else torch.device(self.kind, self.index)

    @property
    def dist_backend(self) -> str:
        return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[self.kind]

    @property
    def default_dtype(self) -> torch.dtype:
        # float32 on CPU keeps results comparable to the reference; accelerators serve bf16.
        return torch.float32 if self.kind == "cpu" else torch.bfloat16

    def resolve_dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return self.default_dtype
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected auto or one of {tuple(_DTYPES)}")
        return _DTYPES[name]

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.index)
        elif self.kind == "npu":
            torch.npu.synchronize(self.index)  # type: ignore[attr-defined]

    def make_current(self) -> None:
        """Make this the process's current device (collectives on NCCL and HCCL, and kernels
        launched without an explicit device, run there)."""
        if self.kind == "cuda":
            torch.cuda.set_device(self.index)
        elif self.kind == "npu":
            torch.npu.set_device(self.index)  # type: ignore[attr-defined]

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory; raises on CPU, whose budget is explicit."""
        if self.kind == "cuda":
            return torch.cuda.mem_get_info(self.index)
        if self.kind == "npu":
            return torch.npu.mem_get_info(self.index)  # type: ignore[attr-defined]
        raise ValueError("the CPU has no device memory budget; set the KV pool size explicitly")


def _import_torch_npu() -> None:
    try:
        importlib.import_module("torch_npu")
    except ImportError as exc:
        raise RuntimeError(
            "device 'npu' needs torch_npu and Ascend CANN: install pdserve[npu] on an Ascend host"
        ) from exc


def resolve_device(name: str = "auto", index: int = 0) -> Device:
    """Resolve `auto|cpu|cuda|npu[:index]` to a `Device`, checking that it is usable."""
    if ":" in name:
        name, _, idx = name.partition(":")
        index = int(idx)
    if name not in DEVICE_KINDS:
        raise ValueError(f"unknown device {name!r}; expected one of {DEVICE_KINDS}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but torch sees no CUDA device (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES, or pass --device cpu)"
        )
    if name == "npu":
        _import_torch_npu()
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise ValueError(
                "--device npu was asked for but torch_npu sees no NPU (check npu-smi and "
                "ASCEND_RT_VISIBLE_DEVICES, or pass --device cpu)"
            )
    return Device(name, index)


def device_count(kind: str) -> int:
    """How many devices of `kind` this process sees (after CUDA_VISIBLE_DEVICES and the like)."""
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count()  # type: ignore[attr-defined]
    return 1


def rank_index(rank: int, visible: int) -> int:
    """The device index of expert-parallel rank `rank` in a process that sees `visible`
    devices: 0 where the process was given one device of its own (Ray sets an actor's
    CUDA_VISIBLE_DEVICES to its GPU, and the rank's process inherits it), else the rank's own
    (ranks started by one worker on a host whose devices they share)."""
    if rank < 0 or visible < 1:
        raise ValueError(f"rank must be >= 0 and visible >= 1, got {rank} and {visible}")
    if visible == 1:
        return 0
    if rank < visible:
        return rank
    raise ValueError(
        f"expert-parallel rank {rank} has no device: this host shows {visible}; run at most "
        f"{visible} ranks a host, or give each rank's process one (CUDA_VISIBLE_DEVICES)"
    )


def rank_device(name: str, rank: int) -> Device:
    """`resolve_device(name)` for expert-parallel rank `rank`: each rank on its own device
    (`rank_index`). An explicit index (`cuda:1`) puts every rank on that one device, which
    only rank 0 may use: the others get a ValueError naming the fix."""
    device = resolve_device(name)
    if device.kind == "cpu" or rank == 0:
        return device
    if ":" in name:
        raise ValueError(
            f"--device {name} names one device for every expert-parallel rank; pass "
            f"--device {device.kind} (rank r takes device r, or the one device its process sees)"
        )
    return Device(device.kind, rank_index(rank, device_count(device.kind)))


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# The GPUs the Triton kernels are written and checked for: NVIDIA's from Ampere (`python -m
# bench.compile_kernels --arch 80`, 89, 90, 100 and 120 compile every launch, in tiles that fit
# each one's shared memory). Older ones (a T4's or V100's 64-96 KB) and AMD's take the torch
# backends.
TRITON_MIN_CAPABILITY = (8, 0)


def triton_gpu_problem(name: str, capability: tuple[int, int], hip: bool) -> str | None:
    """Why the CUDA device `name` of compute `capability` (`hip`: an AMD GPU under ROCm) cannot
    run the Triton kernels, or None."""
    if hip:
        return f"{name} is an AMD GPU (ROCm), and the kernels are written for NVIDIA's"
    if capability < TRITON_MIN_CAPABILITY:
        major, minor = capability
        return f"{name} is sm_{major}{minor}, and the kernels need sm_80 (Ampere) or later"
    return None


@functools.cache
def cuda_triton_problem() -> str | None:
    """`triton_gpu_problem` for this process's current CUDA device (a host's GPUs are one
    model)."""
    index = torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    problem = triton_gpu_problem(
        name, torch.cuda.get_device_capability(index), torch.version.hip is not None
    )
    if problem:
        log.warning("the Triton kernels are off: %s; the torch backends serve (slower)", problem)
    return problem


def triton_runs(device_kind: str) -> bool:
    """Whether `auto` takes the Triton kernels on a device of `device_kind`: a CUDA device they
    run on (`cuda_triton_problem`), with Triton installed."""
    return device_kind == "cuda" and has_triton() and cuda_triton_problem() is None


def check_triton_backend(flag: str, device_kind: str) -> None:
    """A `--FLAG triton` backend can run here: Triton installed, and a CUDA device of sm_80 or
    later (elsewhere only under Triton's interpreter, `TRITON_INTERPRET=1`: slow, tests only).
    ValueError naming the fix otherwise."""
    if not has_triton():
        raise ValueError(f"--{flag} triton needs Triton: pip install triton")
    if device_kind != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"--{flag} triton runs on CUDA devices, not {device_kind!r}; "
            f"use --{flag} torch (or auto)"
        )
    if device_kind == "cuda" and (problem := cuda_triton_problem()):
        raise ValueError(
            f"--{flag} triton cannot run here: {problem}; use --{flag} torch (or auto)"
        )


def check_interpreted_dtype(dtype: torch.dtype, device_kind: str, backends: dict[str, str]) -> None:
    """Off CUDA a `triton` backend runs under Triton's interpreter, whose `tl.dot` multiplies
    bfloat16 wrongly (silently: numpy has no bfloat16): ValueError naming the fix for
    `backends` (flag -> name) chosen so with bfloat16 there."""
    chosen = [flag for flag, name in backends.items() if name == "triton"]
    if device_kind != "cuda" and dtype == torch.bfloat16 and chosen:
        raise ValueError(
            f"--{chosen[0]} triton on {device_kind!r} runs under Triton's interpreter, whose "
            f"products are wrong in bfloat16: use --dtype float32 (or float16) there, or "
            f"--{chosen[0]} torch"
        )


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: on CUDA through pinned memory,
    copied asynchronously. A copy from pageable memory waits for everything queued on the
    stream (a whole forward pass, when the host runs a step ahead), and torch takes that path
    for any tensor not pinned, `non_blocking` or not."""
    if device.type == "cpu":
        return host
    if device.type == "cuda" and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class StagedUpload:
    """Uploads of `[rows, cols]` host arrays (int64, or `dtype`) through reusable pinned buffers
    (CUDA).

    `upload` pins a fresh copy each call: for a prefill's per-token rows (3 x 16k int64) that
    took 0.4-0.5 ms of host time on the H200's host (`aten::pin_memory`, in
    `bench.profile_decode`'s view of what the host ran while the device idled) on top of the
    array's own build. Here the caller writes the values straight into one of `slots` pinned
    buffers, taken in turn, each reused once the copy out of it has finished (an event: with
    two slots, the copy of two uploads ago, long done); all of them grow together to a power of
    two when one is too small. Off CUDA the array is a fresh one, handed to `upload`."""

    def __init__(
        self, device: torch.device, slots: int = 2, dtype: torch.dtype = torch.int64
    ) -> None:
        self.device = device
        self.dtype = dtype
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._done: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def upload_lists(self, *rows: Sequence[int]) -> torch.Tensor:
        """Equal-length int lists as the rows of one `[len(rows), n]` device tensor (`upload`)."""

        def fill(out: np.ndarray) -> None:
            out[:] = rows

        return self.upload(len(rows), len(rows[0]), fill)

    def upload(self, rows: int, cols: int, fill: Callable[[np.ndarray], None]) -> torch.Tensor:
        """A `[rows, cols]` tensor (`self.dtype`) on the device, its values written by `fill`
        into the `[rows, cols]` numpy array it is given."""
        if self.device.type != "cuda":
            array = torch.empty((rows, cols), dtype=self.dtype).numpy()
            fill(array)
            return upload(torch.from_numpy(array), self.device)
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        done = self._done[slot]
        if done is not None:
            done.synchronize()  # the copy out of this buffer, `slots` uploads ago
        size = rows * cols
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < size:
            # Every slot grows at once, from one pinned allocation: growing them one by one
            # paid a second allocation (about 0.2 ms of host time) on the next upload of the
            # same size, a timed step after the warm-up. A slot whose copy may still be in
            # flight keeps its old buffer alive until then: the pinned allocator frees a block
            # only after the copies recorded on it have finished.
            capacity = 1 << max(size - 1, 1).bit_length()
            slots = len(self._buffers)
            block = torch.empty(slots * capacity, dtype=self.dtype, pin_memory=True)
            grown = block.view(slots, capacity).unbind(0)
            self._buffers = list(grown)
            buffer = grown[slot]
        host = buffer[:size].view(rows, cols)
        fill(host.numpy())
        out = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._done[slot] = event
        return out
