"""Model definitions, looked up by the Hugging Face architecture name."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from engine.config import ModelConfig
from engine.forward_batch import ForwardBatch
from engine.kv_cache import KVCacheSpec
from engine.layers.attention import AttentionBackend
from engine.layers.rotary import RotaryEmbedding
from engine.loader import LoadableModel


class CausalLM(LoadableModel, Protocol):
    """What the `ModelRunner` needs of a model (every class here is an `nn.Module`)."""

    config: ModelConfig
    rotary: RotaryEmbedding  # one table for every layer; the runner keeps it in float32
    lm_head: nn.Linear | None  # None when tied to the input embeddings

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states `[T, hidden]` of the step's new tokens."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[B, vocab]` in the weights' dtype for the given hidden rows."""
        ...

    def kv_cache_spec(self) -> KVCacheSpec:
        """What one token occupies in one layer's K and V cache tensors."""
        ...


def build_model(
    config: ModelConfig, attention: AttentionBackend, fuse_shared_experts: bool = False
) -> CausalLM:
    """Instantiate the model class for `config.architecture` (weights uninitialised).

    `fuse_shared_experts`: stack MoE layers' shared experts into the routed experts' weights
    (DeepSeek-V3; the other families have no shared experts)."""
    if config.architecture == "DeepseekV3ForCausalLM":
        from engine.models.deepseek_v3 import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM(config, attention, fuse_shared_experts).eval()

    from engine.models.llama import LlamaForCausalLM

    # Llama, Qwen2, Qwen3 and Qwen3-MoE differ only in flags the config carries
    # (biases, q/k norm, MoE layers), so one class serves them all.
    return LlamaForCausalLM(config, attention).eval()
