"""One request on the workers: its attempts, and each attempt's calls on their sessions.

``generate`` asks ``routes`` for a route (a colocated worker, or a prefill and a decode worker)
and streams its events. When an attempt fails with a retryable status:

- before the client has seen any token, it is **retried** on a fresh route (other workers
  preferred, a fresh transfer id), after an exponential backoff with jitter, until
  ``max_attempts`` attempts in all have failed;
- after the client has seen tokens, it is **migrated**: prompt plus the tokens delivered so far
  go to a fresh route with ``max_tokens`` reduced by as many, at most ``migration_limit``
  times. The engine recomputes the KV of that longer prompt, so a greedy stream goes on
  exactly as it would have, with no token repeated or missing.

Bad input (INVALID_ARGUMENT, OUT_OF_RANGE) is never retried.

An attempt's calls (``colocated``: the request on the worker's decode session;
``disaggregated``: on the decode worker's session and the prefill worker's session at once,
sharing a transfer id, a streamed request's first token taken from the prefill worker's reply)
are async generators of ``WorkerEvent``s that end after ``Finished``. Whatever ends them early
(an error, ``aclose``, cancellation of the consuming task) aborts the request on every session
it is still running on, so no KV pages stay reserved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Set
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc

from protos import common_pb2
from protos.common_pb2 import GenerateRequest, GenerateResponse
from protos.decode_pb2 import DecodeRequest
from protos.prefill_pb2 import PrefillReply, PrefillRequest, PrefillResponse
from router.client.errors import NoUsableWorker, WorkerError, status_code_from_int
from router.client.session import (
    Finished,
    RequestStream,
    Session,
    TokenChunk,
    WorkerEvent,
    WorkerRequest,
    chunk_from_proto,
    event_from_proto,
    request_to_proto,
)
from router.metrics import RouterMetrics

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class RetryConfig:
    """Validated at construction: ValueError names the flag and the value."""

    max_attempts: int = 3  # --retry-max: attempts in all (1 = no retry) before any token
    backoff_ms: float = 50.0  # --retry-backoff-ms: the first backoff; doubles per retry
    migration_limit: int = 3  # --migration-limit: mid-stream moves per request (0: none)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"--retry-max must be >= 1, got {self.max_attempts}")
        if self.backoff_ms < 0:
            raise ValueError(f"--retry-backoff-ms must be >= 0, got {self.backoff_ms}")
        if self.migration_limit < 0:
            raise ValueError(f"--migration-limit must be >= 0, got {self.migration_limit}")

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("retries and migration")
        g.add_argument(
            "--retry-max",
            type=int,
            default=3,
            help="attempts in all for a request that fails before its first token (1: none)",
        )
        g.add_argument(
            "--retry-backoff-ms",
            type=float,
            default=50.0,
            help="first retry's backoff; doubles per retry, with jitter",
        )
        g.add_argument(
            "--migration-limit",
            type=int,
            default=3,
            help="times one request may move to a new pair after its worker fails mid-stream",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RetryConfig:
        return cls(
            max_attempts=args.retry_max,
            backoff_ms=args.retry_backoff_ms,
            migration_limit=args.migration_limit,
        )


def backoff_delay(retry: int, backoff_ms: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (1, 2, ...): ``backoff_ms * 2**(retry-1)``
    scaled by a uniform jitter in [0.5, 1], capped at ``MAX_BACKOFF_S``."""
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, got {retry}")
    nominal = min(backoff_ms / 1000 * 2 ** (retry - 1), MAX_BACKOFF_S)
    return nominal * (rng or random).uniform(0.5, 1.0)


class Route(Protocol):
    """The workers of one attempt; ``stream`` runs it (``colocated`` or ``disaggregated``)."""

    @property
    def endpoints(self) -> tuple[str, ...]: ...

    def stream(self, request: WorkerRequest) -> AsyncGenerator[WorkerEvent, None]: ...


class Routes(Protocol):
    def route(self, token_ids: tuple[int, ...], avoid: Set[str]) -> Route:
        """A route for the prompt, preferring workers not in ``avoid``; NoUsableWorker if none."""
        ...

    def report(self, route: Route, error: WorkerError | None) -> None:
        """The attempt on ``route`` finished (``None``) or failed with ``error``."""
        ...


