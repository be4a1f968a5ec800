"""A worker's Prometheus metrics, served on `--metrics-port` at /metrics.

Every series carries `model_name`, `role` and `worker` (the gRPC endpoint) labels, so that one
dashboard query can sum or split by any of them. Names follow vLLM's and SGLang's habits with
a `pdserve:` prefix; counters get prometheus-client's `_total` suffix.

Gauges of the engine (running, waiting, KV pages, prefix-cache hits, preemptions, generated
tokens) are refreshed from the engine loop once a second, and so are the hand-off queues, from
the stage the servicers record for each request (`handoff`); transfer counters are counted
where transfers end (`handoff_failed`, `transferred`). The time to first token is split into
phases (`PHASES`), each a histogram that the servicers observe once per request, when its
first token is out (`observe_phases`). With
expert parallelism, routing counts per expert and the expected max/mean rank load come from a
collective every `expert_interval_s`, which is also when EPLB may rebalance.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)

from engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

_TRANSFER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# 0.1 ms to 10 s: a phase of the time to first token may be a single event-loop hop.
_PHASE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10
)  # fmt: skip

# The hand-off queues, as SGLang's PD workers report them (a request is in one at a time):
#   prefill  bootstrap: prefilled requests waiting for their decode worker's destination;
#            inflight:  requests whose KV pages are being written to the decode worker;
#   decode   prealloc:  requests reserving pages and handing the destination to prefill;
#            transfer:  requests whose pages are reserved and whose KV is on its way.
QUEUES = {
    "bootstrap": ("pdserve:prefill_bootstrap_queue_requests", "Prefilled, awaiting a destination"),
    "inflight": ("pdserve:prefill_inflight_queue_requests", "KV pages being written to decode"),
    "prealloc": ("pdserve:decode_prealloc_queue_requests", "Reserving pages, bootstrapping"),
    "transfer": ("pdserve:decode_transfer_queue_requests", "Pages reserved, waiting for the KV"),
}  # fmt: skip

# The time to first token, phase by phase (time.monotonic stamps in the servicers; the prefill
# start from the engine's scheduler). With the KV write (`pdserve:kv_transfer_latency_seconds`,
# between handoff_wait and transfer_done) the prefill worker's phases follow one another, and
# so do the decode worker's. A colocated worker observes prefill_queue and prefill_compute.
# A request that fails or is aborted before its first token is out observes none of them.
PHASES = {
    "prefill_queue": ("pdserve:prefill_queue_seconds",
                      "Request received -> its first prefill step scheduled"),
    "prefill_compute": ("pdserve:prefill_compute_seconds",
                        "First prefill step scheduled -> first token out of the engine"),
    "handoff_wait": ("pdserve:prefill_handoff_wait_seconds",
                     "First token -> KV write starts (the decode worker's destination, then "
                     "the engine loop's page lookup)"),
    "transfer_done": ("pdserve:prefill_transfer_done_seconds",
                      "KV written -> the decode worker acknowledged TransferDone"),
    "decode_bootstrap": ("pdserve:decode_bootstrap_seconds",
                         "Request received -> pages reserved and the destination acknowledged "
                         "by the prefill worker"),
    "decode_kv_wait": ("pdserve:decode_kv_wait_seconds",
                       "Destination acknowledged -> TransferDone arrived (0 if it came first)"),
    "decode_pickup": ("pdserve:decode_engine_pickup_seconds",
                      "TransferDone arrived -> first token yielded (complete_transfer in the "
                      "engine loop)"),
}  # fmt: skip


class WorkerMetrics:
    def __init__(self, role: str, endpoint: str, model_name: str = "") -> None:
        disable_created_metrics()  # no *_created series: dashboards never read them
        self.registry = r = CollectorRegistry()
        self._labels = {"model_name": model_name, "role": role, "worker": endpoint}
        names = list(self._labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=r).labels(**self._labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=r).labels(**self._labels)

        self.running = gauge("pdserve:worker_running_requests", "Requests in the running batch")
        self.waiting = gauge("pdserve:worker_waiting_requests", "Requests queued for prefill")
        self.transferring = gauge(
            "pdserve:worker_transferring_requests", "Requests whose KV pages are arriving"
        )
        self.queues = {key: gauge(name, doc) for key, (name, doc) in QUEUES.items()}
        self.pages_free = gauge("pdserve:kv_pages_free", "KV pages free or reclaimable")
        self.pages_total = gauge("pdserve:kv_pages_total", "KV pages in the pool")
        self.page_usage = gauge("pdserve:kv_page_usage_ratio", "Share of KV pages in use (0-1)")
        self.cache_hit = gauge(
            "pdserve:prefix_cache_hit_ratio",
            "Prompt tokens found in the radix cache / queried, since start",
        )
        self.cache_hit_tokens = counter(
            "pdserve:prefix_cache_hit_tokens", "Prompt tokens found in the radix cache"
        )
        self.cache_query_tokens = counter(
            "pdserve:prefix_cache_query_tokens", "Prompt tokens looked up in the radix cache"
        )
        self.preemptions = counter(
            "pdserve:num_preemptions", "Running requests preempted (recomputed) for lack of pages"
        )
        self.generated_tokens = counter(
            "pdserve:worker_generated_tokens", "Tokens this worker generated and streamed"
        )
        self.gen_throughput = gauge(
            "pdserve:gen_throughput", "Generated tokens per second over the last refresh"
        )
        self.alive = gauge("pdserve:worker_engine_alive", "1 while the engine loop runs")
        self.transfer_bytes = counter("pdserve:kv_transfer_bytes", "KV bytes written to decoders")
        self.transfer_failures = counter(
            "pdserve:kv_transfer_failures", "KV hand-offs that failed after bootstrapping"
        )
        self.bootstrap_failures = counter(
            "pdserve:kv_bootstrap_failures",
            "KV hand-offs that failed before the pages' destination was agreed",
        )
        self.transfer_seconds = Histogram(
            "pdserve:kv_transfer_latency_seconds",
            "Time to write one request's KV pages",
            names,
            buckets=_TRANSFER_BUCKETS,
            registry=r,
        ).labels(**self._labels)
        self.phases = {
            key: Histogram(name, doc, names, buckets=_PHASE_BUCKETS, registry=r).labels(
                **self._labels
            )
            for key, (name, doc) in PHASES.items()
        }
        self.transfer_speed = gauge(
            "pdserve:kv_transfer_speed_gb_s", "Speed of the latest KV write, GB/s (1e9 bytes)"
        )
        self.rebalances = counter("pdserve:eplb_rebalances", "Expert re-placements applied")
        self.expert_load = Gauge(
            "pdserve:expert_load",
            "Tokens routed to each logical expert since the last rebalance",
            [*names, "layer", "expert"],
            registry=r,
        )
        self.expert_imbalance = Gauge(
            "pdserve:expert_load_imbalance",
            "Expected decode step cost of the costliest expert-parallel rank over the mean "
            "rank's (expert weight reads plus tokens), per MoE layer",
            [*names, "layer"],
            registry=r,
        )
        # Engine counters seen at the last refresh (the Prometheus counters add the growth).
        self._seen = {"hits": 0, "queries": 0, "preemptions": 0}
        self._stage: dict[str, str] = {}  # request id -> the hand-off queue it is in
        self._unexported_tokens = 0
        self._last_refresh = time.monotonic()

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (a thread); returns its port (useful with port 0)."""
        server = make_server(
            host, port, _text_only(make_wsgi_app(self.registry)), _Server, _QuietHandler
        )
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return int(server.server_port)

    def transferred(self, nbytes: int, seconds: float) -> None:
        """One request's KV pages were written: `nbytes` in `seconds`."""
        self.transfer_seconds.observe(seconds)
        self.transfer_bytes.inc(nbytes)
        if seconds > 0:
            self.transfer_speed.set(nbytes / seconds / 1e9)

    def observe_phases(self, seconds: Mapping[str, float]) -> None:
        """One request's phases of the time to first token (keys of PHASES), in seconds; a
        span below 0 (two stamps that raced, e.g. TransferDone before the destination's
        acknowledgement) counts as 0."""
        unknown = set(seconds) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown TTFT phases {sorted(unknown)}; known: {sorted(PHASES)}")
        for key, value in seconds.items():
            self.phases[key].observe(max(0.0, value))

    def handoff(self, request_id: str, queue: str | None) -> None:
        """`request_id` is now in hand-off queue `queue` (a key of QUEUES), or in none."""
        if queue is None:
            self._stage.pop(request_id, None)
        elif queue not in QUEUES:
            raise ValueError(f"unknown hand-off queue {queue!r}; known: {sorted(QUEUES)}")
        else:
            self._stage[request_id] = queue

    def handoff_failed(self, request_id: str) -> None:
        """`request_id`'s hand-off failed: a failed bootstrap while it waited for (or
        negotiated) the destination, a failed transfer once the pages were on their way."""
        queue = self._stage.get(request_id)
        if queue in ("bootstrap", "prealloc"):
            self.bootstrap_failures.inc()
        elif queue in ("inflight", "transfer"):
            self.transfer_failures.inc()

    def generated(self, num_tokens: int) -> None:
        """Tokens streamed; a plain add here (the hot path), exported at the next refresh."""
        self._unexported_tokens += num_tokens

    def refresh(self, engine: AsyncEngine) -> None:
        loads = engine.loads
        total = sum(x.num_total_pages for x in loads)
        free = sum(x.num_free_pages for x in loads)
        queried = sum(x.prefix_query_tokens for x in loads)
        hits = sum(x.prefix_hit_tokens for x in loads)
        self.running.set(sum(x.num_running for x in loads))
        self.waiting.set(sum(x.num_waiting for x in loads))
        self.transferring.set(sum(x.num_transferring for x in loads))
        stages = list(self._stage.values())
        for queue, gauge in self.queues.items():
            gauge.set(stages.count(queue))
        self.pages_free.set(free)
        self.pages_total.set(total)
        self.page_usage.set(1 - free / total if total else 0)
        self.cache_hit.set(hits / queried if queried else 0)
        # The engine's own counts only grow; a smaller value is a reset (a cache flush).
        # Only rank 0's scheduler is in this process: with expert parallelism, other ranks'
        # preemptions are not counted (RankLoad does not carry them).
        preemptions = engine.engine.scheduler.num_preemptions
        for key, now, counter in (
            ("hits", hits, self.cache_hit_tokens),
            ("queries", queried, self.cache_query_tokens),
            ("preemptions", preemptions, self.preemptions),
        ):
            counter.inc(max(0, now - self._seen[key]))
            self._seen[key] = now
        tokens, self._unexported_tokens = self._unexported_tokens, 0
        self.generated_tokens.inc(tokens)
        now_s = time.monotonic()
        elapsed = now_s - self._last_refresh
        self._last_refresh = now_s
        self.gen_throughput.set(tokens / elapsed if elapsed > 0 else 0)
        self.alive.set(1 if engine.alive else 0)

    async def run(self, engine: AsyncEngine, expert_interval_s: float, rebalance: bool) -> None:
        """Refresh gauges every second; every `expert_interval_s`, read expert loads (and,
        with `rebalance`, run EPLB) when the instance is expert-parallel."""
        loop = asyncio.get_running_loop()
        next_experts = loop.time() + expert_interval_s
        while True:
            self.refresh(engine)
            now = loop.time()
            if engine.world > 1 and engine.alive and expert_interval_s > 0 and now >= next_experts:
                next_experts = now + expert_interval_s
                try:
                    await self._experts(engine, rebalance)
                except Exception as exc:  # a dead engine is reported by the health service
                    log.warning("expert metrics failed: %s", exc)
            await asyncio.sleep(1.0)

    async def _experts(self, engine: AsyncEngine, rebalance: bool) -> None:
        loads = await engine.expert_loads()
        for layer, counts in loads.items():
            for expert, count in enumerate(counts):
                self.expert_load.labels(**self._labels, layer=layer, expert=str(expert)).set(count)
        report = await (engine.rebalance_experts() if rebalance else engine.expert_imbalance())
        for layer, (before, after) in report.items():
            self.expert_imbalance.labels(**self._labels, layer=layer).set(after)
            if after < before:
                self.rebalances.inc()


