"""Greedy tokens and logits of the engine against transformers, in every scheduling mode."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.engine.reference import MAX_NEW_TOKENS, reference

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3-moe", "deepseek-v3")
GREEDY = SamplingParams(temperature=0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def make_engine(model_dir: Path, **kwargs: object) -> Engine:
    settings: dict = {"num_pages": 256, "page_size": 16, **kwargs}
    return Engine(EngineConfig(model_path=str(model_dir), **settings))


def assert_pages_balance(engine: Engine) -> None:
    """Every page is free or held only by the prefix cache, and flushing frees them all."""
    assert not engine.has_unfinished()
    assert engine.num_free_pages == engine.pool.num_pages
    engine.flush_cache()
    assert engine.pool.num_free == engine.pool.num_pages


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("chunked_prefill_size", [-1, 8])
def test_batch_matches_transformers(
    tiny_models: dict[str, Path], family: str, page_size: int, chunked_prefill_size: int
) -> None:
    ref = reference(tiny_models[family])
    engine = make_engine(
        tiny_models[family], page_size=page_size, chunked_prefill_size=chunked_prefill_size
    )
    results = engine.generate(ref.prompts, GREEDY)
    assert [r.output_ids for r in results] == ref.tokens
    assert_pages_balance(engine)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_prefix_cache_hits_one_after_another(
    tiny_models: dict[str, Path], family: str, page_size: int
) -> None:
    ref = reference(tiny_models[family])
    engine = make_engine(tiny_models[family], page_size=page_size, chunked_prefill_size=8)
    cached = []
    for prompt, expected in zip(ref.prompts, ref.tokens, strict=True):
        (result,) = engine.generate([prompt], GREEDY)
        assert result.output_ids == expected
        cached.append(result.num_cached_tokens)
    # The last three prompts share 24 tokens: the second and third find them cached.
    assert cached[-2] >= 16 and cached[-1] >= 16, cached
    # Re-running everything hits the cache for all but the last token of each prompt.
    again = engine.generate(ref.prompts, GREEDY)
    assert [r.output_ids for r in again] == ref.tokens
    assert engine.cache is not None and engine.cache.hit_tokens > 0
    assert_pages_balance(engine)


@pytest.mark.parametrize("family", ["llama", "qwen3-moe", "deepseek-v3"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("radix_cache", [True, False])
def test_preemption_recomputes_exactly(
    tiny_models: dict[str, Path], family: str, page_size: int, radix_cache: bool
) -> None:
    max_new = 40
    ref = reference(tiny_models[family], max_new)
    # Room for the longest request alone, far too little for the whole batch.
    longest = max(len(p) for p in ref.prompts) + max_new
    engine = make_engine(
        tiny_models[family],
        page_size=page_size,
        num_pages=-(-longest // page_size),
        disable_radix_cache=not radix_cache,
    )
    results = engine.generate(ref.prompts, replace(GREEDY, max_new_tokens=max_new))
    assert engine.scheduler.num_preemptions > 0
    assert [r.output_ids for r in results] == ref.tokens
    assert_pages_balance(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_models: dict[str, Path], family: str) -> None:
    ref = reference(tiny_models[family])
    engine = make_engine(tiny_models[family], page_size=4, chunked_prefill_size=8)
    params = SamplingParams(
        temperature=0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, top_logprobs=5
    )
    results = engine.generate(ref.prompts, params)
    for result, ref_logits in zip(results, ref.logits, strict=True):
        ref_logp = torch.log_softmax(ref_logits, dim=-1)
        for step, lp in enumerate(result.logprobs):
            assert lp is not None
            token = result.output_ids[step]
            assert abs(lp.logprob - ref_logp[step, token].item()) < 1e-4
            for alt, value in lp.top:
                assert abs(value - ref_logp[step, alt].item()) < 1e-4
    # Raw logits of one prefill step, straight from the model runner.
    prompt = ref.prompts[3]
    engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=1))
    batch = engine.scheduler.schedule()
    assert batch is not None
    logits = engine.runner.forward(batch)[0]
    torch.testing.assert_close(logits, ref.logits[3][0], atol=1e-4, rtol=0)
    engine.abort(batch.seqs[0].request_id)
    assert_pages_balance(engine)


def test_prefill_rows_come_from_the_prompt_array(tiny_models: dict[str, Path]) -> None:
    """A prefill step's input ids come from the prompt's int64 array (made when the request
    arrives), chunk by chunk, and equal the list's; a sequence without one (None) takes the
    list. Positions follow the chunk."""
    prompt = [(7 * i + 3) % 500 for i in range(21)]
    engine = make_engine(tiny_models["llama"], page_size=4, chunked_prefill_size=8)
    engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=1))
    seen: list[int] = []
    while len(seen) < len(prompt):
        batch = engine.scheduler.schedule()
        assert batch is not None
        (seq,) = batch.seqs
        assert seq.prompt_array is not None and seq.prompt_array.tolist() == prompt
        start = seq.num_computed_tokens
        fb = engine.runner.prepare(batch)
        ids = fb.input_ids.tolist()
        assert fb.positions.tolist() == list(range(start, start + len(ids)))
        array, seq.prompt_array = seq.prompt_array, None
        assert engine.runner.prepare(batch).input_ids.tolist() == ids  # the list's
        seq.prompt_array = array
        seen += ids
        engine.scheduler.postprocess(batch, engine._launch(batch).sample.result())
    assert seen == prompt
    assert_pages_balance(engine)