async def generate(
    routes: Routes,
    request: WorkerRequest,
    config: RetryConfig,
    eos_token_ids: frozenset[int] = frozenset(),
    metrics: RouterMetrics | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> AsyncGenerator[WorkerEvent, None]:
    """The request's tokens, then one ``Finished`` whose counts are the original prompt's and
    every token delivered; raises the last ``WorkerError`` when the budget is spent."""
    prompt = request.token_ids
    sampling = request.sampling
    max_tokens = sampling.max_new_tokens
    stopping = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else eos_token_ids)
    delivered: list[int] = []
    avoid: set[str] = set()
    retries = migrations = attempt = 0
    last_error: WorkerError | None = None
    while True:
        if delivered and (len(delivered) >= max_tokens or delivered[-1] in stopping):
            # Every token arrived; only the worker's closing message was lost.
            reason = "length" if delivered[-1] not in stopping else "stop"
            yield Finished(reason, len(prompt), len(delivered), 0)
            return
        try:
            route = routes.route((*prompt, *delivered) if delivered else prompt, avoid)
        except NoUsableWorker:
            if last_error is not None:
                raise last_error from None
            raise
        resumed = bool(delivered)
        attempt_request = request  # the first attempt: the request as it came
        if attempt:
            attempt_sampling = common_pb2.SamplingParams()
            attempt_sampling.CopyFrom(sampling)
            attempt_sampling.max_new_tokens = max_tokens - len(delivered)
            # A constraint's state replays the delivered tokens: they are its output.
            attempt_sampling.resumed_output_tokens = len(delivered)
            attempt_request = WorkerRequest(
                f"{request.request_id}.{attempt}",
                (*prompt, *delivered),
                attempt_sampling,
                request.stream,
                request.stream_interval,
            )
        attempt += 1
        finished: Finished | None = None
        try:
            async with contextlib.aclosing(route.stream(attempt_request)) as events:
                async for event in events:
                    if isinstance(event, TokenChunk):
                        delivered.extend(event.token_ids)
                        yield event
                        continue
                    routes.report(route, None)
                    # A resumed attempt's prompt holds generated tokens too.
                    cached = (
                        min(event.cached_tokens, len(prompt)) if resumed else event.cached_tokens
                    )
                    finished = Finished(event.reason, len(prompt), len(delivered), cached)
                    # The attempt's stream ends by itself after its Finished: letting it (rather
                    # than closing it half-way) costs far less than throwing GeneratorExit in.
            if finished is not None:
                yield finished
                return
        except WorkerError as exc:
            routes.report(route, exc)
            if not exc.retryable:
                raise
            last_error = exc
            avoid.add(exc.endpoint)
            if not delivered:
                retries += 1
                if retries >= config.max_attempts:
                    raise
                if metrics is not None:
                    metrics.retries.labels(exc.grpc_code.name).inc()
                delay = backoff_delay(retries, config.backoff_ms, rng)
                log.warning(
                    "request %s: attempt %d on %s failed (%s: %s); retrying in %.0f ms",
                    request.request_id, attempt, "+".join(route.endpoints),
                    exc.grpc_code.name, exc.details, delay * 1000,
                )  # fmt: skip
            else:
                migrations += 1
                if migrations > config.migration_limit:
                    raise
                if metrics is not None:
                    metrics.migrations.labels(exc.grpc_code.name).inc()
                delay = backoff_delay(migrations, config.backoff_ms, rng)
                log.warning(
                    "request %s: %s failed after %d tokens (%s: %s); migrating in %.0f ms",
                    request.request_id, exc.endpoint, len(delivered),
                    exc.grpc_code.name, exc.details, delay * 1000,
                )  # fmt: skip
            await sleep(delay)


# -- one attempt's calls -----------------------------------------------------------------------


def new_transfer_id() -> int:
    """A random non-zero 63-bit id (0 means "colocated"), drawn from the OS each time: no
    generator state shared by everything in the process."""
    while True:
        tid = secrets.randbits(63)
        if tid:
            return tid


def decode_request(
    request: WorkerRequest,
    transfer_id: int = 0,
    prefill: str = "",
    msg: GenerateRequest | None = None,
) -> DecodeRequest:
    return DecodeRequest(
        request=request_to_proto(request) if msg is None else msg,
        transfer_id=transfer_id,
        prefill_endpoint=prefill,
        deliver_at_end=not request.stream,
        stream_interval=request.stream_interval,
    )


async def colocated(
    session: Session[DecodeRequest, GenerateResponse],
    request: WorkerRequest,
    on_end: Callable[[], None],
) -> AsyncGenerator[WorkerEvent, None]:
    """The request on a colocated worker's session; closing early aborts it there.
    ``on_end`` runs once the request is over on the worker, however it ended."""
    try:
        stream = session.open(decode_request(request))
    except BaseException:
        on_end()
        raise
    endpoint = session.endpoint
    try:
        while True:
            event = event_from_proto(await stream.next(), endpoint)
            yield event
            if isinstance(event, Finished):
                return
    finally:
        stream.close()
        on_end()


