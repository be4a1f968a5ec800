"""Retries and mid-stream migration: one request's attempts until it ends in tokens or an error.

``generate`` asks ``routes`` for a route (a colocated worker, or a prefill and a decode worker)
and streams its events. When an attempt fails with a retryable status:

- before the client has seen any token, it is **retried** on a fresh route (other workers
  preferred, a fresh transfer id), after an exponential backoff with jitter, until
  ``max_attempts`` attempts in all have failed;
- after the client has seen tokens, it is **migrated**: prompt plus the tokens delivered so far
  go to a fresh route with ``max_tokens`` reduced by as many, at most ``migration_limit``
  times. The engine recomputes the KV of that longer prompt, so a greedy stream goes on
  exactly as it would have, with no token repeated or missing.

The failed attempt's calls are cancelled and aborted by its stream's ``aclose`` (see
``router.client.dispatch``), so no KV pages stay reserved. Bad input (INVALID_ARGUMENT,
OUT_OF_RANGE) is never retried.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Set
from dataclasses import dataclass
from typing import Protocol

from protos import common_pb2
from router.client.errors import NoUsableWorker, WorkerError
from router.client.events import Finished, TokenChunk, WorkerEvent, WorkerRequest
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
    """The workers of one attempt; ``stream`` runs it (see ``router.client.dispatch``)."""

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
