"""One choice's worker events turned into text deltas, and n choices merged into one stream.

A choice (``ChoiceDecoder``) detokenizes its tokens, applies the stop strings, and ends with a
delta whose ``finish_reason`` is set. A stop-string match ends it early: the worker calls
are cancelled (and the request aborted) when the choice's event iterator is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

from engine.tokenizer import Tokenizer
from router.app.detokenizer import IncrementalDetokenizer
from router.app.requests import Sampling
from router.app.stop import StopMatcher
from router.client.session import TokenChunk, TokenLogprob, WorkerEvent, WorkerRequest
from router.metrics import TokenTimer


@dataclass(slots=True)  # not frozen: see router.client.session.TokenChunk
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
    sampling: Sampling  # the request's own: the stop strings and tokens the router watches
    # False where the output parsers read markers that the tokenizer marks special.
    skip_special_tokens: bool = True


StreamFn = Callable[[WorkerRequest], AsyncGenerator[WorkerEvent, None]]


@functools.cache
def _stopping_ids(
    stop_token_ids: tuple[int, ...], ignore_eos: bool, eos_token_ids: frozenset[int]
) -> frozenset[int]:
    """The ids that end a sequence: the request's stop tokens, and EOS unless ignored."""
    return frozenset(stop_token_ids) | (frozenset() if ignore_eos else eos_token_ids)


class ChoiceDecoder:
    """One choice's worker events as text deltas: detokenized, stop tokens kept out of the
    text (as in vLLM), stop strings applied. Pure logic; ``run_choice`` feeds it from the
    workers, and so does a handler that reads the events itself.

    A streamed request (or one whose stop strings are watched: ``WorkerRequest.stream``) is
    detokenized incrementally, a delta per chunk. One whose tokens come with its end is
    decoded once: its chunks make no delta, and the last delta carries every token."""

    __slots__ = (
        "_detok", "_held_ids", "_held_logprobs", "_held_text", "_index", "_num_tokens",
        "_prompt_tokens", "_skip_special", "_stop_token", "_stopping", "_stops", "_timer",
        "_tokenizer", "stopped",
    )  # fmt: skip

    def __init__(
        self,
        spec: ChoiceSpec,
        tokenizer: Tokenizer,
        eos_token_ids: frozenset[int],
        timer: TokenTimer | None = None,
    ) -> None:
        request = spec.request
        sampling = spec.sampling
        self._index = spec.index
        self._prompt_tokens = len(request.token_ids)
        self._stopping = _stopping_ids(sampling.stop_token_ids, sampling.ignore_eos, eos_token_ids)
        self._tokenizer = tokenizer
        self._skip_special = spec.skip_special_tokens
        self._detok = (
            IncrementalDetokenizer(tokenizer, self._skip_special) if request.stream else None
        )
        # Decoded at the end: every token and logprob so far, and the ids of the text.
        self._held_ids: tuple[int, ...] = ()
        self._held_logprobs: tuple[TokenLogprob, ...] = ()
        self._held_text: list[int] = []
        self._stops = StopMatcher(sampling.stop) if sampling.stop else None
        self._timer = timer if request.stream else None  # tokens at the end: no TTFT to time
        self._num_tokens = 0
        self._stop_token: int | None = None
        # A stop string ended the choice before its worker did: whoever reads the events
        # closes them, which aborts the request on its workers.
        self.stopped = False

    def feed(self, event: WorkerEvent) -> ChoiceDelta | None:
        """The delta ``event`` makes, if any. The one with ``finish_reason`` set is the
        choice's last: the ``Finished``'s, or a chunk's whose text matched a stop string."""
        if isinstance(event, TokenChunk):
            return self._chunk(event)
        ids, logprobs = self._held_ids, self._held_logprobs
        if self._detok is not None:
            text = self._detok.flush()
        else:
            held = self._held_text
            text = self._tokenizer.decode(held, self._skip_special) if held else ""
        cached = event.cached_tokens
        if self._stops is not None:
            tail = self._stops.feed(text)
            if tail.matched is not None:
                return self._last(tail.text, "stop", tail.matched, ids, logprobs, cached)
            text = tail.text + self._stops.flush()
        matched = self._stop_token if event.reason == "stop" else None
        return self._last(text, event.reason, matched, ids, logprobs, cached)

    def _chunk(self, chunk: TokenChunk) -> ChoiceDelta | None:
        ids = chunk.token_ids
        self._num_tokens += len(ids)
        if self._timer is not None:
            self._timer.tokens(self._index, len(ids))
        text_ids: Sequence[int] = ids
        if not self._stopping.isdisjoint(ids):
            text_ids = [t for t in ids if t not in self._stopping]
            self._stop_token = next(t for t in ids if t in self._stopping)
        if self._detok is None:
            self._held_ids += ids
            self._held_logprobs += chunk.logprobs
            self._held_text += text_ids
            return None
        text = self._detok.push(text_ids)
        if self._stops is None:
            return ChoiceDelta(self._index, text, ids, chunk.logprobs)
        result = self._stops.feed(text)
        if result.matched is None:
            return ChoiceDelta(self._index, result.text, ids, chunk.logprobs)
        self.stopped = True
        return self._last(result.text, "stop", result.matched, ids, chunk.logprobs, 0)

    def _last(
        self,
        text: str,
        reason: str,
        matched: str | int | None,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...],
        cached_tokens: int,
    ) -> ChoiceDelta:
        return ChoiceDelta(
            self._index, text, token_ids, logprobs, reason, matched, self._prompt_tokens,
            self._num_tokens, cached_tokens,
        )  # fmt: skip


async def run_choice(
    spec: ChoiceSpec,
    generate: StreamFn,
    tokenizer: Tokenizer,
    eos_token_ids: frozenset[int],
    timer: TokenTimer | None = None,
) -> AsyncGenerator[ChoiceDelta, None]:
    """Deltas of one choice; raises ``WorkerError`` if its worker calls fail."""
    decoder = ChoiceDecoder(spec, tokenizer, eos_token_ids, timer)
    async with contextlib.aclosing(generate(spec.request)) as events:
        # Read to their end: after the Finished the events end by themselves, which costs
        # far less than closing them half-way (GeneratorExit through every layer).
        async for event in events:
            delta = decoder.feed(event)
            if delta is not None:
                yield delta
            if decoder.stopped:
                return


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
