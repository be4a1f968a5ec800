"""Prefills through CUDA graphs captured in pieces (engine/piecewise_graph.py) on a GPU: the
same greedy tokens and log-probabilities as the eager prefill, for every tiny family, in one
batch, in chunks that continue a prompt, and over prefix-cache hits; the pages balance after.
Skipped without CUDA.

    PYTHONPATH=. python -m pytest -q tests/gpu/test_piecewise_graph.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.piecewise_graph import _unowned
from engine.sampling import SamplingParams
from tests.engine.reference import MAX_NEW_TOKENS, make_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3-moe", "deepseek-v3")
PARAMS = SamplingParams(
    temperature=0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, top_logprobs=5
)


def make_engine(path: Path, pieces: bool, **kwargs: object) -> Engine:
    return Engine(
        EngineConfig(
            model_path=str(path),
            num_pages=512,
            page_size=16,
            device="cuda",
            dtype="float32",
            attention_backend="triton",
            cuda_graph_max_bs=8,
            short_prefill_tokens=0,  # every prefill through the pieces, none as decode rows
            disable_piecewise_cuda_graph=not pieces,
            piecewise_cuda_graph_max_tokens=512,
            **kwargs,  # type: ignore[arg-type]
        )
    )


def prompts(vocab: int) -> list[list[int]]:
    """The reference prompts, and longer ones that share their first 40 tokens (prefix hits
    past a bucket's padding) and one past the largest bucket (eager)."""
    base = make_prompts(vocab)
    g = torch.Generator().manual_seed(7)
    long = torch.randint(3, vocab, (600,), generator=g).tolist()
    return [*base, long[:300], long[:40] + long[300:420], long]


def run(engine: Engine, batch: list[list[int]], one_by_one: bool) -> list[tuple[list[int], list]]:
    results = (
        [r for p in batch for r in engine.generate([p], PARAMS)]
        if one_by_one
        else engine.generate(batch, PARAMS)
    )
    return [(r.output_ids, r.logprobs) for r in results]


def assert_same(ours: list, eager: list) -> None:
    for (ids, lps), (ref_ids, ref_lps) in zip(ours, eager, strict=True):
        assert ids == ref_ids
        for lp, ref in zip(lps, ref_lps, strict=True):
            assert abs(lp.logprob - ref.logprob) < 1e-4
            for (a, v), (b, w) in zip(lp.top, ref.top, strict=True):
                assert a == b and abs(v - w) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [-1, 24])
def test_pieces_match_eager(tiny_models: dict[str, Path], family: str, chunk: int) -> None:
    path = tiny_models[family]
    eager = make_engine(path, pieces=False, chunked_prefill_size=chunk)
    assert eager.runner.pieces is None
    batch = prompts(eager.model_config.vocab_size)
    expected = {mode: run(eager, batch, mode) for mode in (False, True)}
    del eager
    engine = make_engine(path, pieces=True, chunked_prefill_size=chunk)
    pieces = engine.runner.pieces
    assert pieces is not None and pieces.max_tokens == 512
    for one_by_one in (False, True):  # one by one: the shared 40 tokens hit the cache
        assert_same(run(engine, batch, one_by_one), expected[one_by_one])
    assert pieces.runs > 0
    assert engine.cache is not None and engine.cache.hit_tokens > 0
    assert not engine.has_unfinished()
    engine.flush_cache()
    assert engine.pool.num_free == engine.pool.num_pages


@pytest.mark.parametrize("family", ["llama", "deepseek-v3"])
def test_a_context_shorter_than_the_buckets(tiny_models: dict[str, Path], family: str) -> None:
    """`--context-length` below the largest bucket (the capture's padding batch is several
    sequences then): the start captures every bucket, and a batch of prompts longer together
    than one context runs in pieces with the eager prefill's tokens."""
    path = tiny_models[family]
    eager = make_engine(path, pieces=False, context_length=64)
    batch = make_prompts(eager.model_config.vocab_size)
    expected = run(eager, batch, False)
    del eager
    engine = make_engine(path, pieces=True, context_length=64)
    pieces = engine.runner.pieces
    assert pieces is not None and pieces.max_tokens == 512
    assert_same(run(engine, batch, False), expected)
    assert pieces.runs > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_unowned_views_alias(dtype: torch.dtype) -> None:
    base = torch.zeros(6, 10, dtype=dtype, device="cuda")
    view = base[1:5, 2:7]
    alias = _unowned(view)
    assert alias.shape == view.shape and alias.stride() == view.stride()
    assert alias.dtype == dtype and alias.data_ptr() == view.data_ptr()
    base += 3
    assert torch.equal(alias, view)
    alias[0, 0] = 5
    assert base[1, 2] == 5
