"""Requests the engine must refuse, with a message naming the bad value and the limit, and
after which it must keep serving with every page accounted for."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.sequence import FinishReason, SeqStatus

GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 2048


def make_engine(model_dir: Path, **kwargs: Any) -> Engine:
    settings: dict[str, Any] = {"num_pages": 128, "page_size": 16, **kwargs}
    return Engine(EngineConfig(model_path=str(model_dir), **settings))


def assert_still_serves(engine: Engine) -> None:
    """Nothing was left queued, a normal request runs, and every page is back."""
    assert not engine.has_unfinished()
    assert engine.num_free_pages == engine.pool.num_pages
    (result,) = engine.generate([[5, 6, 7, 8]], replace(GREEDY, max_new_tokens=3))
    assert len(result.output_ids) == 3 and result.finish_reason is FinishReason.LENGTH
    assert not engine.has_unfinished()
    assert engine.num_free_pages == engine.pool.num_pages


def run_steps(engine: Engine) -> tuple[dict[str, list[int]], dict[str, FinishReason | None]]:
    """Step until idle; each request's streamed tokens and final finish reason."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, FinishReason | None] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return tokens, reasons


@pytest.fixture
def llama(tiny_models: dict[str, Path]) -> Engine:
    return make_engine(tiny_models["llama"])


# -- refused requests -----------------------------------------------------------------------


def test_empty_prompt(llama: Engine) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        llama.add_request([], GREEDY)
    assert_still_serves(llama)


@pytest.mark.parametrize("bad", [VOCAB_SIZE, -1, VOCAB_SIZE + 1000])
def test_prompt_token_outside_vocab(llama: Engine, bad: int) -> None:
    with pytest.raises(ValueError, match="prompt") as info:
        llama.add_request([5, bad, 6], GREEDY)
    message = str(info.value)
    assert f"[{bad}]" in message and f"[0, {VOCAB_SIZE})" in message
    assert_still_serves(llama)


