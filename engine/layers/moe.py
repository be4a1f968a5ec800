"""Mixture-of-experts: routing and the expert computation (pure torch reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing. Returns (weights `[T, k]` in the logits' dtype, ids `[T, k]`)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def select_experts_grouped(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing (`noaux_tc`): sigmoid scores, top-k within the best expert groups.

    `router_logits` `[T, E]`, `correction_bias` `[E]`; E must split into `num_groups` equal,
    contiguous groups of at least two experts. In float32:

    1. `scores = sigmoid(router_logits)`; `choice = scores + correction_bias`. The bias (learned
       for load balance) only steers which experts are chosen, never their weights.
    2. A group's score is the sum of its two best `choice` values; the `topk_groups` best
       groups stay eligible.
    3. The `top_k` eligible experts with the highest `choice` are chosen.
    4. Their weights are their `scores`, divided by their sum (plus 1e-20) if `renormalize`,
       then multiplied by `scaling_factor`.

    Returns (weights `[T, k]` float32, ids `[T, k]` int64), in no particular order within a row.
    """
    num_tokens, num_experts = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores + correction_bias.float()
    grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    best_groups = group_scores.topk(topk_groups, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    eligible = group_mask[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
    choice = choice.masked_fill(~eligible, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


class FusedExperts(nn.Module):
    """`num_experts` SwiGLU experts stored stacked: w13 `[E, 2I, H]` (gate; up), w2 `[E, H, I]`."""

    # Reads the per-expert token counts on the host: not capturable in a CUDA graph.
    graph_safe = False

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """x `[T, H]`; each token's output is the weighted sum of its top-k experts' outputs."""
        out = torch.zeros_like(x)
        flat_ids = topk_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // topk_ids.shape[1]
        weight_of = topk_weights.flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start : start + count]
            gate, up = F.linear(x[tokens], self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert])
            # Router weights may be float32 (DeepSeek); weigh first, then cast, as the reference.
            out.index_add_(0, tokens, (y * weight_of[start : start + count, None]).to(x.dtype))
            start += count
        return out
