"""DeepSeek-V3-class decoder (DeepSeek-V3/R1, Kimi-K2): multi-head latent attention and a
grouped-routing MoE with shared experts.

MLA caches, per token and layer, only the normalised latent `c_kv` `[kv_lora_rank]` (in the
pool's K tensor) and the rotary key `k_pe` `[qk_rope_head_dim]` (in its V tensor), shared by all
heads. Attention runs in the weight-absorbed form: `kv_b_proj` holds per head an up-projection
W_UK `[qk_nope, R]` to the no-rope key and W_UV `[v_head, R]` to the value, so

    q_nope . (W_UK c) = (W_UK^T q_nope) . c    and    sum_j p_j W_UV c_j = W_UV sum_j p_j c_j

and the backend attends latent queries to the latent cache (multi-query attention, one KV head)
without ever materialising per-head keys or values. A backend may instead ask for the
non-absorbed form (`AttentionBackend.mla_expands`), where it up-projects the context's latents
with `kv_b_proj` itself: fewer FLOPs when many new tokens share a context (prefill).

Shapes: the batch is flattened, so activations are `[T, hidden]` for T new tokens.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from engine.config import ModelConfig
from engine.forward_batch import ForwardBatch
from engine.kv_cache import KVCacheSpec
from engine.layers.attention import AttentionBackend
from engine.layers.linear import Linear
from engine.layers.moe import FusedExperts, GroupedRouting, MoEBackend
from engine.layers.norm import RMSNorm
from engine.layers.pending import PendingSum
from engine.layers.rotary import RotaryEmbedding, softmax_mscale
from engine.loader import WeightTarget
from engine.models.base import DecoderLayer, DecoderOnlyLM
from engine.models.llama import MLP

# DeepSeek builds its q_a/kv_a norms without passing config.rms_norm_eps (reference and
# transformers alike), so they keep the RMSNorm default.
LATENT_NORM_EPS = 1e-6
_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


class MLAttention(nn.Module):
    """Multi-head latent attention. `fused_qkv_a_proj` computes, in one matmul, the query part
    (its `q_lora_rank` compression, or the full query when there is none), the latent, and the
    rotary key."""

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        mla = config.mla
        if mla is None:
            raise ValueError(f"{config.architecture} needs MLA settings")
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.kv_lora_rank = mla.kv_lora_rank
        self.qk_nope_head_dim = mla.qk_nope_head_dim
        self.qk_rope_head_dim = mla.qk_rope_head_dim
        self.v_head_dim = mla.v_head_dim
        self.scale = mla.qk_head_dim**-0.5 * softmax_mscale(config.rope)
        q_full = config.num_heads * mla.qk_head_dim
        self.q_a_size = q_full if mla.q_lora_rank is None else mla.q_lora_rank
        # The projections on the GEMM backend's choice (`Linear`: cuBLAS unless
        # `skinny_gemm.TUNED` records a shape and row count where the skinny GEMM wins).
        self.fused_qkv_a_proj = Linear(
            config.hidden_size,
            self.q_a_size + mla.kv_lora_rank + mla.qk_rope_head_dim,
            bias=False,
        )
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: Linear | None = None
        if mla.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, q_full, bias=False)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            mla.kv_lora_rank, config.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.o_proj = Linear(config.num_heads * mla.v_head_dim, config.hidden_size, bias=False)
        self.rotary = rotary
        self.backend = backend

    def norm_and_project(
        self, norm: RMSNorm, x: torch.Tensor | PendingSum, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The norm before this block inside the fused query-and-latent product's launch, as
        `llama.Attention.norm_and_project`: `(its output, residual)` or None."""
        return self.fused_qkv_a_proj.forward_normed(norm.weight, norm.eps, x, residual)

    def forward(
        self,
        x: torch.Tensor | None,
        batch: ForwardBatch,
        defer: bool = False,
        qkv: torch.Tensor | None = None,
    ) -> torch.Tensor | PendingSum:
        """`defer`: the O projection's split-K sum may be left to the next norm. `qkv`: the
        fused query-and-latent product's output, from `norm_and_project` (x then None)."""
        if qkv is None:
            assert x is not None
            qkv = self.fused_qkv_a_proj(x)
        q, c_kv, k_pe = qkv.split([self.q_a_size, self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.q_a_layernorm is not None and self.q_b_proj is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.view(
            -1, self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
        ).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        # The latent before its norm, the rotary parts before RoPE: the backend applies both
        # (the Triton backend in one launch with the cache write).
        c_kv, k_pe = c_kv[:, None, :], k_pe[:, None, :]  # [T, 1, R], [T, 1, P]
        if self.backend.mla_expands(batch):
            # Prefill/extend: per-head keys and values up-projected from the context latents.
            out = batch.attend(self._attend_expanded, q_nope, q_pe, c_kv, k_pe)  # [T, H, v]
            return self._output(out.flatten(1), defer)
        # kv_b_proj.weight: [H * (nope + v), R] -> W_UK [H, nope, R], W_UV [H, v, R]
        w_kv = self.kv_b_proj.weight.view(self.num_heads, -1, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        # Both absorptions are products batched over heads, on the weight's views as they are
        # (the query's W_UK inside the backend's call, which may share its launch with the
        # latent's norm, the rotations and the cache write).
        # [T, H, R], or the decode's ranges uncombined for the W_UV product to combine
        latent = self.backend.forward_mla_absorbed_rope(
            q_nope, w_uk, q_pe, c_kv, k_pe, self.kv_a_layernorm, self.rotary, self.layer_id,
            batch, self.scale,
        )  # fmt: skip
        attn = self.backend.mla_absorb_output(latent, w_uv)  # [T, H, v], contiguous
        return self._output(attn.flatten(1), defer)

    def _attend_expanded(
        self,
        batch: ForwardBatch,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
    ) -> torch.Tensor:
        """The non-absorbed attention from the projected parts: `ForwardBatch.attend`'s call."""
        return self.backend.forward_mla_expanded_rope(
            q_nope, q_pe, c_kv, k_pe, self.kv_a_layernorm, self.rotary, self.kv_b_proj,
            self.layer_id, batch, self.scale,
        )  # fmt: skip

    def _output(self, x: torch.Tensor, defer: bool) -> torch.Tensor | PendingSum:
        return self.o_proj.forward_pending(x) if defer else self.o_proj(x)


class GroupedTopkRouter(nn.Module):
    """DeepSeek-V3's gate: float32 logits (the MoE backend's `router_logits`: the reference
    upcasts x and the weight, the Triton backend reads them as they are), routed by
    `routing`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # Kept in float32 whatever the weights' dtype, as in the reference.
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(config.num_experts, dtype=torch.float32)
        )
        self.routing = GroupedRouting(
            config.num_experts_per_tok,
            config.num_expert_groups,
            config.topk_groups,
            config.norm_topk_prob,
            config.routed_scaling_factor,
        )

    def forward(self, x: torch.Tensor, backend: MoEBackend) -> torch.Tensor:
        """Router logits `[T, E]` in float32."""
        return backend.router_logits(x, self.weight)


class DeepseekMoE(nn.Module):
    """Routed experts (grouped top-k) plus always-on shared experts, summed.

    `fuse_shared_experts` stacks the shared experts (an MLP of `num_shared_experts *
    moe_intermediate_size`) into the routed experts' weights as `num_shared_experts` extra
    experts that every token takes with weight 1.0 (`FusedExperts.num_shared`): the routed
    kernels compute both in the same launches, with no MLP and no add. The sum is the same; the
    rounding differs in reduced precision (one rounding of the float32 combine, where the
    separate MLP rounds its output, the routed output and their sum each to the dtype)."""

    def __init__(self, config: ModelConfig, fuse_shared_experts: bool = False) -> None:
        super().__init__()
        self.gate = GroupedTopkRouter(config)
        fused = config.num_shared_experts if fuse_shared_experts else 0
        self.experts = FusedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, num_shared=fused
        )
        shared = 0 if fused else config.moe_intermediate_size * config.num_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared, bias=False) if shared else None

    def norm_and_route(
        self, norm: RMSNorm, x: torch.Tensor | PendingSum, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """As `SparseMoeBlock.norm_and_route`, with the gate's float32 logits."""
        return self.experts.backend.norm_and_gate(
            norm, x, residual, self.gate.weight, torch.float32
        )

    def forward(
        self, x: torch.Tensor, defer: bool = False, logits: torch.Tensor | None = None
    ) -> torch.Tensor | PendingSum:
        """`defer`: the experts' combine may be left to the next norm (not with a separate
        shared MLP, whose output is added here). `logits`: the gate's, from
        `norm_and_route`."""
        if logits is None:
            logits = self.gate(x, self.experts.backend)
        out = self.experts.forward_routed_grouped(
            x,
            logits,
            self.gate.e_score_correction_bias,
            self.gate.routing,
            defer=defer and self.shared_experts is None,
        )
        return out if self.shared_experts is None else out + self.shared_experts(x)


def decoder_layer(
    config: ModelConfig,
    layer_id: int,
    rotary: RotaryEmbedding,
    backend: AttentionBackend,
    fuse_shared_experts: bool = False,
) -> DecoderLayer:
    mlp: nn.Module = (
        DeepseekMoE(config, fuse_shared_experts)
        if config.is_moe_layer(layer_id)
        else MLP(config.hidden_size, config.intermediate_size, bias=False)
    )
    return DecoderLayer(config, MLAttention(config, layer_id, rotary, backend), mlp)


class DeepseekV3ForCausalLM(DecoderOnlyLM):
    """`fuse_shared_experts`: stack every MoE layer's shared experts into its routed experts'
    weights (`DeepseekMoE`); the weight map then splits the checkpoint's shared MLP into them."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, fuse_shared_experts: bool = False
    ) -> None:
        if config.mla is None:
            raise ValueError(f"{config.architecture} needs MLA settings")
        super().__init__(config)
        self.mla = config.mla
        self.fuse_shared_experts = fuse_shared_experts and config.num_shared_experts > 0
        # One rotary table, over the rope part of each head only, shared by every layer.
        self.rotary = RotaryEmbedding(
            config.rope,
            config.rotary_dim,
            config.max_position_embeddings,
            interleaved=config.mla.rope_interleave,
        )
        self.layers = nn.ModuleList(
            decoder_layer(config, i, self.rotary, backend, self.fuse_shared_experts)
            for i in range(config.num_layers)
        )

    def kv_cache_spec(self) -> KVCacheSpec:
        """One "head" per token: K holds the latent `c_kv`, V the rotary key `k_pe`."""
        return KVCacheSpec(1, self.mla.kv_lora_rank, self.mla.qk_rope_head_dim)

    def weight_map(self) -> dict[str, WeightTarget | tuple[WeightTarget, ...]]:
        """Every Hugging Face tensor name this model expects, and where it goes.

        Routed experts are read under the per-expert names that published checkpoints use (and
        that transformers 5 `save_pretrained` writes back): `mlp.experts.E.{gate,up,down}_proj`.
        With shared-expert fusion, the shared MLP's gate/up rows `[s * I, (s + 1) * I)` and its
        down columns of the same range go to stacked expert `E + s`.
        """
        c, mla = self.config, self.mla
        targets: dict[str, WeightTarget | tuple[WeightTarget, ...]] = {
            "model.embed_tokens.weight": WeightTarget("embed_tokens.weight"),
            "model.norm.weight": WeightTarget("norm.weight"),
        }
        if self.lm_head is not None:
            targets["lm_head.weight"] = WeightTarget("lm_head.weight")
        q_a_size = c.num_heads * mla.qk_head_dim if mla.q_lora_rank is None else mla.q_lora_rank
        for i in range(c.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                targets[f"{hf}{norm}.weight"] = WeightTarget(f"{ours}{norm}.weight")
            attn, our_attn = f"{hf}self_attn.", f"{ours}self_attn."
            fused = f"{our_attn}fused_qkv_a_proj.weight"
            q_name = "q_proj" if mla.q_lora_rank is None else "q_a_proj"
            targets[f"{attn}{q_name}.weight"] = WeightTarget(fused, None, 0, q_a_size)
            targets[f"{attn}kv_a_proj_with_mqa.weight"] = WeightTarget(fused, None, q_a_size)
            names = ["kv_a_layernorm", "kv_b_proj", "o_proj"]
            if mla.q_lora_rank is not None:
                names += ["q_a_layernorm", "q_b_proj"]
            for name in names:
                targets[f"{attn}{name}.weight"] = WeightTarget(f"{our_attn}{name}.weight")
            mlp, our_mlp = f"{hf}mlp.", f"{ours}mlp."
            if c.is_moe_layer(i):
                for name in ("weight", "e_score_correction_bias"):
                    targets[f"{mlp}gate.{name}"] = WeightTarget(f"{our_mlp}gate.{name}")
                inter = c.moe_intermediate_size
                w13, w2 = f"{our_mlp}experts.w13", f"{our_mlp}experts.w2"
                for e in range(c.num_experts):
                    expert = f"{mlp}experts.{e}."
                    targets[f"{expert}gate_proj.weight"] = WeightTarget(w13, e, 0, inter)
                    targets[f"{expert}up_proj.weight"] = WeightTarget(w13, e, inter, inter)
                    targets[f"{expert}down_proj.weight"] = WeightTarget(w2, e)
                if self.fuse_shared_experts:
                    shared = f"{mlp}shared_experts."
                    count = c.num_shared_experts
                    _fused_shared_targets(targets, shared, w13, w2, c.num_experts, inter, count)
                elif c.num_shared_experts:
                    _mlp_targets(
                        targets,
                        f"{mlp}shared_experts.",
                        f"{our_mlp}shared_experts.",
                        inter * c.num_shared_experts,
                    )
            else:
                _mlp_targets(targets, mlp, our_mlp, c.intermediate_size)
        return targets

    def ignored_weight(self, name: str) -> bool:
        """Checkpoint tensors that carry nothing this model needs.

        Published DeepSeek-V3 checkpoints append their multi-token-prediction module(s) as
        extra layers after the last decoder layer (`model.layers.61.*` for V3's 61 layers:
        embed, norms, `eh_proj`, a decoder layer, a shared head). They only serve speculative
        decoding, which this engine does not do, so they are skipped.
        """
        if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight":
            return True
        match = _LAYER_INDEX.match(name)
        return match is not None and int(match.group(1)) >= self.config.num_layers


def _fused_shared_targets(
    targets: dict[str, WeightTarget | tuple[WeightTarget, ...]],
    hf: str,
    w13: str,
    w2: str,
    num_routed: int,
    inter: int,
    num_shared: int,
) -> None:
    """A shared MLP of `num_shared * inter` split into stacked experts `num_routed + s`: gate
    and up rows, and down columns, `[s * inter, (s + 1) * inter)` each."""
    shared = range(num_routed, num_routed + num_shared)
    rows = [(e, (e - num_routed) * inter) for e in shared]
    targets[f"{hf}gate_proj.weight"] = tuple(
        WeightTarget(w13, e, 0, inter, source_offset=at, source_size=inter) for e, at in rows
    )
    targets[f"{hf}up_proj.weight"] = tuple(
        WeightTarget(w13, e, inter, inter, source_offset=at, source_size=inter) for e, at in rows
    )
    targets[f"{hf}down_proj.weight"] = tuple(
        WeightTarget(w2, e, source_dim=1, source_offset=at, source_size=inter) for e, at in rows
    )


def _mlp_targets(
    targets: dict[str, WeightTarget | tuple[WeightTarget, ...]], hf: str, ours: str, inter: int
) -> None:
    """gate_proj/up_proj into the fused gate_up_proj, and down_proj, of one `MLP`."""
    gate_up = f"{ours}gate_up_proj.weight"
    targets[f"{hf}gate_proj.weight"] = WeightTarget(gate_up, None, 0, inter)
    targets[f"{hf}up_proj.weight"] = WeightTarget(gate_up, None, inter, inter)
    targets[f"{hf}down_proj.weight"] = WeightTarget(f"{ours}down_proj.weight")
