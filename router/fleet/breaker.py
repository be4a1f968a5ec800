"""The per-worker circuit breaker: a pure state machine (no I/O, an injectable clock).

The pool feeds it from two sources: the periodic ``grpc.health.v1`` checks and the outcome of
every request attempt. A worker whose breaker is open takes no requests until the breaker
half-opens and enough successes close it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import grpc

from router.fleet.health import HealthConfig


class CircuitState(enum.Enum):
    CLOSED = "closed"  # normal: requests flow, consecutive failures are counted
    OPEN = "open"  # tripped: no requests until ``open_timeout_s`` has passed
    HALF_OPEN = "half_open"  # on trial: requests flow; successes close it, a failure reopens

    @property
    def gauge(self) -> int:
        """The value of ``pdserve:router_worker_circuit_state``: 0 closed, 1 half-open, 2 open."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


# A request that ends with one of these says the worker is broken or unreachable. Bad input
# (INVALID_ARGUMENT, OUT_OF_RANGE), a full KV pool (RESOURCE_EXHAUSTED) and cancellations say
# nothing about the worker's health.
BREAKER_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class CircuitBreaker:
    """Closed → (``failure_threshold`` consecutive failures) → open → (``open_timeout_s``) →
    half-open → (``success_threshold`` consecutive successes) → closed; a failure while
    half-open opens it again. ``allows()`` is False only while open. Failures are request
    failures and unanswered health checks; successes are finished requests and, while
    half-open, health checks too."""

    def __init__(
        self, config: HealthConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or HealthConfig()
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0  # consecutive, while closed
        self._successes = 0  # consecutive, while half-open
        self._opened_at = 0.0

    @property
    def state(self) -> CircuitState:
        if (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at >= self.config.open_timeout_s
        ):
            self._state = CircuitState.HALF_OPEN
            self._successes = 0
        return self._state

    def allows(self) -> bool:
        return self.state is not CircuitState.OPEN

    def record_success(self, probe: bool = False) -> None:
        """A request that finished, or (``probe``) a health check that said SERVING.

        A probe does not reset the failure count of a closed breaker: a worker that answers
        its health checks but fails every request must still trip it."""
        state = self.state
        if state is CircuitState.CLOSED:
            if not probe:
                self._failures = 0
        elif state is CircuitState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self.config.success_threshold:
                self._state = CircuitState.CLOSED
                self._failures = 0
        # A success reported while open (a request that started before it opened) is ignored:
        # the breaker waits out its timeout.

    def record_failure(self) -> None:
        state = self.state
        if state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures >= self.config.failure_threshold:
                self._open()
        elif state is CircuitState.HALF_OPEN:
            self._open()

    def _open(self) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._successes = 0

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.state.value})"
