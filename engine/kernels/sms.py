"""What the device has that the kernels' launch rules read: its SMs and its shared memory.

The rules (decode attention's context splits, the MLA decode's ranges and warps, the sampling
kernel's split) were measured on the H200's 132 SMs. On another GPU (an H20's 78, an A100's
108, a B200's 148) they take its own count; off CUDA (Triton's interpreter in the tests) they
take the H200's, so that the interpreter exercises the launches the H200 runs.

The tiles were chosen on the H200 too, whose program may take 227 KB of shared memory. An
A100 gives 163 KB and an A10, L4 or L40S (sm_86/89) 99 KB: the rules whose tiles would not fit
there (float32 and 128-head MLA, mostly) take smaller ones by `shared_memory`, and `python -m
bench.compile_kernels --arch 89` compiles what they choose there.
"""

from __future__ import annotations

import functools

import torch

H200_SMS = 132
# The most shared memory one program may take on the H200 (the opt-in limit: 227 KB).
H200_SHARED_MEMORY = 232448


@functools.cache
def _cuda_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


@functools.cache
def _cuda_shared(index: int) -> int:
    # A field of CUDA's device properties that torch's type stubs do not list.
    props = torch.cuda.get_device_properties(index)
    return int(props.shared_memory_per_block_optin)  # type: ignore[attr-defined]


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    """The SMs of `device` if it is a CUDA device, else `H200_SMS`."""
    if device.type != "cuda":
        return H200_SMS
    return _cuda_sms(_index(device))


def shared_memory(device: torch.device) -> int:
    """The bytes of shared memory one program may take on `device` if it is a CUDA device, else
    `H200_SHARED_MEMORY`."""
    if device.type != "cuda":
        return H200_SHARED_MEMORY
    return _cuda_shared(_index(device))
