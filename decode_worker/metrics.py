"""A worker's Prometheus metrics, served on `--metrics-port` at /metrics.

Gauges are refreshed from the engine loop's latest per-rank loads once a second; counters and
histograms are updated where things happen (KV transfers). With expert parallelism, routing
counts per expert and the expected max/mean rank load come from a collective every
`expert_interval_s`, which is also when EPLB may rebalance.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

_TRANSFER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    def __init__(self, role: str, endpoint: str) -> None:
        self.registry = r = CollectorRegistry()
        self._labels = {"role": role, "worker": endpoint}
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
        self.pages_free = gauge("pdserve:kv_pages_free", "KV pages free or reclaimable")
        self.pages_total = gauge("pdserve:kv_pages_total", "KV pages in the pool")
        self.page_usage = gauge("pdserve:kv_page_usage_ratio", "Share of KV pages in use")
        self.cache_hit = gauge(
            "pdserve:prefix_cache_hit_ratio", "Prompt tokens found in the radix cache / queried"
        )
        self.alive = gauge("pdserve:worker_engine_alive", "1 while the engine loop runs")
        self.transfer_bytes = counter("pdserve:kv_transfer_bytes", "KV bytes written to decoders")
        self.transfer_failures = counter("pdserve:kv_transfer_failures", "Failed KV hand-offs")
        self.transfer_seconds = Histogram(
            "pdserve:kv_transfer_seconds",
            "Time to write one request's KV pages",
            names,
            buckets=_TRANSFER_BUCKETS,
            registry=r,
        ).labels(**self._labels)
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

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server; returns its port (useful with port 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    def refresh(self, engine: AsyncEngine) -> None:
        loads = engine.loads
        total = sum(x.num_total_pages for x in loads)
        free = sum(x.num_free_pages for x in loads)
        queried = sum(x.prefix_query_tokens for x in loads)
        hits = sum(x.prefix_hit_tokens for x in loads)
        self.running.set(sum(x.num_running for x in loads))
        self.waiting.set(sum(x.num_waiting for x in loads))
        self.transferring.set(sum(x.num_transferring for x in loads))
        self.pages_free.set(free)
        self.pages_total.set(total)
        self.page_usage.set(1 - free / total if total else 0)
        self.cache_hit.set(hits / queried if queried else 0)
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
