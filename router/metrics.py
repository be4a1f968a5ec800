"""The router's Prometheus metrics, in a registry of its own (one per app, so tests can build
several apps in one process). Every name the router exports is written here.

Per-worker gauges (health, circuit state, in-flight requests, last load report) are read
from the pool at scrape time (``watch_workers``), so a worker that leaves the pool leaves no
stale series behind. Once the served model is known (``set_model``), every series is exported
with a ``model_name`` label, as the workers' are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

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
        # A child of ``--processes N`` (router.processes) writes its values to files in this
        # directory, which every child's /metrics sums.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._watched: list[Collector] = []
        self.model_name: str | None = None
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
            multiprocess_mode="livesum",
        )
        self.ttft = Histogram(
            "pdserve:time_to_first_token_seconds",
            "From request arrival to the first generated token (requests whose tokens stream: "
            "with stream or stop strings).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "pdserve:inter_token_latency_seconds",
            "Between consecutive generated tokens of one choice (streamed requests).",
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

        self.worker_errors = Counter(
            "pdserve:router_worker_errors",
            "Worker attempts that failed, by worker, role and gRPC status.",
            ["worker", "role", "code"],
            registry=self.registry,
        )
        self.retries = Counter(
            "pdserve:router_retries",
            "Attempts retried on a fresh pair before the first token, by the failure's status.",
            ["code"],
            registry=self.registry,
        )
        self.migrations = Counter(
            "pdserve:router_migrations",
            "Requests moved to a fresh pair mid-stream, by the failure's gRPC status.",
            ["code"],
            registry=self.registry,
        )
        self.policy_decisions = Counter(
            "pdserve:router_policy_decisions",
            "Workers chosen by the load-balancing policies, by policy, role and worker.",
            ["policy", "role", "worker"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "pdserve:router_queue_depth",
            "Requests waiting for a slot under --max-concurrent-requests.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "pdserve:router_rejected_requests",
            "Requests refused with 429, by reason (queue_full, queue_timeout).",
            ["reason"],
            registry=self.registry,
        )
        # Created by the registry watcher only: without --registry there is no such series
        # (a 0 would read as "registry down" and fire alerts).
        self._registry_up: Gauge | None = None
        self.membership = Counter(
            "pdserve:router_worker_membership_changes",
            "Workers added to or removed from the pool, by source and change.",
            ["source", "change"],
            registry=self.registry,
        )

    def registry_up(self) -> Gauge:
        """``pdserve:router_registry_up``: 1 when the last poll of the Redis worker registry
        succeeded, else 0; exported once a registry is configured."""
        if self._registry_up is None:
            self._registry_up = Gauge(
                "pdserve:router_registry_up",
                "1 when the last poll of the Redis worker registry succeeded, else 0.",
                registry=self.registry,
                multiprocess_mode="livemin",
            )
        return self._registry_up

    def watch_workers(self, workers: Callable[[], Iterable[WorkerSample]]) -> None:
        """Export per-worker gauges read from ``workers()`` at every scrape."""
        collector = _WorkerCollector(workers)
        self._watched.append(collector)
        self.registry.register(collector)

    def set_model(self, name: str) -> None:
        """Label every exported series with ``model_name=name`` from now on."""
        self.model_name = name

    def render(self) -> bytes:
        registry = self.registry
        if self.multiprocess_dir is not None:
            # Every process's values, summed (gauges by their multiprocess mode), plus this
            # process's view of the workers.
            registry = CollectorRegistry()
            MultiProcessCollector(registry, self.multiprocess_dir)
            for collector in self._watched:
                registry.register(collector)
        if self.model_name is None:
            return generate_latest(registry)
        return generate_latest(_Labelled(registry, {"model_name": self.model_name}))


class _Labelled(Collector):
    """Another collector's metrics with constant labels added to every sample."""

    def __init__(self, inner: CollectorRegistry, labels: dict[str, str]) -> None:
        self._inner = inner
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():
            out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            out.samples = [s._replace(labels={**self._labels, **s.labels}) for s in metric.samples]
            yield out


