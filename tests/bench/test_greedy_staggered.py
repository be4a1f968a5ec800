"""bench/gpu/greedy_gpu.py's staggered arrivals on the CPU: the same greedy tokens as one
batch, through prefills launched ahead and chunked prompts."""

from __future__ import annotations

from pathlib import Path

from bench.gpu.greedy_gpu import GREEDY, staggered
from engine.config import EngineConfig
from engine.engine import Engine
from tests.engine.reference import make_prompts


def test_staggered_arrivals_give_the_batch_tokens(tiny_models: dict[str, Path]) -> None:
    def make(step_tokens: int) -> Engine:
        return Engine(EngineConfig(model_path=str(tiny_models["qwen3-moe"]), num_pages=256,
                                   page_size=16, chunked_prefill_size=step_tokens))  # fmt: skip

    eng = make(8192)
    prompts = make_prompts(eng.model_config.vocab_size)
    want = [r.output_ids for r in eng.generate(prompts, GREEDY)]
    eng = make(16)
    assert staggered(eng, prompts) == want
    assert eng.num_free_pages == eng.pool.num_pages
