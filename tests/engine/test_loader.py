"""Checkpoint loading (single file, sharded, broken, dummy, tied) and config.json parsing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig, ModelConfig, RopeConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.testing.tiny_models import write_sharded

GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 200, 31], [400, 3, 3, 9, 77, 120, 8, 64, 99, 250, 11], [42]]


def make_engine(model_dir: Path, **kwargs: Any) -> Engine:
    settings: dict[str, Any] = {"num_pages": 128, "page_size": 16, **kwargs}
    return Engine(EngineConfig(model_path=str(model_dir), **settings))


def greedy_tokens(model_dir: Path, **kwargs: Any) -> list[list[int]]:
    return [r.output_ids for r in make_engine(model_dir, **kwargs).generate(PROMPTS, GREEDY)]


def edited_checkpoint(
    src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], object]
) -> Path:
    """A copy of `src` (config and weights only) whose tensors went through `edit`."""
    dst.mkdir()
    shutil.copyfile(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# -- safetensors checkpoints ----------------------------------------------------------------


def test_sharded_checkpoint_matches_single_file(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    src = tiny_models["llama"]
    sharded = write_sharded(src, tmp_path / "sharded", max_shard_bytes=100_000)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) >= 3
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    assert greedy_tokens(sharded) == greedy_tokens(src)


def test_missing_tensor_is_named(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    broken = edited_checkpoint(tiny_models["llama"], tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match="missing tensors") as info:
        make_engine(broken)
    assert name in str(info.value)


def test_unexpected_tensor_is_named(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.0.mlp.extra_proj.weight"

    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.zeros(4, 4)

    broken = edited_checkpoint(tiny_models["llama"], tmp_path / "m", add)
    with pytest.raises(ValueError, match="unexpected tensors") as info:
        make_engine(broken)
    assert name in str(info.value)


def test_misshapen_tensor_names_both_shapes(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.0.mlp.down_proj.weight"  # [hidden 64, intermediate 128]

    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.zeros(64, 96)

    broken = edited_checkpoint(tiny_models["llama"], tmp_path / "m", reshape)
    with pytest.raises(ValueError) as info:
        make_engine(broken)
    message = str(info.value)
    assert name in message and "(64, 96)" in message and "(64, 128)" in message


def test_index_naming_a_missing_shard(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    sharded = write_sharded(tiny_models["llama"], tmp_path / "sharded", max_shard_bytes=100_000)
    lost = sorted(sharded.glob("*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(FileNotFoundError) as info:
        make_engine(sharded)
    assert lost.name in str(info.value)


def test_directory_without_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shutil.copyfile(tiny_models["llama"] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        make_engine(tmp_path)


# -- dummy weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dummy_weights_are_seeded(
    tiny_models: dict[str, Path], tmp_path: Path, family: str
) -> None:
    shutil.copyfile(tiny_models[family] / "config.json", tmp_path / "config.json")
    first = make_engine(tmp_path, load_format="dummy", seed=1)
    same = make_engine(tmp_path, load_format="dummy", seed=1)
    other = make_engine(tmp_path, load_format="dummy", seed=2)
    params = dict(first.runner.model.named_parameters())
    same_params = dict(same.runner.model.named_parameters())
    other_params = dict(other.runner.model.named_parameters())
    norms = [n for n in params if n.endswith("norm.weight")]
    assert norms and all(bool((params[n] == 1).all()) for n in norms)
    assert all(bool((p == 0).all()) for n, p in params.items() if n.endswith(".bias"))
    for name, param in params.items():
        assert torch.equal(param, same_params[name]), name
    matrices = [n for n in params if params[n].dim() >= 2]
    assert all(not torch.equal(params[n], other_params[n]) for n in matrices)

    # Tokens and their log-probabilities: a tied model with near-zero dummy weights tends to
    # repeat its last token whatever the seed, but the distributions still differ.
    def run(engine: Engine) -> list[tuple[list[int], list[float]]]:
        params = replace(GREEDY, logprobs=True)
        return [
            (r.output_ids, [lp.logprob for lp in r.logprobs if lp is not None])
            for r in engine.generate(PROMPTS, params)
        ]

    outputs = run(first)
    assert run(same) == outputs
    assert run(other) != outputs


# -- tied embeddings --------------------------------------------------------------------------


def test_tied_embeddings_need_no_lm_head(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["qwen2"]
    assert "lm_head.weight" not in load_file(str(src / "model.safetensors"))
    engine = make_engine(src)
    assert engine.model_config.tie_word_embeddings and engine.runner.model.lm_head is None
    expected = [r.output_ids for r in engine.generate(PROMPTS, GREEDY)]

    def add_lm_head(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm_head.weight"] = torch.randn(512, 64)

    with_head = edited_checkpoint(src, tmp_path / "m", add_lm_head)
    assert greedy_tokens(with_head) == expected


def test_untied_model_needs_lm_head(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    broken = edited_checkpoint(
        tiny_models["llama"], tmp_path / "m", lambda t: t.pop("lm_head.weight")
    )
    with pytest.raises(ValueError, match="missing tensors") as info:
        make_engine(broken)
    assert "lm_head.weight" in str(info.value)


# -- config.json parsing ----------------------------------------------------------------------


def to_legacy(raw: dict[str, Any], type_key: str) -> dict[str, Any]:
    """The transformers 4 spelling of a transformers 5 config: `rope_theta` at the top level,
    the scaling in `rope_scaling` under `type_key`, and `num_local_experts` for the experts."""
    legacy = dict(raw)
    params = dict(legacy.pop("rope_parameters"))
    legacy["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    legacy["rope_scaling"] = None if rope_type == "default" else {type_key: rope_type, **params}
    if "num_experts" in legacy:
        legacy["num_local_experts"] = legacy.pop("num_experts")
    return legacy


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3-moe"])
def test_legacy_config_fields_parse_the_same(
    tiny_models: dict[str, Path], family: str, type_key: str
) -> None:
    raw = json.loads((tiny_models[family] / "config.json").read_text())
    legacy = to_legacy(raw, type_key)
    assert "rope_parameters" not in legacy
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(raw)


LLAMA_31 = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "eos_token_id": [128001, 128008, 128009],
}
LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
def test_llama31_legacy_rope_scaling(type_key: str) -> None:
    legacy = {
        **LLAMA_31,
        "rope_theta": 500000.0,
        "rope_scaling": {type_key: "llama3", **LLAMA3_SCALING},
    }
    v5 = {
        **LLAMA_31,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING},
    }
    config = ModelConfig.from_hf(legacy)
    assert config == ModelConfig.from_hf(v5)
    assert config.rope == RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        original_max_position_embeddings=8192,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
    )
    assert config.head_dim == 128 and config.eos_token_ids == (128001, 128008, 128009)


def test_moe_expert_count_field_names() -> None:
    base = {
        **LLAMA_31,
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "rope_theta": 1000000.0,
    }
    published = ModelConfig.from_hf({**base, "num_experts": 128})
    internal = ModelConfig.from_hf({**base, "num_local_experts": 128})
    assert published == internal
    assert published.num_experts == 128 and published.is_moe


@pytest.mark.parametrize(
    ("field", "value"),
    [("architectures", ["MistralForCausalLM"]), ("hidden_act", "gelu_pytorch_tanh")],
)
def test_unsupported_config_values_are_named(field: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        ModelConfig.from_hf({**LLAMA_31, field: value})
    shown = value[0] if isinstance(value, list) else value
    assert repr(shown) in str(info.value)


def test_unsupported_rope_type_is_named() -> None:
    raw = {**LLAMA_31, "rope_scaling": {"type": "longrope", "factor": 2.0}}
    with pytest.raises(ValueError, match="'longrope'"):
        ModelConfig.from_hf(raw)
