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
@pytest.mark.parametrize("short_prefill_tokens", [0, 256])
def test_batch_matches_transformers(
    tiny_models: dict[str, Path],
    family: str,
    page_size: int,
    chunked_prefill_size: int,
    short_prefill_tokens: int,
) -> None:
    """Greedy tokens of the whole batch; with `short_prefill_tokens` every prefill (all the
    prompts at once, or chunks of 8 from where the last one ended) runs as decode rows."""
    ref = reference(tiny_models[family])
    engine = make_engine(
        tiny_models[family],
        page_size=page_size,
        chunked_prefill_size=chunked_prefill_size,
        short_prefill_tokens=short_prefill_tokens,
    )
    as_decode = _count_as_decode(engine)
    results = engine.generate(ref.prompts, GREEDY)
    assert (as_decode[0] > 0) == (short_prefill_tokens > 0)
    assert [r.output_ids for r in results] == ref.tokens
    assert_pages_balance(engine)


def _count_as_decode(engine: Engine) -> list[int]:
    """A one-item list counting the engine's prefills run as decode rows."""
    count = [0]
    inner = engine.runner.runs_as_decode

    def counted(batch: object) -> bool:
        taken = inner(batch)  # type: ignore[arg-type]
        count[0] += taken
        return taken

    engine.runner.runs_as_decode = counted  # type: ignore[method-assign]
    return count


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("short_prefill_tokens", [0, 256])
def test_prefix_cache_hits_one_after_another(
    tiny_models: dict[str, Path], family: str, page_size: int, short_prefill_tokens: int
) -> None:
    ref = reference(tiny_models[family])
    engine = make_engine(
        tiny_models[family],
        page_size=page_size,
        chunked_prefill_size=8,
        short_prefill_tokens=short_prefill_tokens,
    )
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
@pytest.mark.parametrize(("page_size", "radix_cache"), [(1, True), (16, True), (16, False)])
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


def test_which_prefills_run_as_decode_rows(tiny_models: dict[str, Path]) -> None:
    """Up to `short_prefill_tokens` tokens while the rows' context reads stay within the
    budget; off by default without decode graphs (the CPU), and a bad setting is refused."""
    from engine.model_runner import SHORT_PREFILL_MAX_READS
    from engine.scheduler import ScheduledBatch

    assert make_engine(tiny_models["llama"]).runner.short_prefill_tokens == 0
    runner = make_engine(tiny_models["llama"], short_prefill_tokens=300).runner

    def runs(*spans: tuple[int, int]) -> bool:  # (first position, tokens) per sequence
        starts, lens = [s for s, _ in spans], [n for _, n in spans]
        batch = ScheduledBatch([None] * len(spans), lens, is_decode=False, starts=starts)  # type: ignore[list-item]
        return runner.runs_as_decode(batch)

    assert SHORT_PREFILL_MAX_READS == 256 * 257 // 2
    assert runs((0, 1)) and runs((0, 128)) and runs((0, 128), (0, 128)) and runs((0, 256))
    assert not runs((0, 257))  # 33,153 reads
    assert runs((4096, 8)) and not runs((4096, 9))  # a long cached prefix: 8 rows of it
    assert not runs((0, 100), (0, 100), (0, 101))  # 301 tokens
    with pytest.raises(ValueError, match="short_prefill_tokens"):
        EngineConfig(model_path=str(tiny_models["llama"]), short_prefill_tokens=-2)
