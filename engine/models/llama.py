"""Llama-family decoder: Llama, Qwen2, Qwen3 dense and Qwen3-MoE.

Shapes: the batch is flattened, so activations are `[T, hidden]` for T new tokens.
Q/K/V and gate/up are fused into one matmul each; `weight_map` tells the loader which
slice of which fused parameter every Hugging Face tensor fills.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.forward_batch import ForwardBatch
from engine.kv_cache import KVCacheSpec
from engine.layers.attention import AttentionBackend
from engine.layers.linear import Linear
from engine.layers.moe import FusedExperts
from engine.layers.norm import RMSNorm
from engine.layers.pending import PendingSum
from engine.layers.rotary import RotaryEmbedding
from engine.loader import WeightTarget
from engine.models.base import DecoderLayer, DecoderOnlyLM


class Attention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.backend = backend

    def norm_and_project(
        self, norm: RMSNorm, x: torch.Tensor | PendingSum, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The norm before this block inside the QKV projection's launch, where that launch
        takes it (`Linear.forward_normed`): `(qkv, residual)` for `forward(None, batch,
        qkv=qkv)`; else None."""
        return self.qkv_proj.forward_normed(norm.weight, norm.eps, x, residual)

    def forward(
        self,
        x: torch.Tensor | None,
        batch: ForwardBatch,
        defer: bool = False,
        qkv: torch.Tensor | None = None,
    ) -> torch.Tensor | PendingSum:
        """`defer`: the O projection's split-K sum may be left to the next norm. `qkv`: the
        QKV projection's output, from `norm_and_project` (x then None)."""
        if qkv is None:
            assert x is not None
            qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = batch.attend(self._attend, q, k, v).reshape(-1, self.q_size)
        return self.o_proj.forward_pending(out) if defer else self.o_proj(out)

    def _attend(
        self, batch: ForwardBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """The step's attention from the projected q, k, v (RoPE, any q/k norms, the KV
        write): `ForwardBatch.attend`'s call."""
        norms = None
        if self.q_norm is not None and self.k_norm is not None:
            norms = (self.q_norm, self.k_norm)
        return self.backend.forward_rope(
            q, k, v, self.rotary, self.layer_id, batch, self.scale, qk_norm=norms
        )


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, defer: bool = False) -> torch.Tensor | PendingSum:
        """`defer`: the down projection's split-K sum may be left to the next norm."""
        h = self.gate_up_proj.gate_up(x)
        return self.down_proj.forward_pending(h) if defer else self.down_proj(h)


class SparseMoeBlock(nn.Module):
    """Qwen3-MoE block: softmax router, top-k experts, optional renormalised weights."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size
        )

    def norm_and_route(
        self, norm: RMSNorm, x: torch.Tensor | PendingSum, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The norm before this block and the gate's logits of its output in one launch, where
        the experts' backend has one (`MoEBackend.norm_and_gate`): `(h, residual, logits)`
        for `forward(h, logits=logits)`; else None."""
        gate = self.gate.weight
        if gate.dtype != torch.promote_types(norm.weight.dtype, x.dtype):
            return None  # `gate_logits` takes F.linear's product there
        return self.experts.backend.norm_and_gate(norm, x, residual, gate, gate.dtype)

    def forward(
        self, x: torch.Tensor, defer: bool = False, logits: torch.Tensor | None = None
    ) -> torch.Tensor | PendingSum:
        # Routed by the experts' backend, which may fold the routing into its expert kernels;
        # its gate product too (`gate_logits`: `self.gate(x)`, or a kernel for a few tokens),
        # unless `norm_and_route` gave the logits. `defer`: the experts' combine may be left
        # to the next norm.
        if logits is None:
            logits = self.experts.backend.gate_logits(x, self.gate.weight)
        return self.experts.forward_routed(x, logits, self.top_k, self.renormalize, defer=defer)


def decoder_layer(
    config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, backend: AttentionBackend
) -> DecoderLayer:
    mlp: nn.Module = (
        SparseMoeBlock(config)
        if config.is_moe_layer(layer_id)
        else MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
    )
    return DecoderLayer(config, Attention(config, layer_id, rotary, backend), mlp)


class LlamaForCausalLM(DecoderOnlyLM):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__(config)
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
        # One rotary table shared by every layer (registered once, on the model).
        self.rotary = rotary
        self.layers = nn.ModuleList(
            decoder_layer(config, i, rotary, backend) for i in range(config.num_layers)
        )

    def kv_cache_spec(self) -> KVCacheSpec:
        """Per-head K and V of `head_dim` for each of the `num_kv_heads` heads."""
        return KVCacheSpec(self.config.num_kv_heads, self.config.head_dim, self.config.head_dim)

    def weight_map(self) -> dict[str, WeightTarget]:
        """Every Hugging Face tensor name this model expects, and where it goes."""
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        targets: dict[str, WeightTarget] = {
            "model.embed_tokens.weight": WeightTarget("embed_tokens.weight"),
            "model.norm.weight": WeightTarget("norm.weight"),
        }
        if self.lm_head is not None:
            targets["lm_head.weight"] = WeightTarget("lm_head.weight")
        for i in range(c.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                targets[f"{hf}{norm}.weight"] = WeightTarget(f"{ours}{norm}.weight")
            attn, our_attn = f"{hf}self_attn.", f"{ours}self_attn."
            suffixes = ("weight", "bias") if c.qkv_bias else ("weight",)
            for suffix in suffixes:
                for name, offset, size in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                    targets[f"{attn}{name}_proj.{suffix}"] = WeightTarget(
                        f"{our_attn}qkv_proj.{suffix}", offset=offset, size=size
                    )
            for suffix in ("weight", "bias") if c.o_bias else ("weight",):
                targets[f"{attn}o_proj.{suffix}"] = WeightTarget(f"{our_attn}o_proj.{suffix}")
            if c.qk_norm:
                for norm in ("q_norm", "k_norm"):
                    targets[f"{attn}{norm}.weight"] = WeightTarget(f"{our_attn}{norm}.weight")
            mlp, our_mlp = f"{hf}mlp.", f"{ours}mlp."
            if c.is_moe_layer(i):
                targets[f"{mlp}gate.weight"] = WeightTarget(f"{our_mlp}gate.weight")
                inter = c.moe_intermediate_size
                for e in range(c.num_experts):
                    expert = f"{mlp}experts.{e}."
                    w13, w2 = f"{our_mlp}experts.w13", f"{our_mlp}experts.w2"
                    targets[f"{expert}gate_proj.weight"] = WeightTarget(w13, e, 0, inter)
                    targets[f"{expert}up_proj.weight"] = WeightTarget(w13, e, inter, inter)
                    targets[f"{expert}down_proj.weight"] = WeightTarget(w2, e)
            else:
                inter = c.intermediate_size
                for suffix in ("weight", "bias") if c.mlp_bias else ("weight",):
                    gate_up = f"{our_mlp}gate_up_proj.{suffix}"
                    targets[f"{mlp}gate_proj.{suffix}"] = WeightTarget(gate_up, None, 0, inter)
                    targets[f"{mlp}up_proj.{suffix}"] = WeightTarget(gate_up, None, inter, inter)
                    targets[f"{mlp}down_proj.{suffix}"] = WeightTarget(
                        f"{our_mlp}down_proj.{suffix}"
                    )
        return targets

    @staticmethod
    def ignored_weight(name: str) -> bool:
        """Checkpoint tensors that carry nothing this model needs."""
        return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"