def test_prompt_filling_the_context(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"], context_length=64)
    with pytest.raises(ValueError) as info:
        engine.add_request(list(range(3, 67)), GREEDY)
    assert re.search(r"\b64 tokens\b.*context length is 64\b", str(info.value))
    # One token shorter fits, and leaves room for exactly one output token.
    (result,) = engine.generate([list(range(3, 66))], GREEDY)
    assert len(result.output_ids) == 1 and result.finish_reason is FinishReason.LENGTH
    assert_still_serves(engine)


def test_context_length_beyond_the_model(tiny_models: dict[str, Path]) -> None:
    too_long = MAX_POSITION_EMBEDDINGS + 1
    with pytest.raises(ValueError) as info:
        make_engine(tiny_models["llama"], context_length=too_long)
    message = str(info.value)
    assert str(too_long) in message and str(MAX_POSITION_EMBEDDINGS) in message
    # The model's own limit is accepted.
    engine = make_engine(tiny_models["llama"], context_length=MAX_POSITION_EMBEDDINGS)
    assert engine.context_length == MAX_POSITION_EMBEDDINGS
    assert_still_serves(engine)


def test_request_larger_than_the_pool(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"], num_pages=4)  # 64 tokens in all
    with pytest.raises(ValueError) as info:
        engine.add_request(list(range(3, 13)), replace(GREEDY, max_new_tokens=100))
    message = str(info.value)
    # 10 prompt + 100 new = 110 tokens = 7 pages of 16, against a pool of 4.
    assert "110 tokens" in message and "7 pages" in message and "only 4 pages" in message
    # Exactly the pool's size is accepted.
    (result,) = engine.generate([list(range(3, 13))], replace(GREEDY, max_new_tokens=54))
    assert len(result.output_ids) == 54
    assert_still_serves(engine)


@pytest.mark.parametrize("bad", [VOCAB_SIZE, -1])
def test_stop_token_outside_vocab(llama: Engine, bad: int) -> None:
    if bad < 0:
        with pytest.raises(ValueError, match=r"stop_token_ids.*\[-1\]"):
            SamplingParams(stop_token_ids=(bad,))
    else:
        with pytest.raises(ValueError, match="stop_token_ids") as info:
            llama.add_request([5, 6], SamplingParams(stop_token_ids=(7, bad)))
        assert f"[{bad}]" in str(info.value) and f"[0, {VOCAB_SIZE})" in str(info.value)
    assert_still_serves(llama)


def test_text_prompt_without_tokenizer(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_models["llama"] / name, tmp_path / name)
    engine = make_engine(tmp_path)
    assert engine.tokenizer is None
    with pytest.raises(ValueError, match=r"tokenizer\.json") as info:
        engine.add_request("Hello", GREEDY)
    assert str(tmp_path) in str(info.value)
    assert_still_serves(engine)


def test_duplicate_request_id(llama: Engine) -> None:
    llama.add_request([5, 6, 7], GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="'dup'"):
        llama.add_request([9, 10], GREEDY, request_id="dup")
    tokens, reasons = run_steps(llama)
    assert list(tokens) == ["dup"] and len(tokens["dup"]) == GREEDY.max_new_tokens
    assert reasons == {"dup": FinishReason.LENGTH}
    assert_still_serves(llama)


def test_refused_prompt_in_generate_leaves_nothing_queued(llama: Engine) -> None:
    with pytest.raises(ValueError, match=rf"\[{VOCAB_SIZE}\]"):
        llama.generate([[5, 6, 7], [8, VOCAB_SIZE]], GREEDY)
    assert_still_serves(llama)


def test_generated_ids_avoid_caller_ids(llama: Engine) -> None:
    llama.add_request([5, 6, 7], GREEDY, request_id="req-1")
    ids = {llama.add_request([5, 6, 7], GREEDY) for _ in range(3)}
    assert len(ids) == 3 and "req-1" not in ids
    run_steps(llama)
    assert_still_serves(llama)


def test_tiny_temperature_is_greedy_or_refused(llama: Engine) -> None:
    prompt = [5, 17, 200, 31]
    (greedy,) = llama.generate([prompt], GREEDY)
    try:
        tiny = replace(GREEDY, temperature=1e-40)
        (result,) = llama.generate([prompt], tiny)
    except ValueError as exc:
        assert "1e-40" in str(exc)
    else:
        assert result.output_ids == greedy.output_ids
    assert_still_serves(llama)


# -- limits reached while generating --------------------------------------------------------


def test_generation_stops_at_the_context_length(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"], context_length=40)
    prompt = list(range(100, 130))
    (result,) = engine.generate([prompt], replace(GREEDY, max_new_tokens=100))
    assert result.finish_reason is FinishReason.LENGTH
    assert len(result.output_ids) == 10
    assert len(prompt) + len(result.output_ids) == engine.context_length
    assert_still_serves(engine)


# -- aborts ---------------------------------------------------------------------------------


def test_abort_of_an_unknown_or_finished_request(llama: Engine) -> None:
    assert llama.abort("no-such-request") is False
    (result,) = llama.generate([[5, 6, 7]], GREEDY)
    assert llama.abort(result.request_id) is False
    assert_still_serves(llama)


PROMPTS = {
    "a": [5, 17, 200, 31, 8, 8, 90],
    "b": list(range(200, 237)),
    "c": [400, 3, 3, 9, 77, 120, 8, 64, 99, 250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
}


@pytest.mark.parametrize("chunked_prefill_size", [-1, 8])
@pytest.mark.parametrize("victim", ["a", "b", "c"])
def test_abort_mid_generation(
    tiny_models: dict[str, Path], victim: str, chunked_prefill_size: int
) -> None:
    """Unchunked, all three are decoding when one is aborted; with 8-token chunks "a" has
    its first token, "b" is mid-prefill (holding pages while it waits) and "c" has not started."""
    params = replace(GREEDY, max_new_tokens=12)
    engine = make_engine(tiny_models["llama"], chunked_prefill_size=chunked_prefill_size)
    for rid, prompt in PROMPTS.items():
        engine.add_request(prompt, params, request_id=rid)
    streamed: dict[str, list[int]] = {}
    for _ in range(2):
        for out in engine.step():
            streamed.setdefault(out.request_id, []).append(out.token_id)
    seq = engine.scheduler.requests[victim]
    if chunked_prefill_size == -1:
        assert seq.status is SeqStatus.RUNNING
    else:
        state = (seq.status, seq.num_computed_tokens, len(seq.page_table) > 0)
        assert (
            state
            == {
                "a": (SeqStatus.RUNNING, 7, True),
                "b": (SeqStatus.WAITING, 9, True),
                "c": (SeqStatus.WAITING, 0, False),
            }[victim]
        )
    assert engine.abort(victim) is True
    assert engine.abort(victim) is False
    tokens, reasons = run_steps(engine)
    assert victim not in tokens and victim not in reasons
    for rid, more in tokens.items():
        streamed.setdefault(rid, []).extend(more)
    assert engine.num_free_pages == engine.pool.num_pages

    survivors = [rid for rid in PROMPTS if rid != victim]
    expected = make_engine(tiny_models["llama"]).generate([PROMPTS[r] for r in survivors], params)
    for rid, result in zip(survivors, expected, strict=True):
        assert streamed[rid] == result.output_ids, rid
        assert reasons[rid] is FinishReason.LENGTH
    engine.flush_cache()
    assert engine.pool.num_free == engine.pool.num_pages
    assert_still_serves(engine)
