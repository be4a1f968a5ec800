"""Model definitions, looked up by the Hugging Face architecture name."""

from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.layers.attention import AttentionBackend


def build_model(config: ModelConfig, attention: AttentionBackend) -> nn.Module:
    """Instantiate the model class for `config.architecture` (weights uninitialised)."""
    from engine.models.llama import LlamaForCausalLM

    # Llama, Qwen2, Qwen3 and Qwen3-MoE differ only in flags the config carries
    # (biases, q/k norm, MoE layers), so one class serves them all.
    return LlamaForCausalLM(config, attention)
