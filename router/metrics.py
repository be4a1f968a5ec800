"""The router's Prometheus metrics, in a registry of its own (one per app, so tests can build
several apps in one process)."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouterMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: dashboards never read them
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdserve:router_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.running = Gauge(
            "pdserve:router_running_requests",
            "HTTP requests being served now.",
            registry=self.registry,
        )
        self.ttft = Histogram(
            "pdserve:time_to_first_token_seconds",
            "From request arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "pdserve:inter_token_latency_seconds",
            "Between consecutive generated tokens of one choice.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "pdserve:e2e_request_latency_seconds",
            "From request arrival to the last byte of the response, for successful requests.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "pdserve:prompt_tokens", "Prompt tokens of served requests.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "pdserve:generation_tokens",
            "Tokens generated for served requests.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenTimer:
    """Token timing of one HTTP request: its first token (TTFT) and each choice's gaps (ITL)."""

    def __init__(self, metrics: RouterMetrics, start: float | None = None) -> None:
        self._metrics = metrics
        self.start = time.perf_counter() if start is None else start
        self._first_seen = False
        self._last: dict[int, float] = {}

    def tokens(self, choice: int, count: int) -> None:
        """``count`` new tokens of choice ``choice`` arrived now."""
        if count <= 0:
            return
        now = time.perf_counter()
        if not self._first_seen:
            self._first_seen = True
            self._metrics.ttft.observe(now - self.start)
        last = self._last.get(choice)
        if last is not None:
            gap = (now - last) / count
            for _ in range(count):
                self._metrics.itl.observe(gap)
        self._last[choice] = now

    def done(self) -> None:
        self._metrics.e2e.observe(time.perf_counter() - self.start)
