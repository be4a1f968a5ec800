"""Linear layers whose decode-sized products may run on the skinny Triton GEMM.

`Linear` is `nn.Linear` (the same parameters, loaded the same way) with one switch, its GEMM
backend, which `set_gemm_backend` points every such layer at once after the model is built:

- `torch` (the default, and the CPU and NPU path): `F.linear`, cuBLAS on CUDA.
- `triton`: products of at most `SkinnyGemmBackend.max_rows` rows run on
  `engine.kernels.skinny_gemm` (a gate-up projection with silu(gate) * up in the same launch),
  with the tiles of its rule; larger ones (prefill) stay with cuBLAS.
- `auto`: on Hopper GPUs (the kernel's tile rule assumes 132 SMs) the skinny GEMM only where
  `skinny_gemm.TUNED` records it beating cuBLAS for that weight shape and row count, cuBLAS
  everywhere else; `torch` on other devices.

A CUDA graph captures one row count per bucket, so the choice is made once per graph; eager
steps look it up in a cache keyed by shape.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import GEMM_BACKENDS
from engine.device import check_triton_backend, triton_runs
from engine.layers.pending import PendingSum

if TYPE_CHECKING:  # the kernels import Triton: only where the backend is chosen
    from engine.kernels.skinny_gemm import SkinnyTiles


class GemmBackend:
    """cuBLAS / torch for every product (`tiles` says None)."""

    name = "torch"

    def tiles(self, kind: str, m: int, n: int, k: int, dtype: torch.dtype) -> SkinnyTiles | None:
        """The skinny GEMM's launch for `m` rows of a weight `[n, k]` (`kind` "linear" or
        "gate_up"), or None for `F.linear`."""
        return None


class SkinnyGemmBackend(GemmBackend):
    """The skinny Triton GEMM for products of few rows: every shape up to `max_rows` with the
    kernel's tile rule (`tuned=False`, `--gemm-backend triton`), or only the shapes and row
    counts of `skinny_gemm.TUNED` (`tuned=True`, what `auto` picks on Hopper)."""

    def __init__(self, tuned: bool, max_rows: int = 64) -> None:
        self.name = "auto (tuned skinny GEMM)" if tuned else "triton"
        self.tuned = tuned
        self.max_rows = max_rows

    @functools.lru_cache(maxsize=512)  # noqa: B019 (one backend per engine, lives as long)
    def tiles(self, kind: str, m: int, n: int, k: int, dtype: torch.dtype) -> SkinnyTiles | None:
        from engine.kernels import skinny_gemm

        if not 0 < m <= self.max_rows:
            return None
        if self.tuned:
            return skinny_gemm.tuned_tiles(kind, m, n, k, dtype)
        return skinny_gemm.pick_tiles(m, n, k, dtype, gated=kind == "gate_up")


def gemm_backend_for(name: str, device_kind: str) -> GemmBackend:
    """The backend `--gemm-backend NAME` selects on a device of kind `device_kind`. "triton"
    off CUDA needs Triton's interpreter (`TRITON_INTERPRET=1`, slow: tests only)."""
    if name not in GEMM_BACKENDS:
        raise ValueError(f"--gemm-backend must be one of {GEMM_BACKENDS}, got {name!r}")
    if name == "auto":
        hopper = triton_runs(device_kind) and torch.cuda.get_device_capability()[0] == 9
        # Tuned: up to 256 rows, where `skinny_gemm.TUNED` records a shape's row counts.
        return SkinnyGemmBackend(tuned=True, max_rows=256) if hopper else GemmBackend()
    if name == "torch":
        return GemmBackend()
    check_triton_backend("gemm-backend", device_kind)
    return SkinnyGemmBackend(tuned=False)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class Linear(nn.Linear):
    """`nn.Linear` whose product runs on its GEMM backend's choice."""

    gemm: GemmBackend = GemmBackend()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = self._tiles(x)
        if tiles is None:
            return F.linear(x, self.weight, self.bias)
        from engine.kernels.skinny_gemm import skinny_linear

        return skinny_linear(x, self.weight, self.bias, tiles)

    def forward_pending(self, x: torch.Tensor) -> torch.Tensor | PendingSum:
        """`forward`, or a `PendingSum` where the product would end in a reduce launch (the
        skinny GEMM with K split): for a caller whose next step is an RMSNorm, which sums it."""
        tiles = self._tiles(x)
        if tiles is None:
            return F.linear(x, self.weight, self.bias)
        from engine.kernels.skinny_gemm import skinny_linear

        return skinny_linear(x, self.weight, self.bias, tiles, defer=True)

    def forward_normed(
        self,
        norm_weight: torch.Tensor,
        eps: float,
        x: torch.Tensor | PendingSum,
        residual: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(self(rms_norm(x + residual)), x + residual)` in one launch where this product of
        one row takes preloading tiles and `skinny_gemm.NORM_IN_PRELOAD` is on
        (`skinny_gemm.preload_norm_linear`; the new residual stream a new tensor); else None,
        and the caller runs the norm and then the product."""
        if not isinstance(x, torch.Tensor) or _rows(x) != 1:
            return None
        tiles = self._tiles(x)
        if tiles is None or not tiles.preload:
            return None
        from engine.kernels import skinny_gemm

        if not skinny_gemm.NORM_IN_PRELOAD:
            return None
        return skinny_gemm.preload_norm_linear(
            x, residual, norm_weight, eps, self.weight, self.bias, tiles
        )

    def _tiles(self, x: torch.Tensor) -> SkinnyTiles | None:
        n, k = self.weight.shape
        return self.gemm.tiles("linear", _rows(x), n, k, x.dtype)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this gate-up projection (gate rows, then up rows): one launch
        where the backend takes it, else the product then `fused.silu_and_mul` (torch's
        ops off CUDA)."""
        n, k = self.weight.shape
        tiles = self.gemm.tiles("gate_up", _rows(x), n, k, x.dtype)
        if tiles is not None:
            from engine.kernels.skinny_gemm import skinny_gate_up

            return skinny_gate_up(x, self.weight, self.bias, tiles)
        gate_up = F.linear(x, self.weight, self.bias)
        if gate_up.is_cuda:
            from engine.kernels import fused

            return fused.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def set_gemm_backend(model: nn.Module, backend: GemmBackend) -> int:
    """Point every `Linear` of `model` at `backend`, once at load; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        object.__setattr__(layer, "gemm", backend)  # neither a tensor nor a module
    return len(layers)
