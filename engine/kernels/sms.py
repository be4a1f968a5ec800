"""How many SMs the device has: the number the kernels' launch rules size their grids by.

The rules (decode attention's context splits, the MLA decode's ranges and warps, the sampling
kernel's split) were measured on the H200's 132 SMs. On another GPU (an H20's 78, an A100's
108, a B200's 148) they take its own count; off CUDA (Triton's interpreter in the tests) they
take the H200's, so that the interpreter exercises the launches the H200 runs.
"""

from __future__ import annotations

import functools

import torch

H200_SMS = 132


@functools.cache
def _cuda_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """The SMs of `device` if it is a CUDA device, else `H200_SMS`."""
    if device.type != "cuda":
        return H200_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
