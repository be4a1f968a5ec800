"""What the Ray controller tells Prometheus: worker restarts and health per supervised group
(`/metrics`), and where every worker's own /metrics is (`/targets`, in Prometheus' HTTP
service-discovery format), so that a scrape config needs one address, not one per worker.

Workers pick their metrics ports at start and get new ones when Ray restarts them; the
controller is the one place that always knows them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class GroupSample:
    """One supervised group at scrape time."""

    name: str
    role: str  # prefill | decode | null | router | redis
    restarts: int
    healthy: bool
    draining: bool
    metrics_url: str = ""  # the worker's (or the router's) /metrics; "" when it has none


class _GroupCollector(Collector):
    def __init__(self, groups: Callable[[], Iterable[GroupSample]]) -> None:
        self._groups = groups

    def collect(self) -> Iterator[Metric]:
        groups = list(self._groups())
        labels = ["group", "role"]
        restarts = CounterMetricFamily(
            "pdserve:worker_restarts",
            "Times the controller brought a group back (Ray restart or whole-instance restart).",
            labels=labels,
        )
        up = GaugeMetricFamily(
            "pdserve:cluster_group_healthy",
            "1 when the group's processes are alive and its health check says SERVING.",
            labels=labels,
        )
        draining = GaugeMetricFamily(
            "pdserve:cluster_group_draining",
            "1 while the group drains (scaled down).",
            labels=labels,
        )
        for g in groups:
            restarts.add_metric([g.name, g.role], g.restarts)
            up.add_metric([g.name, g.role], float(g.healthy))
            draining.add_metric([g.name, g.role], float(g.draining))
        yield from (restarts, up, draining)


def targets(groups: Iterable[GroupSample]) -> list[dict[str, object]]:
    """Prometheus HTTP SD entries: one per group that serves /metrics."""
    out: list[dict[str, object]] = []
    for g in groups:
        if not g.metrics_url:
            continue
        url = urlsplit(g.metrics_url)
        labels = {"pdserve_group": g.name, "pdserve_role": g.role}
        if url.path and url.path != "/metrics":
            labels["__metrics_path__"] = url.path
        out.append({"targets": [url.netloc], "labels": labels})
    return out


def write_file_sd(metrics: dict[str, str], path: str) -> None:
    """`pdserve local`'s processes ({name: /metrics URL}, names like "prefill-0") as a
    Prometheus file_sd file, in the shape of the controller's /targets."""
    groups = [GroupSample(n, n.rsplit("-", 1)[0], 0, True, False, u) for n, u in metrics.items()]
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(targets(groups), indent=1))
    tmp.replace(path)  # Prometheus may read the file at any time: never half-written


def app(groups: Callable[[], Iterable[GroupSample]]) -> web.Application:
    """`/metrics` (restarts, health) and `/targets` (HTTP SD) over `groups()` at each call."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_GroupCollector(groups))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def sd(_: web.Request) -> web.Response:
        return web.json_response(targets(groups()))

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/targets", sd)
    return application


async def serve(groups: Callable[[], Iterable[GroupSample]], host: str, port: int) -> web.AppRunner:
    """Serve `app(groups)` on host:port until the returned runner is cleaned up."""
    runner = web.AppRunner(app(groups), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
