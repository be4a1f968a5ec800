"""``ChoiceDecoder``: worker events to text deltas, streamed or decoded once at the end."""

from __future__ import annotations

import random

from engine.tokenizer import Tokenizer
from router.app.choice import ChoiceDecoder, ChoiceDelta, ChoiceSpec
from router.app.requests import Sampling, sampling_to_proto
from router.client.session import Finished, TokenChunk, TokenLogprob, WorkerEvent, WorkerRequest

TEXT = "emoji 🚀🤖 and CJK 批处理, héllo wörld: the KV cache stores keys and values."


def _spec(stream: bool, **sampling: object) -> ChoiceSpec:
    s = Sampling(max_tokens=1000, **sampling)  # type: ignore[arg-type]
    return ChoiceSpec(0, WorkerRequest("r-0", (1, 2, 3), sampling_to_proto(s), stream), s)


def _feed(decoder: ChoiceDecoder, events: list[WorkerEvent]) -> list[ChoiceDelta]:
    deltas = []
    for event in events:
        delta = decoder.feed(event)
        if delta is not None:
            deltas.append(delta)
        if decoder.stopped:
            break
    return deltas


def _events(ids: list[int], rng: random.Random, reason: str = "length") -> list[WorkerEvent]:
    """``ids`` in chunks of 1-4, with logprobs, then the end."""
    events: list[WorkerEvent] = []
    i = 0
    while i < len(ids):
        k = rng.randint(1, 4)
        part = tuple(ids[i : i + k])
        events.append(TokenChunk(part, tuple(TokenLogprob(-0.5, ()) for _ in part)))
        i += k
    events.append(Finished(reason, 3, len(ids), 1))
    return events


def test_at_the_end_and_streamed_agree(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    eos = tokenizer.eos_token_ids
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    for _ in range(20):
        events = _events(ids, rng)
        at_end = _feed(ChoiceDecoder(_spec(False), tokenizer, eos), events)
        streamed = _feed(ChoiceDecoder(_spec(True), tokenizer, eos), events)
        # Decoded once: one delta, with every token and logprob and the whole text.
        assert len(at_end) == 1
        (last,) = at_end
        assert last.text == tokenizer.decode(ids) == TEXT
        assert last.token_ids == tuple(ids) and len(last.logprobs) == len(ids)
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            "length", 3, len(ids),
        )  # fmt: skip
        assert last.cached_tokens == 1
        # Streamed: a delta per chunk and one for the end, the same text and tokens in all.
        assert len(streamed) == len(events)
        assert "".join(d.text for d in streamed) == last.text
        assert sum((d.token_ids for d in streamed), ()) == last.token_ids
        assert streamed[-1].finish_reason == "length"
        assert streamed[-1].completion_tokens == len(ids)


def test_a_stop_token_ends_the_text_and_is_reported(tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_ids
    stop = next(iter(eos))
    ids = [*tokenizer.encode("keys and values", add_special_tokens=False), stop]
    for stream in (False, True):
        events = _events(ids, random.Random(1), reason="stop")
        deltas = _feed(ChoiceDecoder(_spec(stream), tokenizer, eos), events)
        assert "".join(d.text for d in deltas) == "keys and values"
        assert deltas[-1].finish_reason == "stop" and deltas[-1].matched == stop
        assert deltas[-1].completion_tokens == len(ids)  # the stop token counts


def test_a_stop_string_ends_the_choice_on_its_chunk(tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_ids
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    events = _events(ids, random.Random(2))
    decoder = ChoiceDecoder(_spec(True, stop=("CJK",)), tokenizer, eos)
    deltas = _feed(decoder, events)
    assert decoder.stopped  # the caller closes the events: the request is aborted
    assert "".join(d.text for d in deltas) == "emoji 🚀🤖 and "
    assert deltas[-1].finish_reason == "stop" and deltas[-1].matched == "CJK"
    assert not isinstance(events[len(deltas) - 1], Finished)


def test_an_end_without_tokens(tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_ids
    for stream in (False, True):
        deltas = _feed(ChoiceDecoder(_spec(stream), tokenizer, eos), [Finished("abort", 3, 0, 0)])
        assert [(d.text, d.token_ids, d.finish_reason) for d in deltas] == [("", (), "abort")]
