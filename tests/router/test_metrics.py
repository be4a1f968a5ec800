"""The router's request tally: counts kept as numbers, exported to Prometheus in bulk."""

from __future__ import annotations

import asyncio

from router.metrics import RequestTally, RouterMetrics
from tests.router.conftest import run


def _value(metrics: RouterMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_tally_flushes_when_idle_and_periodically() -> None:
    async def body() -> None:
        metrics = RouterMetrics()
        tally = RequestTally(metrics, period_s=0.05)
        ok = {"endpoint": "/v1/completions", "status": "200"}
        tally.begin()
        tally.begin()
        tally.tokens(5, 8)
        tally.end("/v1/completions", 200)
        # One request still runs: nothing exported yet.
        assert _value(metrics, "pdserve:router_requests_total", ok) == 0
        tally.start()
        await asyncio.sleep(0.2)  # the periodic flush
        assert _value(metrics, "pdserve:router_requests_total", ok) == 1
        assert _value(metrics, "pdserve:router_running_requests") == 1
        assert _value(metrics, "pdserve:prompt_tokens_total") == 5
        assert _value(metrics, "pdserve:generation_tokens_total") == 8
        tally.answered("other", 404)
        tally.end("/v1/completions", 200)  # the last running request: flushed at once
        assert _value(metrics, "pdserve:router_requests_total", ok) == 2
        assert _value(metrics, "pdserve:router_requests_total", {**ok, "endpoint": "other",
                                                                 "status": "404"}) == 1  # fmt: skip
        assert _value(metrics, "pdserve:router_running_requests") == 0
        await tally.close()
        assert tally.running == 0

    run(body())
