"""The persistent decode path (`engine.layers.persistent`, off by default) in the engine: with
it on, every batch-1 decode step of a Llama-family model runs one persistent launch a layer
(`engine.kernels.persistent_layer`, checked bit for bit against the kernels it replaces in
tests/bench/test_persistent_layer.py), and the greedy tokens stay transformers'. Under the
interpreter here; `bash bench/gpu/session.sh b3` runs the GPU's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kernels import persistent_layer as kernel
from engine.layers import persistent
from engine.sampling import SamplingParams
from tests.engine.greedy import assert_greedy_matches
from tests.engine.reference import Reference, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEAR_TIE = 1e-4 if DEVICE == "cuda" else 0.0


# A dense family (the MLP after the launch) and the MoE one (the whole layer in it).
@pytest.mark.parametrize(("family", "page_size"), [("qwen3", 16), ("qwen3-moe", 1)])
def test_persistent_decode_keeps_transformers_tokens(
    tiny_models: dict[str, Path], family: str, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    launches: list[bool] = []  # per launch: whether it ran the layer's MoE half
    decode_layer = kernel.decode_layer

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        experts = args[6] if len(args) > 6 else kwargs.get("experts")
        launches.append(experts is not None)
        return decode_layer(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(persistent, "PERSISTENT_DECODE", True)
    monkeypatch.setattr(kernel, "decode_layer", counted)
    ref = reference(tiny_models[family], device=DEVICE)
    # Two prompts one at a time (batch-1 decode steps), six tokens each.
    n = 6
    few = Reference(
        ref.prompts[:2], [t[:n] for t in ref.tokens[:2]], [x[:n] for x in ref.logits[:2]]
    )
    config = EngineConfig(
        model_path=str(tiny_models[family]), num_pages=256, page_size=page_size,
        attention_backend="triton", moe_backend="triton", dtype="float32",
    )  # fmt: skip
    engine = Engine(config)
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    results = [engine.generate([p], params)[0] for p in few.prompts]
    assert_greedy_matches([r.output_ids for r in results], few, NEAR_TIE)
    config_of = engine.runner.model.config
    moe_layers = [config_of.is_moe_layer(i) for i in range(config_of.num_layers)]
    # Every decode step (n - 1 a prompt: the first token comes from the prefill) took it, a
    # launch a layer, with the MoE half where the layer has experts (the tiny Qwen3-MoE's
    # first layer is dense, as in some checkpoints: its MLP runs after the launch).
    assert launches == moe_layers * (2 * (n - 1))
    assert any(launches) == (family == "qwen3-moe")
    assert engine.num_free_pages == engine.pool.num_pages


def test_a_model_it_cannot_run_says_why(tiny_models: dict[str, Path]) -> None:
    # Qwen2's QKV has a bias: the layers' own path, and the reason on record.
    config = EngineConfig(
        model_path=str(tiny_models["qwen2"]), num_pages=64, attention_backend="triton",
        dtype="float32",
    )  # fmt: skip
    found = persistent.plan(Engine(config).runner.model)  # type: ignore[arg-type]
    assert found == "QKV or O has a bias"
