"""SamplingParams validation, the sampler on hand-made logits, and sampling through the engine."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampler import _filter, sample, to_device
from engine.sampling import SamplingParams
from engine.sequence import FinishReason

# -- SamplingParams validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("temperature", -0.5, "-0.5"),
        ("temperature", math.nan, "nan"),
        ("temperature", math.inf, "inf"),
        ("top_p", 0.0, "0.0"),
        ("top_p", 1.5, "1.5"),
        ("top_p", math.nan, "nan"),
        ("top_k", -2, "-2"),
        ("min_p", 1.5, "1.5"),
        ("min_p", -0.1, "-0.1"),
        ("max_new_tokens", 0, "0"),
        ("top_logprobs", 21, "21"),
        ("top_logprobs", -1, "-1"),
        ("stop_token_ids", (5, -3), "-3"),
    ],
)
def test_invalid_sampling_params_are_named(field: str, value: Any, shown: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert str(info.value).endswith(shown) or f"[{shown}]" in str(info.value)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_out_of_range_seed_is_named(seed: int) -> None:
    with pytest.raises(ValueError, match="seed") as info:
        SamplingParams(seed=seed)
    assert str(seed) in str(info.value)


def test_valid_edges_are_accepted() -> None:
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=1.0, top_logprobs=20)
    params = SamplingParams(top_k=-1, stop_token_ids=[0, 7])  # type: ignore[arg-type]
    assert params.stop_token_ids == (0, 7)
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.5).greedy


# -- the sampler on hand-made logits --------------------------------------------------------


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_top_k_never_leaves_the_top_k() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=gen).repeat(2000, 1)
    top2 = set(logits[0].topk(2).indices.tolist())
    params = [SamplingParams(top_k=2)] * 2000
    picks = sample(logits, params, [None] * 2000, gen).token_ids
    assert set(picks) == top2  # both appear in 2000 draws, nothing else does

    probs = _filter(logits[:1], params[:1])[0]
    assert set(probs.nonzero()[:, 0].tolist()) == top2
    assert probs.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.45, [0]), (0.6, [0, 1]), (0.79, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2])],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: list[int]) -> None:
    base = [0.5, 0.3, 0.2]
    probs = _filter(logits_of(base), [SamplingParams(top_p=top_p)])[0]
    total = sum(base[i] for i in kept)
    expected = [base[i] / total if i in kept else 0.0 for i in range(3)]
    torch.testing.assert_close(probs, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_top_p_order_does_not_matter() -> None:
    probs = _filter(logits_of([0.2, 0.5, 0.3]), [SamplingParams(top_p=0.6)])[0]
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.625, 0.375]), rtol=1e-5, atol=1e-6)


def test_min_p_drops_tokens_below_min_p_times_max() -> None:
    base = logits_of([0.05, 0.5, 0.15, 0.3])
    probs = _filter(base, [SamplingParams(min_p=0.4)])[0]  # threshold 0.2
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.625, 0.0, 0.375]), rtol=1e-5, atol=1e-6)
    probs = _filter(base, [SamplingParams(min_p=0.25)])[0]  # threshold 0.125
    torch.testing.assert_close(
        probs, torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95, rtol=1e-5, atol=1e-6
    )


def test_filters_apply_per_row() -> None:
    base = logits_of([0.5, 0.3, 0.15, 0.05]).repeat(4, 1)
    params = [
        SamplingParams(),
        SamplingParams(top_k=1, temperature=1.0),
        SamplingParams(top_p=0.6),
        SamplingParams(min_p=0.5),
    ]
    probs = _filter(base, params)
    kept = [(row > 0).nonzero()[:, 0].tolist() for row in probs]
    assert kept == [[0, 1, 2, 3], [0], [0, 1], [0, 1]]


def test_temperature_sharpens_and_flattens() -> None:
    base = logits_of([0.5, 0.3, 0.2])
    cold = _filter(base, [SamplingParams(temperature=0.5)])[0]
    hot = _filter(base, [SamplingParams(temperature=2.0)])[0]
    expected_cold = torch.tensor([0.25, 0.09, 0.04]) / 0.38  # p ** 2, renormalised
    torch.testing.assert_close(cold, expected_cold, rtol=1e-5, atol=1e-6)
    assert hot[0] < 0.5 < cold[0]


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0)]
    result = sample(logits, params, [None] * 3)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None, None, None]


def test_bfloat16_logits_sample_as_their_float32_widening() -> None:
    """The LM head's bfloat16 logits: an all-greedy batch reads them as they are, anything else
    widens them first; either way tokens and log-probabilities equal those of the float32
    widening (ties from bfloat16 rounding included: the first maximum wins)."""
    wide = torch.randn(4, 300, generator=torch.Generator().manual_seed(5)) * 4
    half = wide.to(torch.bfloat16)
    half[1, 7] = half[1, 200] = half[1].max() + 1  # an exact tie: index 7 wins
    widened = half.float()
    greedy = [SamplingParams(temperature=0)] * 4
    got = sample(half, greedy, [None] * 4)
    assert got.token_ids == widened.argmax(dim=-1).tolist() and got.token_ids[1] == 7
    mixed = [
        SamplingParams(temperature=0, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2, top_k=5, seed=2),
    ]
    gens = [None, torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2)]
    want = sample(widened, mixed, gens)
    gens = [None, torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2)]
    assert sample(half, mixed, gens) == want


def test_seeded_row_ignores_the_rest_of_the_batch() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.5)] * 4
    alone = sample(logits[2:3], params[:1], [torch.Generator().manual_seed(9)])
    gens = [None, torch.Generator().manual_seed(3), torch.Generator().manual_seed(9), None]
    batch = sample(logits, params, gens, torch.Generator().manual_seed(4))
    assert batch.token_ids[2] == alone.token_ids[0]


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)) * 3
    params = [
        SamplingParams(temperature=0.7, top_k=5, logprobs=True, top_logprobs=4),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, top_logprobs=7),
    ]
    result = sample(logits, params, [torch.Generator().manual_seed(0), None, None])
    logp = torch.log_softmax(logits, dim=-1)
    assert result.logprobs[1] is None
    for row, n in ((0, 4), (2, 7)):
        lp = result.logprobs[row]
        assert lp is not None
        token = result.token_ids[row]
        # Under the model's distribution, not the temperature-scaled or filtered one.
        assert lp.logprob == pytest.approx(logp[row, token].item(), abs=1e-5)
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        expected = logp[row].topk(n)
        assert [t for t, _ in lp.top] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert result.token_ids[2] == result.logprobs[2].top[0][0]  # type: ignore[union-attr]


# -- sampling through the engine ------------------------------------------------------------

PROMPTS = [
    [5, 17, 200, 31],
    [400, 3, 3, 9, 77, 120, 8, 64, 99, 250, 11],
    [42],
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314, 315, 316, 317],
]
GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)


def make_engine(model_dir: Path, **kwargs: Any) -> Engine:
    settings: dict[str, Any] = {"num_pages": 128, "page_size": 16, **kwargs}
    return Engine(EngineConfig(model_path=str(model_dir), **settings))


def seeded(seed: int | None, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_new_tokens=12, ignore_eos=True, **kwargs)


def test_seed_is_independent_of_the_batch(tiny_models: dict[str, Path]) -> None:
    prompt = PROMPTS[3]
    alone = make_engine(tiny_models["llama"]).generate([prompt], seeded(1234))[0].output_ids
    engine = make_engine(tiny_models["llama"])
    prompts = [PROMPTS[0], prompt, PROMPTS[1], PROMPTS[2], prompt]
    params = [seeded(None), seeded(1234), seeded(99), GREEDY, seeded(1234)]
    results = engine.generate(prompts, params)
    assert results[1].output_ids == alone
    assert results[4].output_ids == alone  # same prompt, same seed, in the same batch
    # Again on the same engine, where the prompt now hits the prefix cache.
    again = engine.generate([PROMPTS[2], prompt], [seeded(None), seeded(1234)])
    assert again[1].output_ids == alone


def test_seed_is_independent_of_prefill_chunking(tiny_models: dict[str, Path]) -> None:
    prompt = PROMPTS[3]  # 18 tokens: chunks of 8, 8, 2 alone; 4, 8, 6 behind a 4-token prompt
    alone = make_engine(tiny_models["llama"]).generate([prompt], seeded(1234))[0].output_ids
    engine = make_engine(tiny_models["llama"], chunked_prefill_size=8)
    assert engine.generate([prompt], seeded(1234))[0].output_ids == alone
    batched = engine.generate([PROMPTS[0], prompt], [seeded(None), seeded(1234)])
    assert batched[1].output_ids == alone


def test_different_seeds_differ(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"])
    first = [r.output_ids for r in engine.generate(PROMPTS, seeded(1))]
    second = [r.output_ids for r in engine.generate(PROMPTS, seeded(2))]
    assert first != second
    assert [r.output_ids for r in engine.generate(PROMPTS, seeded(1))] == first


def test_top_k_one_is_greedy(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["qwen3"])
    greedy = [r.output_ids for r in engine.generate(PROMPTS, GREEDY)]
    top1 = replace(GREEDY, temperature=1.0, top_k=1)
    assert [r.output_ids for r in engine.generate(PROMPTS, top1)] == greedy


def test_stop_token_ends_the_request(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"])
    (full,) = engine.generate([PROMPTS[1]], GREEDY)
    # The first output token that did not occur before it, past the first position.
    index = next(i for i in range(2, 10) if full.output_ids[i] not in full.output_ids[:i])
    stop = full.output_ids[index]
    unused = next(t for t in range(3, 512) if t not in full.output_ids)
    (result,) = engine.generate([PROMPTS[1]], replace(GREEDY, stop_token_ids=(unused, stop)))
    assert result.finish_reason is FinishReason.STOP
    assert result.output_ids == full.output_ids[: index + 1]
    assert result.output_ids[-1] == stop
    assert not engine.has_unfinished()
    assert engine.num_free_pages == engine.pool.num_pages


def test_max_new_tokens_gives_length(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["qwen2"])
    for n in (1, 2, 7):
        results = engine.generate(PROMPTS, replace(GREEDY, max_new_tokens=n))
        assert all(len(r.output_ids) == n for r in results)
        assert all(r.finish_reason is FinishReason.LENGTH for r in results)


def test_eos_stops_unless_ignored(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["llama"]
    (full,) = make_engine(src).generate([PROMPTS[1]], GREEDY)
    index = next(i for i in range(2, 10) if full.output_ids[i] not in full.output_ids[:i])
    eos = full.output_ids[index]
    # The same model, with that token declared as its EOS (and no tokenizer to add others).
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    shutil.copyfile(src / "model.safetensors", tmp_path / "model.safetensors")
    engine = make_engine(tmp_path)
    assert engine.eos_token_ids == {eos}

    (stopped,) = engine.generate([PROMPTS[1]], replace(GREEDY, ignore_eos=False))
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.output_ids == full.output_ids[: index + 1]
    (ignored,) = engine.generate([PROMPTS[1]], GREEDY)
    assert ignored.finish_reason is FinishReason.LENGTH
    assert ignored.output_ids == full.output_ids


def test_small_lists_reach_the_device_as_float_rows_or_int_indices() -> None:
    rows = to_device([[0.5, 1.0], [40.0, 7.0]], torch.device("cpu"))
    assert rows.dtype == torch.float32 and rows.tolist() == [[0.5, 1.0], [40.0, 7.0]]
    idx = to_device([3, 1], torch.device("cpu"))
    assert idx.dtype == torch.int64 and idx.tolist() == [3, 1]
