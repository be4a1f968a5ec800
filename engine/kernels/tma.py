"""Tensor-memory-accelerator descriptors for the Triton kernels that load tiles through TMA
(Hopper and later; Triton's interpreter runs them on the CPU): the layout rule a descriptor
needs, and the descriptor itself, built on the host and passed as a kernel argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def ready(*tensors: torch.Tensor) -> bool:
    """Whether every tensor fits a TMA descriptor: a 16-byte aligned base and 16-byte multiples
    for every stride but the last (the kernels fall back to pointer loads otherwise)."""
    return all(
        x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0 for st in x.stride()[:-1])
        for x in tensors
    )


def descriptor(tensor: torch.Tensor, block: Sequence[int]) -> Any:
    """A host-side descriptor of `tensor` loading `block`-shaped tiles (zeros past its edges)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(tensor, list(block))
