"""Rotary embeddings against transformers' own RoPE initialisation and application."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from engine.config import RopeConfig
from engine.layers.rotary import RotaryEmbedding, rope_inv_freq

HEAD_DIM = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITION = 4096

YARN = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0}
CASES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default-large-theta": {"rope_type": "default", "rope_theta": 1000000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    "llama3-other-band": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 16.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn": {**YARN, "original_max_position_embeddings": 1024},
    "yarn-mscale": {
        **YARN,
        "original_max_position_embeddings": 1024,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    },
    "yarn-mscale-only": {**YARN, "original_max_position_embeddings": 1024, "mscale": 0.707},
    "yarn-attention-factor": {
        **YARN,
        "original_max_position_embeddings": 1024,
        "attention_factor": 0.8,
    },
    "yarn-betas": {
        **YARN,
        "original_max_position_embeddings": 1024,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    },
    "yarn-untruncated": {**YARN, "original_max_position_embeddings": 1024, "truncate": False},
    "yarn-implicit-factor": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": None,
        "original_max_position_embeddings": 1024,
    },
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


def hf_config(params: dict[str, Any], max_position: int = MAX_POSITION) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HEAD_DIM * NUM_HEADS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position,
        rope_parameters=copy.deepcopy(params),  # transformers fills it in place
    )


def hf_inv_freq(params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """transformers' inverse frequencies and attention factor, as its RoPE module picks them."""
    config = hf_config(params)
    if params["rope_type"] == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    # dynamic: at init (seq_len None) transformers computes it at max_position_embeddings.
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config)


def our_rope(params: dict[str, Any]) -> RopeConfig:
    return RopeConfig.from_hf({"rope_parameters": params, "max_position_embeddings": MAX_POSITION})


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_matches_transformers(case: str) -> None:
    expected, expected_factor = hf_inv_freq(CASES[case])
    inv_freq, factor = rope_inv_freq(our_rope(CASES[case]), HEAD_DIM, MAX_POSITION)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (HEAD_DIM // 2,)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_attention_factor_cases_are_distinct() -> None:
    """The yarn cases really exercise different attention-factor branches."""
    factors = {
        case: rope_inv_freq(our_rope(CASES[case]), HEAD_DIM, MAX_POSITION)[1]
        for case in ("yarn", "yarn-mscale", "yarn-attention-factor")
    }
    assert len(set(factors.values())) == 3
    assert factors["yarn-attention-factor"] == 0.8


@pytest.mark.parametrize("seq_len", [MAX_POSITION, 2 * MAX_POSITION, 3 * MAX_POSITION + 5])
def test_dynamic_ntk_formula(seq_len: int) -> None:
    """Dynamic NTK at a length past the trained one: ours is static at `max_position`, with
    `original_max_position_embeddings` as the trained length that transformers reads from
    `max_position_embeddings`."""
    params = CASES["dynamic"]
    expected, expected_factor = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(params), seq_len=seq_len)
    rope = RopeConfig(
        rope_type="dynamic", factor=2.0, original_max_position_embeddings=MAX_POSITION
    )
    inv_freq, factor = rope_inv_freq(rope, HEAD_DIM, seq_len)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert factor == expected_factor == 1.0


@pytest.mark.parametrize("case", list(CASES))
def test_rotary_embedding_matches_transformers(case: str) -> None:
    params = CASES[case]
    gen = torch.Generator().manual_seed(0)
    num_tokens = 37
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen)
    positions[:2] = torch.tensor([0, MAX_POSITION - 1])
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen)

    rotary = RotaryEmbedding(our_rope(params), HEAD_DIM, MAX_POSITION)
    q_out, k_out = rotary(positions, q, k)

    hf_rotary = LlamaRotaryEmbedding(hf_config(params))
    # transformers: q/k [B, H, T, D], cos/sin [B, T, D].
    cos, sin = hf_rotary(q[None], positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