async def disaggregated(
    prefill: Session[PrefillRequest, PrefillReply],
    decode: Session[DecodeRequest, GenerateResponse],
    request: WorkerRequest,
    on_prefill_done: Callable[[], None],
    on_decode_done: Callable[[], None],
) -> AsyncGenerator[WorkerEvent, None]:
    """A streamed request's first token comes from the prefill worker's ``first`` reply, as
    soon as it is sampled: the KV hand-off is not part of the time to first token. The decode
    session repeats it (dropped here, after checking it is the same) and carries the rest;
    it carries every token when no ``first`` came before its own first message (a request not
    streamed, or a prefill worker that predates ``first``).

    The prefill's last reply reports success, or the error that dooms the attempt while the
    decode session has sent nothing: an early first token does not change that (``generate``
    then migrates the request, prompt plus that token). Once a decode message arrived the pages
    are on the decode worker, so a later prefill failure is ignored. ``on_prefill_done`` runs
    when the prefill side ends and ``on_decode_done`` when the decode side does, however they
    end.
    """
    try:
        tid = new_transfer_id()
        msg = request_to_proto(request)
        stream = decode.open(decode_request(request, tid, prefill.endpoint, msg))
        prefill_stream = prefill.open(
            PrefillRequest(request=msg, transfer_id=tid, stream_first_token=request.stream)
        )
    except BaseException:
        on_prefill_done()
        on_decode_done()
        raise
    first: asyncio.Future[TokenChunk] = asyncio.get_running_loop().create_future()
    prefill_done = asyncio.ensure_future(_prefill_reply(prefill_stream, first))

    def prefill_ended(_: object) -> None:
        prefill_stream.close()  # aborts the prefill unless its reply came
        on_prefill_done()

    prefill_done.add_done_callback(prefill_ended)
    read: asyncio.Future[Any] | None = None  # the next message, while racing the prefill reply
    early: tuple[int, ...] = ()  # tokens sent from the prefill's `first`, not yet repeated
    finished = decoding = took_first = False
    try:
        while True:
            if not (decoding or prefill_done.done()):
                if read is None:
                    read = asyncio.ensure_future(stream.next())
                waiting = {read, prefill_done}
                if not took_first:
                    waiting.add(first)
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not (took_first or decoding) and first.done():
                took_first = True
                head = first.result()
                early = head.token_ids
                if head.token_ids:
                    yield head
                continue
            failure = _exception(prefill_done) if prefill_done.done() and not decoding else None
            if failure is not None:
                raise failure
            try:
                if read is None:
                    reply = await stream.next()
                else:
                    pending, read = read, None
                    reply = await pending
            except WorkerError:
                # A failed prefill usually fails the decode side too; its error says why.
                cause = _exception(prefill_done) if prefill_done.done() and not decoding else None
                if cause is not None:
                    raise cause from None
                raise
            event = event_from_proto(reply, decode.endpoint)
            decoding = True
            if early and isinstance(event, TokenChunk):
                rest, early = _drop_repeated(event, early, prefill.endpoint, decode.endpoint)
                if not rest.token_ids:
                    continue
                event = rest
            finished = isinstance(event, Finished)
            if isinstance(event, Finished) and prefill_done.done():
                event = _with_prefill_cache(event, prefill_done)
            yield event
            if finished:
                return
    finally:
        if read is not None and not read.done():
            read.cancel()
        stream.close()
        on_decode_done()
        if not finished:
            prefill_done.cancel()  # its stream closes unanswered: the prefill is aborted
        # The prefill reply may trail the last token; let it land without a warning.
        prefill_done.add_done_callback(_drain)


async def _prefill_reply(
    stream: RequestStream[PrefillReply], first: asyncio.Future[TokenChunk]
) -> PrefillResponse:
    """The prefill's answer; raises ``WorkerError`` with the status it failed with. A
    ``first`` reply before it resolves ``first``."""
    reply = await stream.next()
    if reply.HasField("first"):
        if not first.done():
            first.set_result(chunk_from_proto(reply.first))
        reply = await stream.next()
    if reply.HasField("error"):
        code = status_code_from_int(reply.error.code)
        raise WorkerError(code, reply.error.message, stream.endpoint)
    return reply.done


def _drop_repeated(
    chunk: TokenChunk, early: tuple[int, ...], prefill: str, decode: str
) -> tuple[TokenChunk, tuple[int, ...]]:
    """``chunk`` without the tokens already sent from the prefill's reply, which lead the
    decode stream (a chunk may hold several tokens: ``stream_interval``); and those still to
    come. Different tokens there mean the decode worker continues something else than what
    the client got: DATA_LOSS, not retried."""
    n = min(len(early), len(chunk.token_ids))
    if chunk.token_ids[:n] != early[:n]:
        log.error(
            "decode worker %s repeated %s where prefill worker %s sent %s",
            decode, list(chunk.token_ids[:n]), prefill, list(early[:n]),
        )  # fmt: skip
        raise WorkerError(
            grpc.StatusCode.DATA_LOSS,
            f"the decode stream began with tokens {list(chunk.token_ids[:n])}, but prefill "
            f"worker {prefill} sent {list(early[:n])}",
            decode,
        )
    return TokenChunk(chunk.token_ids[n:], chunk.logprobs[n:]), early[n:]


def _with_prefill_cache(event: Finished, prefill: asyncio.Future[PrefillResponse]) -> Finished:
    """The prefix-cache hit happened on the prefill worker: report it if decode did not."""
    if _exception(prefill) is not None or prefill.cancelled():
        return event
    cached = prefill.result().cached_tokens
    return replace(event, cached_tokens=cached) if cached > event.cached_tokens else event


def _exception(future: asyncio.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return None
    return future.exception()


def _drain(future: asyncio.Future[PrefillResponse]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        exc = future.exception()
        if exc is not None:
            log.debug("prefill ended with %r", exc)
