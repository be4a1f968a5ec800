"""The MoE presets parse as the published models, and the routing recorder behind the MoE
floor sees what the experts were asked to compute."""

from __future__ import annotations

from pathlib import Path

from bench.moe_shapes import PRESETS, ExpertTouches, moe_weight_bytes
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.layers.moe import MoEBackend
from engine.sampling import SamplingParams


def test_presets_parse() -> None:
    qwen = ModelConfig.from_hf(PRESETS["qwen3-30b-a3b"])
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.num_layers) == (128, 8, 48)
    assert all(qwen.is_moe_layer(i) for i in range(qwen.num_layers))
    moon = ModelConfig.from_hf(PRESETS["moonlight-16b-a3b"])
    assert moon.mla is not None and moon.mla.q_lora_rank is None
    assert (moon.num_experts, moon.num_experts_per_tok, moon.num_shared_experts) == (64, 6, 2)
    assert not moon.is_moe_layer(0) and moon.is_moe_layer(1)


def test_expert_touches_records_each_layer_and_restores(tiny_models: dict[str, Path]) -> None:
    engine = Engine(EngineConfig(model_path=str(tiny_models["qwen3-moe"]), num_pages=64))
    model = engine.runner.model
    config = engine.runner.model_config
    touches = ExpertTouches(model)  # type: ignore[arg-type]
    before = [layer.backend for layer in touches.layers]
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    with touches:
        engine.generate([[5, 6, 7, 8], [9, 10]], params)
    assert [layer.backend for layer in touches.layers] == before
    assert all(isinstance(b, MoEBackend) for b in before)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    distinct = touches.distinct()
    assert len(distinct) == moe_layers
    for calls in distinct:
        assert len(calls) >= 3  # a prefill and decode steps
        assert all(1 <= n <= config.num_experts for n in calls)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size * 4
    mean = sum(sum(c) / len(c) for c in distinct)
    assert moe_weight_bytes(config, distinct, 4) == mean * per_expert