@dataclass(frozen=True)
class WorkerSample:
    """One worker's state at scrape time; ``None`` load fields: no GetLoad report yet."""

    endpoint: str
    role: str
    healthy: bool
    circuit_state: int  # 0 closed, 1 half-open, 2 open
    draining: bool
    in_flight: int
    num_running: int | None = None
    num_waiting: int | None = None
    num_free_pages: int | None = None
    num_total_pages: int | None = None


_WORKER_GAUGES: tuple[tuple[str, str, Callable[[WorkerSample], float | None]], ...] = (
    ("pdserve:router_worker_healthy", "1 when the worker's last health check said SERVING.",
     lambda w: float(w.healthy)),
    ("pdserve:router_worker_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
     lambda w: float(w.circuit_state)),
    ("pdserve:router_worker_draining", "1 when the worker takes no new requests.",
     lambda w: float(w.draining)),
    ("pdserve:router_worker_in_flight_requests", "Requests the router has on the worker now.",
     lambda w: float(w.in_flight)),
    ("pdserve:router_worker_running_requests", "Running requests, from the last GetLoad.",
     lambda w: w.num_running),
    ("pdserve:router_worker_waiting_requests", "Queued requests, from the last GetLoad.",
     lambda w: w.num_waiting),
    ("pdserve:router_worker_kv_free_pages", "Free KV pages, from the last GetLoad.",
     lambda w: w.num_free_pages),
    ("pdserve:router_worker_kv_total_pages", "KV pages in all, from the last GetLoad.",
     lambda w: w.num_total_pages),
)  # fmt: skip


class _WorkerCollector(Collector):
    def __init__(self, workers: Callable[[], Iterable[WorkerSample]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        samples = list(self._workers())
        for name, doc, value_of in _WORKER_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["worker", "role"])
            for w in samples:
                value = value_of(w)
                if value is not None:
                    family.add_metric([w.endpoint, w.role], value)
            yield family


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


class RequestTally:
    """The per-request counts (requests by route and status, requests running, prompt and
    generated tokens) kept as plain numbers and added to their Prometheus metrics in bulk.

    A Prometheus update takes a lock and several calls (about 2 µs of the router's time per
    request for these four); summed here they cost a dict update. ``flush`` runs before
    every scrape of this process, whenever the last request running ends, and every
    ``period_s`` under load (``start``), so another process of ``--processes N`` sees them at
    most that late.
    """

    def __init__(self, metrics: RouterMetrics, period_s: float = 0.5) -> None:
        self._metrics = metrics
        self.period_s = period_s
        self.running = 0
        self._exported_running = 0
        self._requests: dict[tuple[str, int], int] = {}
        self._counter = functools.cache(metrics.requests.labels)  # (route, status) -> child
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._flusher: asyncio.Task[None] | None = None

    def begin(self) -> None:
        self.running += 1

    def end(self, route: str, status: int) -> None:
        """A request that ``begin`` counted ended with ``status``."""
        self.running -= 1
        self.answered(route, status)
        if self.running == 0:
            self.flush()

    def answered(self, route: str, status: int) -> None:
        """A request answered (with ``begin``/``end`` or without, when refused at once)."""
        key = (route, status)
        self._requests[key] = self._requests.get(key, 0) + 1

    def tokens(self, prompt: int, generated: int) -> None:
        self._prompt_tokens += prompt
        self._generation_tokens += generated

    def flush(self) -> None:
        m = self._metrics
        requests, self._requests = self._requests, {}
        for (route, status), n in requests.items():
            self._counter(route, str(status)).inc(n)
        if self._prompt_tokens:
            m.prompt_tokens.inc(self._prompt_tokens)
            self._prompt_tokens = 0
        if self._generation_tokens:
            m.generation_tokens.inc(self._generation_tokens)
            self._generation_tokens = 0
        if self.running != self._exported_running:
            m.running.set(self.running)
            self._exported_running = self.running

    def start(self) -> None:
        """Flush every ``period_s`` on the running loop until ``close``."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            self.flush()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.flush()
