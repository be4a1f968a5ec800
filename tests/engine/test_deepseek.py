"""DeepSeek-V3 pieces against transformers: grouped routing, the MoE block, interleaved RoPE,
the softmax mscale, config parsing, the compressed (MLA) KV cache, MTP weights, and the
model variants the session's tiny checkpoint does not cover."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from engine.config import EngineConfig, ModelConfig, RopeConfig
from engine.engine import Engine
from engine.layers.moe import select_experts_grouped
from engine.layers.rotary import RotaryEmbedding, softmax_mscale
from engine.models.deepseek_v3 import DeepseekMoE
from engine.sampling import SamplingParams
from tests.engine.reference import MAX_NEW_TOKENS, reference

GREEDY = SamplingParams(temperature=0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def hf_config(**overrides: Any) -> dict[str, Any]:
    """A small DeepSeek-V3 config.json body."""
    raw: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 2048,
    }
    return {**raw, **overrides}


# -- routing ----------------------------------------------------------------------------------

ROUTING_CASES: dict[str, dict[str, Any]] = {
    "tiny": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1},
    "v3-like": {"n_routed_experts": 64, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 4},
    "kimi-like": {"n_routed_experts": 32, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1},
    "no-renorm": {
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
    },
}


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_grouped_routing_matches_transformers(case: str) -> None:
    raw = hf_config(**ROUTING_CASES[case])
    config = DeepseekV3Config(**raw)
    torch.manual_seed(0)
    router = hf.DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.1)
        router.e_score_correction_bias.normal_(0.0, 0.1)
    x = torch.randn(64, config.hidden_size)
    logits, ref_weights, ref_ids = router(x)

    top_k, groups, topk_groups = raw["num_experts_per_tok"], raw["n_group"], raw["topk_group"]
    weights, ids = select_experts_grouped(
        logits,
        router.e_score_correction_bias,
        top_k,
        groups,
        topk_groups,
        raw["norm_topk_prob"],
        raw["routed_scaling_factor"],
    )
    assert weights.dtype == torch.float32 and ids.shape == ref_ids.shape
    # Same experts per token (order within a row is unspecified), with the same weights.
    ours, theirs = ids.sort(dim=-1), ref_ids.sort(dim=-1)
    assert torch.equal(ours.values, theirs.values)
    torch.testing.assert_close(
        weights.gather(1, ours.indices), ref_weights.gather(1, theirs.indices), rtol=0, atol=1e-6
    )
    # The bias matters: without it, some tokens pick other experts.
    _, unbiased = select_experts_grouped(
        logits,
        torch.zeros_like(router.e_score_correction_bias),
        top_k,
        groups,
        topk_groups,
        raw["norm_topk_prob"],
    )
    assert not torch.equal(unbiased.sort(dim=-1).values, theirs.values)


def test_group_limit_keeps_experts_in_the_best_groups() -> None:
    # Expert 0 scores highest, but group 1 (experts 4-7) has the best top-2 sum.
    logits = torch.tensor([[5.0, -5.0, -5.0, -5.0, 2.0, 2.0, 1.0, -5.0]])
    _, ids = select_experts_grouped(logits, torch.zeros(8), 2, 2, 1, renormalize=True)
    assert sorted(ids[0].tolist()) == [4, 5]
    _, ids = select_experts_grouped(logits, torch.zeros(8), 2, 2, 2, renormalize=True)
    assert sorted(ids[0].tolist()) == [0, 4]


def test_moe_block_matches_transformers() -> None:
    raw = hf_config()
    config = DeepseekV3Config(**raw)
    torch.manual_seed(1)
    ref = hf.DeepseekV3MoE(config)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.1)
        ref.gate.e_score_correction_bias.normal_(0.0, 0.1)
    ours = DeepseekMoE(ModelConfig.from_hf(raw))
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.gate.e_score_correction_bias.copy_(ref.gate.e_score_correction_bias)
        ours.experts.w13.copy_(ref.experts.gate_up_proj)  # [E, 2I, H], gate rows first
        ours.experts.w2.copy_(ref.experts.down_proj)
        shared = ref.shared_experts
        assert ours.shared_experts is not None
        gate_up = torch.cat((shared.gate_proj.weight, shared.up_proj.weight))
        ours.shared_experts.gate_up_proj.weight.copy_(gate_up)
        ours.shared_experts.down_proj.weight.copy_(shared.down_proj.weight)
    x = torch.randn(32, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x[None])[0], rtol=0, atol=1e-5)


# -- rotary -----------------------------------------------------------------------------------

YARN_MSCALE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@pytest.mark.parametrize(
    "params",
    [
        YARN_MSCALE,
        {**YARN_MSCALE, "mscale_all_dim": 0.707, "factor": 4.0},
        {**YARN_MSCALE, "mscale_all_dim": None},
        {"rope_type": "default", "rope_theta": 10000.0},
    ],
)
def test_softmax_mscale_matches_transformers(params: dict[str, Any]) -> None:
    rope = RopeConfig.from_hf({"rope_parameters": params, "max_position_embeddings": 163840})
    assert softmax_mscale(rope) == pytest.approx(hf.yarn_apply_mscale(params, 1.0), rel=1e-12)


def test_interleaved_rotary_matches_transformers() -> None:
    rope_dim, max_position = 16, 512
    config = DeepseekV3Config(
        **hf_config(
            qk_rope_head_dim=rope_dim,
            max_position_embeddings=max_position,
            rope_parameters={**YARN_MSCALE, "factor": 4.0, "original_max_position_embeddings": 128},
        )
    )
    rope = RopeConfig.from_hf(config.to_dict())
    ours = RotaryEmbedding(rope, rope_dim, max_position, interleaved=True)
    theirs = hf.DeepseekV3RotaryEmbedding(config)
    positions = torch.tensor([0, 1, 7, 100, 511])
    q, k = torch.randn(5, 4, rope_dim), torch.randn(5, 1, rope_dim)
    cos, sin = theirs(q, positions[None])
    # transformers' layout: [B, H, S, D]
    ref_q, ref_k = hf.apply_rotary_pos_emb_interleave(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    got_q, got_k = ours(positions, q, k)
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1), rtol=0, atol=1e-6)


# -- config -----------------------------------------------------------------------------------


def published_v3_config() -> dict[str, Any]:
    """The shape-relevant fields of DeepSeek-V3's published config.json (legacy rope keys)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def test_published_v3_config() -> None:
    c = ModelConfig.from_hf(published_v3_config())
    assert c.mla is not None
    assert (c.mla.q_lora_rank, c.mla.kv_lora_rank, c.mla.qk_head_dim) == (1536, 512, 192)
    assert c.mla.rope_interleave and c.rotary_dim == 64 and c.head_dim == 192
    assert c.mlp_only_layers == (0, 1, 2) and c.is_moe_layer(3) and not c.is_moe_layer(2)
    assert (c.num_experts, c.num_experts_per_tok, c.num_shared_experts) == (256, 8, 1)
    assert (c.scoring_func, c.num_expert_groups, c.topk_groups) == ("sigmoid", 8, 4)
    assert c.routed_scaling_factor == 2.5 and c.norm_topk_prob
    assert c.rope.rope_type == "yarn" and c.rope.factor == 40 and c.rope.mscale_all_dim == 1.0
    assert c.eos_token_ids == (1,)