def _text_only(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Answer every scrape in the classic text format. prometheus-client 0.26 writes sample
    names in OpenMetrics (which Prometheus asks for first) with `:` turned into `_`, so
    `pdserve:kv_pages_total` would be stored as `pdserve_kv_pages_total`
    (prometheus/client_python#1177, open)."""

    def app_text(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return app({**environ, "HTTP_ACCEPT": "text/plain; version=0.0.4"}, start_response)

    return app_text


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per scrape
        pass


def handoff(metrics: WorkerMetrics | None, request_id: str, queue: str | None) -> None:
    """`WorkerMetrics.handoff` when the worker keeps metrics."""
    if metrics is not None:
        metrics.handoff(request_id, queue)


def handoff_failed(metrics: WorkerMetrics | None, request_id: str) -> None:
    """`WorkerMetrics.handoff_failed` when the worker keeps metrics."""
    if metrics is not None:
        metrics.handoff_failed(request_id)


def prefill_phases(received: float, started: float | None, sampled: float) -> dict[str, float]:
    """A prefill's phases from its stamps: request `received`, first prefill step `started`
    (`StepOutput.prefill_started_at`; None: not known, then no phase), first token `sampled`."""
    if started is None:
        return {}
    return {"prefill_queue": started - received, "prefill_compute": sampled - started}


def observe_phases(metrics: WorkerMetrics | None, seconds: Mapping[str, float]) -> None:
    """`WorkerMetrics.observe_phases` when the worker keeps metrics; never raises (a metric
    must not fail the request it measures)."""
    if metrics is None:
        return
    try:
        metrics.observe_phases(seconds)
    except Exception:
        log.warning("could not observe TTFT phases %s", dict(seconds), exc_info=True)
