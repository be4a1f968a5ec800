"""One choice's worker events turned into text deltas, and n choices merged into one stream.

A choice detokenizes its tokens incrementally, applies the stop strings, and ends with a
delta whose ``finish_reason`` is set. A stop-string match ends it early: the worker calls
are cancelled (and the request aborted) when the choice's event iterator is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

from engine.tokenizer import Tokenizer
from router.detokenizer import IncrementalDetokenizer
from router.events import TokenChunk, TokenLogprob, WorkerEvent, WorkerRequest
from router.metrics import TokenTimer
from router.stop import StopMatcher


@dataclass(slots=True)  # not frozen: see router.events.TokenChunk
class ChoiceDelta:
    """New output of choice ``index``: text, the tokens it came from, and maybe the end."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last delta
    matched: str | int | None = None  # the stop string or stop token that ended the choice
    prompt_tokens: int = 0  # usage, set on the last delta
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    request: WorkerRequest


StreamFn = Callable[[WorkerRequest], AsyncGenerator[WorkerEvent, None]]


async def run_choice(
    spec: ChoiceSpec,
    generate: StreamFn,
    tokenizer: Tokenizer,
    eos_token_ids: frozenset[int],
    timer: TokenTimer | None = None,
) -> AsyncGenerator[ChoiceDelta, None]:
    """Deltas of one choice; raises ``WorkerError`` if its worker calls fail."""
    request = spec.request
    sampling = request.sampling
    stopping_ids = set(sampling.stop_token_ids)
    if not sampling.ignore_eos:
        stopping_ids |= eos_token_ids
    detok = IncrementalDetokenizer(tokenizer)
    stops = StopMatcher(sampling.stop) if sampling.stop else None
    timer = timer if request.stream else None  # tokens delivered at the end: no TTFT to time
    num_tokens = 0
    stop_token: int | None = None
    async with contextlib.aclosing(generate(request)) as events:
        async for event in events:
            if isinstance(event, TokenChunk):
                ids = event.token_ids
                num_tokens += len(ids)
                if timer is not None:
                    timer.tokens(spec.index, len(ids))
                # A stop token ends the sequence, and (as in vLLM) is not part of the text.
                text_ids: Sequence[int] = ids
                if not stopping_ids.isdisjoint(ids):
                    text_ids = [t for t in ids if t not in stopping_ids]
                    stop_token = next(t for t in ids if t in stopping_ids)
                text = detok.push(text_ids)
                if stops is None:
                    yield ChoiceDelta(spec.index, text, ids, event.logprobs)
                    continue
                result = stops.feed(text)
                if result.matched is None:
                    yield ChoiceDelta(spec.index, result.text, ids, event.logprobs)
                    continue
                yield _last(spec, result.text, "stop", result.matched, num_tokens, event, 0)
                return
            text = detok.flush()
            cached = event.cached_tokens
            if stops is not None:
                tail = stops.feed(text)
                if tail.matched is not None:
                    yield _last(spec, tail.text, "stop", tail.matched, num_tokens, None, cached)
                    return
                text = tail.text + stops.flush()
            matched = stop_token if event.reason == "stop" else None
            yield _last(spec, text, event.reason, matched, num_tokens, None, cached)
            return


def _last(
    spec: ChoiceSpec,
    text: str,
    reason: str,
    matched: str | int | None,
    num_tokens: int,
    chunk: TokenChunk | None,
    cached_tokens: int,
) -> ChoiceDelta:
    return ChoiceDelta(
        index=spec.index,
        text=text,
        token_ids=chunk.token_ids if chunk else (),
        logprobs=chunk.logprobs if chunk else (),
        finish_reason=reason,
        matched=matched,
        prompt_tokens=len(spec.request.token_ids),
        completion_tokens=num_tokens,
        cached_tokens=cached_tokens,
    )


async def merge(
    streams: Sequence[AsyncGenerator[ChoiceDelta, None]],
) -> AsyncGenerator[ChoiceDelta, None]:
    """Interleave the choices' deltas as they come; the first error ends every choice.

    Closing this iterator (or cancelling its consumer) cancels every choice still running.
    """
    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[ChoiceDelta, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    queue.put_nowait(delta)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
