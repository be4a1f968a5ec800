"""Mixture-of-experts: routing, and the expert computation behind a `MoEBackend` (the pure-torch
reference, or the fused Triton kernels)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import MOE_BACKENDS
from engine.device import check_triton_backend, triton_runs
from engine.layers.norm import RMSNorm
from engine.layers.pending import PendingSum


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
    num_shared: int = 0,
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
    With `num_shared` > 0 (shared experts fused into the routed ones' weights, numbered from E)
    each row then gets the shared ids E, E + 1, ... with weight 1.0: `[T, k + num_shared]`.
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
    weights = weights * scaling_factor
    if num_shared:
        shared = torch.arange(num_experts, num_experts + num_shared, device=ids.device)
        ids = torch.cat((ids, shared.expand(num_tokens, num_shared)), dim=1)
        weights = torch.cat((weights, weights.new_ones(num_tokens, num_shared)), dim=1)
    return weights, ids


@dataclass(frozen=True)
class GroupedRouting:
    """DeepSeek-V3's routing settings: `select_experts_grouped`'s arguments besides tensors."""

    top_k: int
    num_groups: int
    topk_groups: int
    renormalize: bool
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.num_groups < 1 or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"grouped routing needs top_k >= 1 and 1 <= topk_groups <= num_groups, got "
                f"top_k={self.top_k}, topk_groups={self.topk_groups}, "
                f"num_groups={self.num_groups}"
            )

    def kernel_args(self) -> tuple[int, int, int, bool, float]:
        """The settings in `grouped_topk`'s (and `select_experts_grouped`'s) order."""
        return self.top_k, self.num_groups, self.topk_groups, self.renormalize, self.scaling_factor


class MoEBackend(ABC):
    """Computes routed experts: the contract every MoE backend keeps.

    `experts(x, w13, w2, topk_weights, topk_ids)`: x `[T, H]` (T may be 0), stacked SwiGLU
    weights w13 `[E, 2I, H]` (gate rows, then up rows) and w2 `[E, H, I]`, each token's
    `top_k` choices `topk_ids` `[T, k]` with weights `topk_weights` `[T, k]` (any float
    dtype). Returns `[T, H]` in x's dtype: per token, `sum_j topk_weights[t, j] *
    w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t]))` with `e = topk_ids[t, j]`; a
    choice with an id outside `[0, E)` adds nothing (expert parallelism pads with -1).

    `select_experts` and `select_experts_grouped` route as the functions of those names do
    (the same contract; the chosen set may differ only where scores tie exactly).
    `routed_experts(x, router_logits, w13, w2, top_k, renormalize)` is `experts` on
    `select_experts`' choices, in one call so that a backend may fuse the two;
    `routed_experts_grouped` likewise on `select_experts_grouped`'s, `num_shared` shared experts
    stacked after the routed ones in w13/w2. `router_logits(x, weight)` is DeepSeek's gate:
    float32 `x @ weight.T` `[T, E]` up to summation order, whatever the inputs' dtype;
    `gate_logits(x, weight)` Qwen3-MoE's: `F.linear(x, weight)` in their dtype, likewise.

    `fuses_shared_experts`: whether a model on this backend should stack its shared experts
    into the routed experts' weights (SGLang's shared-expert fusion) rather than keep a
    separate MLP: where the backend's kernels then do both in the same launches.
    """

    name: str
    graph_safe = True  # no host sync: a CUDA graph can capture it
    fuses_shared_experts = False

    def router_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), weight.float())

    def gate_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def norm_and_gate(
        self,
        norm: RMSNorm,
        x: torch.Tensor | PendingSum,
        residual: torch.Tensor,
        gate: torch.Tensor,
        logits_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`(h, residual, logits)`: `norm.forward_residual(x, residual)` and the gate's logits
        of h (in `logits_dtype`, as `router_logits` or `gate_logits` give them) in one launch,
        where this backend has one for these rows; else None (the caller runs the two)."""
        return None

    def select_experts(
        self, router_logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(router_logits, top_k, renormalize)

    def select_experts_grouped(
        self,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        top_k: int,
        num_groups: int,
        topk_groups: int,
        renormalize: bool,
        scaling_factor: float = 1.0,
        num_shared: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts_grouped(
            router_logits,
            correction_bias,
            top_k,
            num_groups,
            topk_groups,
            renormalize,
            scaling_factor,
            num_shared,
        )

    def routed_experts(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
        renormalize: bool,
    ) -> torch.Tensor:
        weights, ids = self.select_experts(router_logits, top_k, renormalize)
        return self.experts(x, w13, w2, weights, ids)

    def routed_experts_pending(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
        renormalize: bool,
    ) -> torch.Tensor | PendingSum:
        """`routed_experts`, or where this backend can, its combine left to the next norm
        (engine.layers.pending); here always the tensor."""
        return self.routed_experts(x, router_logits, w13, w2, top_k, renormalize)

    def route_grouped(
        self,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        routing: GroupedRouting,
        num_shared: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`select_experts_grouped` with `routing`'s settings."""
        return self.select_experts_grouped(
            router_logits, correction_bias, *routing.kernel_args(), num_shared
        )

    def routed_experts_grouped(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        routing: GroupedRouting,
        num_shared: int = 0,
    ) -> torch.Tensor:
        weights, ids = self.route_grouped(router_logits, correction_bias, routing, num_shared)
        return self.experts(x, w13, w2, weights, ids)

    def routed_experts_grouped_pending(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        routing: GroupedRouting,
        num_shared: int = 0,
    ) -> torch.Tensor | PendingSum:
        """`routed_experts_grouped`, or a `PendingSum` as `routed_experts_pending`."""
        return self.routed_experts_grouped(
            x, router_logits, correction_bias, w13, w2, routing, num_shared
        )

    @abstractmethod
    def experts(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        pairs: int | None = None,
    ) -> torch.Tensor:
        """Each row's weighted sum of its experts (ids outside `[0, E)` count for nothing).
        `pairs`: how many ids are in range, where the caller knows it on the host (an
        expert-parallel rank, whose rows carry -1 for the choices held elsewhere); a backend
        may size its work by it."""


class TorchMoEBackend(MoEBackend):
    """The reference: one pair of matmuls per expert that has tokens. It reads the per-expert
    counts on the host (one sync per layer), so it cannot be captured in a graph."""

    graph_safe = False

    name = "torch"

    def experts(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        pairs: int | None = None,
    ) -> torch.Tensor:
        out = torch.zeros_like(x)
        num_experts = w13.shape[0]
        flat_ids = topk_ids.flatten()
        # Ids outside the experts sort last, into a bin that is never computed.
        flat_ids = torch.where((flat_ids >= 0) & (flat_ids < num_experts), flat_ids, num_experts)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts].tolist()
        token_of = order // topk_ids.shape[1]
        weight_of = topk_weights.flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start : start + count]
            # In x's dtype: float32 activations over bfloat16 weights (a full-size check's
            # reference) widen one expert's weights at a time, not the whole layer's.
            gate, up = F.linear(x[tokens], w13[expert].to(x.dtype)).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, w2[expert].to(x.dtype))
            # Router weights may be float32 (DeepSeek); weigh first, then cast, as the reference.
            out.index_add_(0, tokens, (y * weight_of[start : start + count, None]).to(x.dtype))
            start += count
        return out


class TritonMoEBackend(MoEBackend):
    """`engine.kernels.fused_moe`: expert-aligned sort, two grouped GEMMs and the combine on
    the device, no host sync (graph capturable at a fixed T); routing in one kernel each
    (`engine.kernels.moe_routing`). A few tokens take the two-launch small-batch path, softmax
    or grouped routing folded into its first kernel (`routed_experts`,
    `routed_experts_grouped`). Shared experts ride in the same launches as extra experts."""

    name = "triton"
    fuses_shared_experts = True

    def router_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from engine.kernels.moe_routing import router_logits

        return router_logits(x, weight)

    def norm_and_gate(
        self,
        norm: RMSNorm,
        x: torch.Tensor | PendingSum,
        residual: torch.Tensor,
        gate: torch.Tensor,
        logits_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        # A decode step's few tokens: the router kernel's logits folded into the norm's
        # launch (`fused.rms_norm_gate`), on CUDA.
        parts = x.parts if isinstance(x, PendingSum) else x
        if not parts.is_cuda:
            return None
        from engine.kernels import fused

        return fused.rms_norm_gate(x, norm.weight, norm.eps, residual, gate, logits_dtype)

    def gate_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # A decode step's few tokens on the router kernel (a bfloat16 gate's cuBLAS product
        # took 5.1 µs a layer for Qwen3-30B-A3B's 512 KB at batch 1), rounded to x's dtype.
        from engine.kernels.moe_routing import router_logits

        if x.dtype != weight.dtype:
            return F.linear(x, weight)
        return router_logits(x, weight, out_dtype=x.dtype)

    def select_experts(
        self, router_logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.moe_routing import softmax_topk

        return softmax_topk(router_logits, top_k, renormalize)

    def select_experts_grouped(
        self,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        top_k: int,
        num_groups: int,
        topk_groups: int,
        renormalize: bool,
        scaling_factor: float = 1.0,
        num_shared: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.moe_routing import grouped_topk

        return grouped_topk(
            router_logits,
            correction_bias,
            top_k,
            num_groups,
            topk_groups,
            renormalize,
            scaling_factor,
            num_shared,
        )

    def experts(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        pairs: int | None = None,
    ) -> torch.Tensor:
        """`fused_moe`; with `pairs`, its tiles are those of a step with that many pairs
        (`fused_moe.pairs_config`), not of every row's full top-k."""
        from engine.kernels.fused_moe import fused_moe, pairs_config

        config = None if pairs is None else pairs_config(pairs, x, w13, topk_ids.shape[1])
        return fused_moe(x, w13, w2, topk_weights, topk_ids, config=config)

    def routed_experts(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
        renormalize: bool,
    ) -> torch.Tensor:
        from engine.kernels.fused_moe import fused_moe_routed

        return fused_moe_routed(x, w13, w2, router_logits, top_k, renormalize)

    def routed_experts_pending(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
        renormalize: bool,
    ) -> torch.Tensor | PendingSum:
        from engine.kernels.fused_moe import fused_moe_routed

        return fused_moe_routed(x, w13, w2, router_logits, top_k, renormalize, defer=True)

    def routed_experts_grouped(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        routing: GroupedRouting,
        num_shared: int = 0,
    ) -> torch.Tensor:
        from engine.kernels.fused_moe import fused_moe_grouped_routed

        args = (router_logits, correction_bias, *routing.kernel_args(), num_shared)
        return fused_moe_grouped_routed(x, w13, w2, *args)

    def routed_experts_grouped_pending(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        routing: GroupedRouting,
        num_shared: int = 0,
    ) -> torch.Tensor | PendingSum:
        from engine.kernels.fused_moe import fused_moe_grouped_routed

        args = (router_logits, correction_bias, *routing.kernel_args(), num_shared)
        return fused_moe_grouped_routed(x, w13, w2, *args, defer=True)


def moe_backend_for(name: str, device_kind: str) -> MoEBackend:
    """The backend `--moe-backend NAME` selects on a device of kind `device_kind` ("cuda",
    "npu", "cpu"). "auto" is triton on a CUDA device it runs on (`triton_runs`), torch
    elsewhere; "triton" elsewhere needs Triton's interpreter (`TRITON_INTERPRET=1`, slow:
    tests only)."""
    if name not in MOE_BACKENDS:
        raise ValueError(f"--moe-backend must be one of {MOE_BACKENDS}, got {name!r}")
    if name == "auto":
        name = "triton" if triton_runs(device_kind) else "torch"
    if name == "torch":
        return TorchMoEBackend()
    check_triton_backend("moe-backend", device_kind)
    return TritonMoEBackend()


class FusedExperts(nn.Module):
    """`num_experts` SwiGLU experts stored stacked: w13 `[E, 2I, H]` (gate; up), w2 `[E, H, I]`,
    computed by `backend` (the torch reference unless `set_moe_backend` chose another).

    `num_shared` > 0 stacks that many always-on shared experts after the routed ones (w13
    `[E + S, 2I, H]`): `forward_routed_grouped` gives every token all of them with weight 1.0,
    so they need no MLP of their own (a shared MLP of intermediate size S * I, split into S
    experts by its gate/up rows and down columns: the same sum)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        backend: MoEBackend | None = None,
        num_shared: int = 0,
    ) -> None:
        super().__init__()
        if num_shared < 0:
            raise ValueError(f"num_shared must be >= 0, got {num_shared}")
        self.num_experts = num_experts  # the routed experts: those the router chooses from
        self.num_shared = num_shared
        self.intermediate_size = intermediate_size
        stacked = num_experts + num_shared
        self.w13 = nn.Parameter(torch.empty(stacked, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(stacked, hidden_size, intermediate_size))
        self.backend: MoEBackend = backend or TorchMoEBackend()

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph can capture this layer (ModelRunner asks every module)."""
        return self.backend.graph_safe

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """x `[T, H]`; each token's output is the weighted sum of its top-k experts' outputs."""
        return self.backend.experts(x, self.w13, self.w2, topk_weights, topk_ids)

    def forward_routed(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        top_k: int,
        renormalize: bool,
        defer: bool = False,
    ) -> torch.Tensor | PendingSum:
        """`forward` on the backend's softmax top-k routing of `router_logits` `[T, E]`.
        `defer`: the backend may return its combine as a `PendingSum` for the next norm."""
        if self.num_shared:
            raise ValueError("softmax routing takes no shared experts")
        routed = self.backend.routed_experts_pending if defer else self.backend.routed_experts
        return routed(x, router_logits, self.w13, self.w2, top_k, renormalize)

    def forward_routed_grouped(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        routing: GroupedRouting,
        defer: bool = False,
    ) -> torch.Tensor | PendingSum:
        """`forward` on the backend's grouped routing of `router_logits` `[T, E]`, plus the
        stacked shared experts (if any) for every token. `defer` as in `forward_routed`."""
        routed = (
            self.backend.routed_experts_grouped_pending
            if defer
            else self.backend.routed_experts_grouped
        )
        return routed(
            x, router_logits, correction_bias, self.w13, self.w2, routing, self.num_shared
        )


def set_moe_backend(model: nn.Module, backend: MoEBackend) -> int:
    """Point every MoE layer of `model` (each module whose `backend` is a `MoEBackend`:
    `FusedExperts`, and the expert-parallel layers) at `backend`, once at load; returns how
    many."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "backend", None), MoEBackend)]
    for layer in layers:
        # nn.Module's __setattr__ types attributes as tensors or modules; this is neither.
        object.__setattr__(layer, "backend", backend)
    return len(layers)
