"""Rotary position embeddings with the scaling variants Llama/Qwen configs use.

The inverse frequencies follow the published formulas (linear, Llama 3, YaRN); cos/sin
are precomputed for every position up to the context length and gathered per token.
`dynamic` NTK scaling is applied statically at the full context length, as serving engines
do, instead of varying with the batch's longest sequence. DeepSeek's interleaved layout (rotary
pairs `(x0, x1), (x2, x3), ...`) is handled by de-interleaving before the rotation, which gives
exactly the output layout of transformers' `apply_rotary_pos_emb_interleave`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import RopeConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_mscale(rope: RopeConfig) -> float:
    """Factor on the attention softmax scale: DeepSeek multiplies it by `mscale_all_dim`'s yarn
    mscale squared whenever the rope is scaled (transformers' `yarn_apply_mscale`)."""
    if rope.rope_type == "default" or not rope.mscale_all_dim:
        return 1.0
    return _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2


def rope_inv_freq(rope: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[dim // 2]` (float32) and the cos/sin scale for `rope`."""
    inv_freq = _base_inv_freq(rope.theta, dim)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        base = rope.theta * (
            (rope.factor * max_position / (rope.original_max_position_embeddings or max_position))
            - (rope.factor - 1)
        ) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    original = rope.original_max_position_embeddings or max_position
    if rope.rope_type == "llama3":
        low_wavelen = original / rope.low_freq_factor
        high_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(
            factor, rope.mscale_all_dim
        )
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """`(x0, x1, x2, x3, ...)` -> `(x0, x2, ..., x1, x3, ...)` on the last dimension."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q `[T, Hq, D]` and k `[T, Hkv, D]` at integer `positions` `[T]`.

    With `interleaved`, the inputs' rotary pairs are adjacent dimensions; the outputs come back
    de-interleaved (pairs split into halves), as in the reference. Queries and keys get the same
    permutation, so their dot products are those of the interleaved rotation.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self, rope: RopeConfig, head_dim: int, max_position: int, interleaved: bool = False
    ) -> None:
        super().__init__()
        self.interleaved = interleaved
        inv_freq, scale = rope_inv_freq(rope, head_dim, max_position)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # cos/sin: [max_position, D], kept in float32 and cast at use.
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda:  # one Triton kernel per tensor instead of a dozen element-wise ones
            from engine.kernels import fused

            return (
                fused.rope(q, positions, self.cos, self.sin, self.interleaved),
                fused.rope(k, positions, self.cos, self.sin, self.interleaved),
            )
        if self.interleaved:
            q, k = deinterleave(q), deinterleave(k)
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
