"""Expert parallelism over NCCL, one GPU a rank: the tiny MoE checkpoints' greedy tokens at EP 2
(and 4 where the host has four GPUs) equal EP 1's on the same GPU and transformers', and every
KV page comes back; one rank (its group over NCCL too) equals transformers on one GPU. Skipped
with fewer GPUs than ranks; the CPU runs the same driver over gloo
(`tests/engine/test_expert_parallel.py`).

    PYTHONPATH=. python -m pytest -q tests/gpu/test_expert_parallel_nccl.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.ep_driver import run_expert_parallel
from tests.engine.reference import reference
from tests.engine.test_expert_parallel import GREEDY, assert_pages_balance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# float32, as the reference: the same tokens, not merely close ones.
CUDA: dict[str, Any] = {"num_pages": 256, "page_size": 16, "dtype": "float32", "device": "cuda"}


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
def test_one_rank_through_the_driver_matches_transformers(
    tiny_models: dict[str, Path], family: str
) -> None:
    ref = reference(tiny_models[family])
    one = run_expert_parallel(tiny_models[family], 1, ref.prompts, GREEDY, **CUDA)
    assert one["tokens"] == ref.tokens
    assert_pages_balance(one)


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_over_nccl_matches_one_rank(
    tiny_models: dict[str, Path], family: str, world: int
) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    ref = reference(tiny_models[family])
    one = run_expert_parallel(tiny_models[family], 1, ref.prompts, GREEDY, **CUDA)
    many = run_expert_parallel(tiny_models[family], world, ref.prompts, GREEDY, **CUDA)
    assert many["tokens"] == one["tokens"]
    assert one["tokens"] == ref.tokens
    assert_pages_balance(many)


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
def test_a_step_on_no_tokens_runs_on_the_gpu(tiny_models: dict[str, Path], family: str) -> None:
    """What an idle rank runs to join its MoE collectives (`ModelRunner.forward_idle`): the
    GPU's kernels (Triton attention and MoE, graphs) on no tokens, before and between real
    steps, leave the tokens and the pages as they were."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    ref = reference(tiny_models[family])
    engine = Engine(EngineConfig(model_path=str(tiny_models[family]), **CUDA))
    engine.runner.forward_idle()
    first = engine.generate(ref.prompts[:3], GREEDY)
    engine.runner.forward_idle()
    rest = engine.generate(ref.prompts[3:], GREEDY)
    assert [r.output_ids for r in first + rest] == ref.tokens
    assert engine.num_free_pages == engine.pool.num_pages
