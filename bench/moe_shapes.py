"""MoE model shapes for the engine benchmark, and the MoE part of a decode step's floor.

`QWEN3_30B_A3B` and `MOONLIGHT_16B_A3B` are `config.json` bodies with the published sizes (for
`bench/engine.py --preset`, dummy weights). A MoE layer's decode step must read the weights of
the distinct experts its tokens chose, which depends on the routing: `ExpertTouches` records
the routing of every MoE layer during one eager step (no sync inside the step; it keeps the
ids and counts afterwards) and `moe_weight_bytes` turns the counts into bytes:

    touches = ExpertTouches(engine.runner.model)
    with touches:
        engine.step()                       # eager: a replayed graph calls no Python
    bytes_ = moe_weight_bytes(model_config, touches.distinct(), dtype_bytes=2)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.moe import MoEBackend

QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

MOONLIGHT_16B_A3B: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.446,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "vocab_size": 163840,
    "max_position_embeddings": 8192,
    "rope_theta": 50000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

PRESETS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "moonlight-16b-a3b": MOONLIGHT_16B_A3B}


class _Recording(MoEBackend):
    """Delegates to `inner`, keeping each call's routed `topk_ids` (on the device, no sync):
    without the `num_shared` shared experts a fused layer appends to every token's choices
    (read every step, they are no routed expert touched)."""

    def __init__(self, inner: MoEBackend, calls: list[torch.Tensor], num_shared: int = 0) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = calls
        self.num_shared = num_shared

    def router_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.inner.router_logits(x, weight)

    def select_experts(
        self, router_logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.select_experts(router_logits, top_k, renormalize)

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
        return self.inner.select_experts_grouped(
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
        routed = topk_ids.shape[1] - self.num_shared  # shared experts come last
        self.calls.append(topk_ids[:, :routed].detach().clone())
        return self.inner.experts(x, w13, w2, topk_weights, topk_ids, pairs)


class ExpertTouches:
    """While active, records the experts every MoE layer of `model` routes to, per call."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            m
            for m in model.modules()
            if isinstance(getattr(m, "backend", None), MoEBackend) and hasattr(m, "w13")
        ]
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._saved: list[MoEBackend] = []

    def __enter__(self) -> ExpertTouches:
        self._saved = [getattr(layer, "backend") for layer in self.layers]  # noqa: B009
        for layer, backend, calls in zip(self.layers, self._saved, self.calls, strict=True):
            recording = _Recording(backend, calls, getattr(layer, "num_shared", 0))
            object.__setattr__(layer, "backend", recording)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, backend in zip(self.layers, self._saved, strict=True):
            object.__setattr__(layer, "backend", backend)

    def distinct(self) -> list[list[int]]:
        """Per layer, per recorded call: the number of distinct experts chosen."""
        return [[int(ids.unique().numel()) for ids in calls] for calls in self.calls]


def moe_weight_bytes(config: ModelConfig, distinct: list[list[int]], dtype_bytes: int) -> float:
    """Routed-expert weight bytes one step reads: per MoE layer, its distinct experts (mean
    over the recorded calls) times one expert's gate, up and down weights."""
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size * dtype_bytes
    return sum(sum(calls) / len(calls) * per_expert for calls in distinct if calls)