def test_moe_layer_freq_and_no_q_lora() -> None:
    c = ModelConfig.from_hf(
        hf_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2, q_lora_rank=None)
    )
    assert c.mla is not None and c.mla.q_lora_rank is None
    assert [c.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"topk_method": "greedy"}, "topk_method='greedy'"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"n_group": 3}, "n_group \\(3\\) must be >= 1 and divide n_routed_experts \\(8\\)"),
        ({"topk_group": 3}, "topk_group \\(3\\) must be in \\[1, n_group=2\\]"),
        ({"n_group": 8}, "at least|>= 2 experts per group"),
        ({"num_experts_per_tok": 5}, "exceeds the 4 experts"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even"),
        ({"kv_lora_rank": 0}, "kv_lora_rank must be >= 1"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
            "quant_method='fp8'",
        ),
    ],
)
def test_bad_deepseek_configs(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf_config(**overrides))


# -- the compressed KV cache ------------------------------------------------------------------


def test_mla_cache_holds_latent_and_rope_key(tiny_models: dict[str, Path]) -> None:
    engine = Engine(EngineConfig(model_path=str(tiny_models["deepseek-v3"]), num_pages=8))
    cache = engine.runner.kv_cache
    # K: the latent c_kv (kv_lora_rank 16); V: the rope key k_pe (qk_rope_head_dim 8); one head.
    assert (cache.num_kv_heads, cache.k_dim, cache.v_dim) == (1, 16, 8)
    # 8 pages for requests plus the scratch page at the end.
    assert cache.num_pages == 8 and cache.scratch_page == 8
    assert all(k.shape == (9, 16, 1, 16) for k in cache.k) and len(cache.k) == 3
    assert all(v.shape == (9, 16, 1, 8) for v in cache.v) and len(cache.v) == 3
    assert (cache.k_page_bytes, cache.v_page_bytes) == (16 * 16 * 4, 16 * 8 * 4)
    assert cache.total_bytes == 3 * 9 * (1024 + 512)
    with pytest.raises(ValueError, match="k_dim=16, v_dim=8"):
        _ = cache.head_dim
    with pytest.raises(ValueError, match="use k_page_bytes and v_page_bytes"):
        _ = cache.page_bytes

    # Sizing by memory counts both tensors of every layer.
    budget = 10 * 3 * (1024 + 512) + 5
    sized = Engine(
        EngineConfig(model_path=str(tiny_models["deepseek-v3"]), kv_cache_memory_bytes=budget)
    )
    assert sized.runner.kv_cache.num_pages == 10


