"""A layer output whose last sum is left to the RMSNorm that reads it next.

A decoder layer's attention and MLP outputs may end in a sum of pieces that is a launch of
its own: a split-K product's float32 partial sums (`engine.kernels.skinny_gemm`'s reduce,
where `skinny_gemm.TUNED` splits K: Llama-3-8B's O and down and Qwen3-30B-A3B's O at 1 to 64
rows) or a MoE layer's weighted sum of each token's expert outputs
(`engine.kernels.fused_moe`'s combine). What reads each output next is always a norm, which
adds it to the residual stream (`RMSNorm.forward_residual`, one kernel on CUDA). Asked with
`defer=True`, those layers return a `PendingSum` instead, and the norm's kernel sums the
pieces itself, in the same order and with the same rounding: one launch and one round trip of
the output fewer each, the result bit for bit the same.

Only `DecoderLayer` asks for it, for the outputs that go straight to a norm; every other
caller gets tensors as before.

`PendingCombine` is the same idea inside MLA's attention: a decode's ranges left uncombined
for the W_UV product that reads them next (`engine.kernels.head_bmm.combine_head_bmm`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PendingSum:
    """Row t of the output is `sum over s of weights[t, s] * parts[t, s]`, taken in float32 in
    the order of s over the s whose `ids[t, s]` lies in `[0, num_experts)` (all of them
    without `ids`; weight 1 without `weights`), then rounded to `dtype`.

    parts `[T, S, H]` (any strides, the last one 1), weights and ids `[T, S]` contiguous."""

    parts: torch.Tensor
    dtype: torch.dtype
    weights: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    num_experts: int = 0

    def __post_init__(self) -> None:
        t, s, _ = self.parts.shape
        for name, extra in (("weights", self.weights), ("ids", self.ids)):
            if extra is not None and tuple(extra.shape) != (t, s):
                raise ValueError(f"{name} {tuple(extra.shape)} do not fit parts {(t, s)}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.parts.shape[0], self.parts.shape[2]))

    @property
    def device(self) -> torch.device:
        return self.parts.device

    @property
    def is_cuda(self) -> bool:
        return self.parts.is_cuda

    def materialize(self) -> torch.Tensor:
        """The sum as a tensor, in torch (the reference for the kernels that take it)."""
        t, s, h = self.parts.shape
        acc = torch.zeros(t, h, dtype=torch.float32, device=self.parts.device)
        for j in range(s):
            piece = self.parts[:, j].float()
            if self.weights is not None:
                piece = self.weights[:, j : j + 1].float() * piece
            if self.ids is not None:
                keep = (self.ids[:, j] >= 0) & (self.ids[:, j] < self.num_experts)
                acc = torch.where(keep[:, None], acc + piece, acc)  # the rest not even read
            else:
                acc = acc + piece
        return acc.to(self.dtype)


@dataclass(frozen=True)
class PendingCombine:
    """An MLA decode's output `[B, H, R]` before its ranges are combined
    (`engine.kernels.mla_decode.mla_decode(..., defer_combine=True)`): each range's normalised
    partial `mid_out` `[B, H, S, R]` and log-sum-exp `mid_lse` `[B, H, S]` (float32, -inf for
    an empty range, whose partial is never written), to be combined and rounded to `dtype`."""

    mid_out: torch.Tensor
    mid_lse: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        b, h, _, r = self.mid_out.shape
        return torch.Size((b, h, r))

    def materialize(self) -> torch.Tensor:
        """The combined output, in torch: each range weighted by exp(lse - max), over their
        sum; a row with no live range (a padding row) zeros."""
        live = self.mid_lse > float("-inf")
        return _combine(self.mid_out, self.mid_lse, live, torch.exp).to(self.dtype)


def _combine(
    parts: torch.Tensor,
    lse: torch.Tensor,
    live: torch.Tensor,
    exp: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Flash-decoding's combine in torch, float32: `parts` `[..., S, D]` weighed by `exp(lse -
    max)` over the live entries of S (`live` broadcast to `lse`'s `[..., S]`; the others never
    written), over the weights' sum; zeros where none is live."""
    top = torch.where(live, lse, float("-inf")).amax(dim=-1, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)
    weight = torch.where(live, exp(lse - top), 0.0)
    acc = (torch.where(live[..., None], parts, 0.0) * weight[..., None]).sum(dim=-2)
    denom = weight.sum(dim=-1, keepdim=True)
    return torch.where(denom > 0, acc / denom.clamp_min(1e-30), 0.0)


def materialize(x: torch.Tensor | PendingSum) -> torch.Tensor:
    """`x` itself, or its sum."""
    return x.materialize() if isinstance(x, PendingSum) else x
