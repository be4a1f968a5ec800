"""Load shedding: at most ``max_concurrent`` generation requests at once, a bounded FIFO queue
of waiting ones, and a 429 for the rest.

A request takes a slot for its whole life (streaming included). With every slot taken it
waits in the queue, up to ``queue_timeout_s``; with the queue full, or after that wait, it is
refused at once with HTTP 429, a ``Retry-After`` header, and OpenAI's rate-limit error body
(``type: "requests"``, ``code: "rate_limit_exceeded"``), so clients back off instead of
piling onto workers that are already full.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from router.app.errors import RequestError
from router.metrics import RouterMetrics

DEFAULT_MAX_CONCURRENT = 256
DEFAULT_QUEUE_SIZE = 256
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class AdmissionConfig:
    """Validated at construction: ValueError names the flag and the value."""

    max_concurrent: int = DEFAULT_MAX_CONCURRENT  # --max-concurrent-requests
    queue_size: int = DEFAULT_QUEUE_SIZE  # --queue-size (0: no queue)
    queue_timeout_s: float = 30.0  # --queue-timeout

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent-requests must be >= 1, got {self.max_concurrent}")
        if self.queue_size < 0:
            raise ValueError(f"--queue-size must be >= 0, got {self.queue_size}")
        if not self.queue_timeout_s > 0:
            raise ValueError(f"--queue-timeout must be > 0, got {self.queue_timeout_s}")

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("load shedding")
        g.add_argument(
            "--max-concurrent-requests",
            type=int,
            default=DEFAULT_MAX_CONCURRENT,
            help="generation requests served at once; more wait in the queue",
        )
        g.add_argument(
            "--queue-size",
            type=int,
            default=DEFAULT_QUEUE_SIZE,
            help="requests that may wait for a slot; beyond it: 429 (0: no queue)",
        )
        g.add_argument(
            "--queue-timeout",
            type=float,
            default=30.0,
            help="seconds a request waits in the queue before a 429",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdmissionConfig:
        return cls(
            max_concurrent=args.max_concurrent_requests,
            queue_size=args.queue_size,
            queue_timeout_s=args.queue_timeout,
        )


class Overloaded(RequestError):
    """HTTP 429 in OpenAI's rate-limit shape; the server adds ``Retry-After``."""

    def __init__(self, message: str) -> None:
        super().__init__(429, message, None, "rate_limit_exceeded")
        self.retry_after_s = RETRY_AFTER_S

    @property
    def type(self) -> str:
        return "requests"


class Admission:
    """Slots and a FIFO queue. Runs on one event loop; not thread-safe."""

    def __init__(self, config: AdmissionConfig, metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the ``async with`` body; raises ``Overloaded`` when refused."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Take a slot (after a wait in the queue); raises ``Overloaded`` when refused. Each
        slot taken is given back with one ``release``."""
        if self.running < self.config.max_concurrent and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.config.queue_size:
            self._reject("queue_full")
            raise Overloaded(
                f"the server is at capacity ({self.config.max_concurrent} requests running, "
                f"{len(self._waiters)} queued); retry after {RETRY_AFTER_S}s"
            )
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(ticket)
        self._gauge()
        try:
            await asyncio.wait({ticket}, timeout=self.config.queue_timeout_s)
        except asyncio.CancelledError:  # the client went away while queued
            if ticket.done():
                self.release()  # it was handed a slot just now: pass it on
            else:
                self._leave(ticket)
            raise
        if not ticket.done():
            self._leave(ticket)
            self._reject("queue_timeout")
            raise Overloaded(
                f"no capacity within {self.config.queue_timeout_s:g}s "
                f"({self.config.max_concurrent} requests running); retry after {RETRY_AFTER_S}s"
            )
        # Done: ``release`` handed this request its slot (``running`` did not change).

    def _leave(self, ticket: asyncio.Future[None]) -> None:
        ticket.cancel()
        self._waiters.remove(ticket)
        self._gauge()

    def release(self) -> None:
        # Hand the slot straight to the oldest waiter, so a newcomer cannot jump the queue.
        while self._waiters:
            ticket = self._waiters.popleft()
            if not ticket.done():
                ticket.set_result(None)
                self._gauge()
                return
        self.running -= 1
        self._gauge()

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiters))
