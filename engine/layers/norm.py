"""RMSNorm, computed in float32 as the reference implementations do."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.pending import PendingSum, materialize


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one Triton kernel instead of six element-wise ones
            from engine.kernels import fused

            return fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward_residual(
        self, x: torch.Tensor | PendingSum, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(x + residual), x + residual)`. On CUDA one kernel, which updates `residual`
        in place (it must be contiguous and not needed elsewhere) and takes the sum of a
        `PendingSum` `x` itself."""
        if x.is_cuda:
            from engine.kernels import fused

            return fused.rms_norm(x, self.weight, self.eps, residual=residual), residual
        residual = materialize(x) + residual
        return self(residual), residual