def test_mla_cache_matches_transformers_cache(tiny_models: dict[str, Path]) -> None:
    """What the pool holds per token is exactly transformers' compressed cache entry."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["deepseek-v3"]
    prompt = list(range(3, 24))
    engine = Engine(EngineConfig(model_path=str(model_dir), num_pages=16, page_size=4))
    engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=1))
    batch = engine.scheduler.schedule()
    assert batch is not None
    engine.runner.forward(batch)
    (seq,) = batch.seqs
    slots = torch.tensor([seq.page_table[i // 4] * 4 + i % 4 for i in range(len(prompt))])

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        past = ref(torch.tensor([prompt]), use_cache=True).past_key_values
    for layer in range(3):
        latent, rope_key = engine.runner.kv_cache.slots(layer)
        ref_latent = past.layers[layer].keys[0, 0]  # [S, kv_lora_rank], normalised
        ref_rope_key = past.layers[layer].values[0, 0]  # [S, qk_rope_head_dim], rotated
        torch.testing.assert_close(latent[slots, 0], ref_latent, rtol=0, atol=1e-5)
        torch.testing.assert_close(rope_key[slots, 0], ref_rope_key, rtol=0, atol=1e-5)
    engine.abort(seq.request_id)


# -- weights ----------------------------------------------------------------------------------


def test_tiny_checkpoint_has_a_live_correction_bias(tiny_models: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_models["deepseek-v3"] / "model.safetensors"))
    biases = [t for n, t in tensors.items() if n.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(b.dtype == torch.float32 and b.abs().min() > 0 for b in biases)
    # Real checkpoints' per-expert names, not transformers' fused in-memory ones.
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in tensors
    assert not any("gate_up_proj" in n for n in tensors)


def test_mtp_layers_are_ignored(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["deepseek-v3"]
    ref = reference(src)
    dst = shutil.copytree(src, tmp_path / "with-mtp")
    # As published checkpoints carry them: one extra layer past num_hidden_layers.
    mtp = {
        "model.layers.3.eh_proj.weight": torch.randn(64, 128),
        "model.layers.3.enorm.weight": torch.ones(64),
        "model.layers.3.self_attn.kv_b_proj.weight": torch.randn(128, 16),
        "model.layers.3.shared_head.head.weight": torch.randn(512, 64),
    }
    save_file(mtp, str(dst / "mtp.safetensors"))
    engine = Engine(EngineConfig(model_path=str(dst), num_pages=64))
    assert [r.output_ids for r in engine.generate(ref.prompts[:3], GREEDY)] == ref.tokens[:3]

    # Anything else unknown still fails loudly.
    save_file({"model.layers.2.mlp.bogus.weight": torch.zeros(2)}, str(dst / "bogus.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.bogus\.weight"):
        Engine(EngineConfig(model_path=str(dst), num_pages=64))


# -- variants ---------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    # DeepSeek-V2-Lite style: queries projected directly, no compression.
    "no-q-lora": {"q_lora_rank": None},
    # Rotary pairs as two halves; routing without a group limit; no shared experts.
    "plain-rope": {"rope_interleave": False, "n_group": 1, "topk_group": 1},
    # Every layer MoE, two shared experts.
    "all-moe": {"first_k_dense_replace": 0, "n_shared_experts": 2},
}


def write_variant(tiny_dir: Path, out: Path, overrides: dict[str, Any]) -> Path:
    from transformers import DeepseekV3ForCausalLM

    raw = {**json.loads((tiny_dir / "config.json").read_text()), **overrides}
    raw.pop("head_dim", None)
    raw.pop("qk_head_dim", None)
    config = DeepseekV3Config(**raw)
    torch.manual_seed(77)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_transformers(
    tiny_models: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    model_dir = write_variant(tiny_models["deepseek-v3"], tmp_path / variant, VARIANTS[variant])
    ref = reference(model_dir)
    engine = Engine(
        EngineConfig(model_path=str(model_dir), num_pages=256, page_size=4, chunked_prefill_size=8)
    )
    params = SamplingParams(
        temperature=0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, top_logprobs=3
    )
    results = engine.generate(ref.prompts, params)
    assert [r.output_ids for r in results] == ref.tokens
    for result, ref_logits in zip(results, ref.logits, strict=True):
        ref_logp = torch.log_softmax(ref_logits, dim=-1)
        for step, lp in enumerate(result.logprobs):
            assert lp is not None
            assert abs(lp.logprob - ref_logp[step, result.output_ids[step]].item()) < 1e-4
