"""What every decoder-only model here shares: embeddings in, a stack of layers, a final norm,
and an LM head that may be tied to the embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.forward_batch import ForwardBatch
from engine.layers.norm import RMSNorm
from engine.layers.pending import PendingSum


class DecoderLayer(nn.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `+ mlp(norm(x))`."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        x: torch.Tensor | PendingSum,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor | PendingSum, torch.Tensor]:
        """`(mlp output, residual stream)`: the stream is the sum of everything before the MLP
        output; the next norm adds that output in (fused on CUDA). The output may be a
        `PendingSum` (engine.layers.pending), which only a norm's `forward_residual` reads.
        Every attention and MLP module takes `defer`, and may decline it.
        `residual` None: `x` is the embedding, the stream's start."""
        # The attention's and the MLP's last sums (a split-K reduce, a MoE combine) may be
        # left to the norm that reads each next.
        if residual is None:
            if isinstance(x, PendingSum):
                raise TypeError("the first layer takes the embeddings, a tensor")
            residual = x
            h = self.self_attn(self.input_layernorm(x), batch, defer=True)
        else:
            # An attention block may run the norm inside its first projection's launch.
            fold = getattr(self.self_attn, "norm_and_project", None)
            projected = fold(self.input_layernorm, x, residual) if fold is not None else None
            if projected is not None:
                qkv, residual = projected
                h = self.self_attn(None, batch, defer=True, qkv=qkv)
            else:
                h, residual = self.input_layernorm.forward_residual(x, residual)
                h = self.self_attn(h, batch, defer=True)
        # A MoE block may take its gate's logits from the norm's own launch.
        route = getattr(self.mlp, "norm_and_route", None)
        routed = route(self.post_attention_layernorm, h, residual) if route is not None else None
        if routed is not None:
            h, residual, logits = routed
            return self.mlp(h, defer=True, logits=logits), residual
        h, residual = self.post_attention_layernorm.forward_residual(h, residual)
        return self.mlp(h, defer=True), residual


class DecoderOnlyLM(nn.Module):
    """Subclasses build `self.layers` (each called as `layer(x, residual, batch)`) and
    `self.rotary`."""

    layers: nn.ModuleList

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states `[T, hidden]` of the step's new tokens."""
        x = self.embed_tokens(batch.input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        if residual is None:
            return self.norm(x)
        return self.norm.forward_residual(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[B, vocab]` in the weights' dtype for the given hidden rows (the sampler
        widens them to float32 where a path needs it: greedy picks read them as they are)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)
