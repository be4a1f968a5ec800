"""The controller's /metrics and /targets (cluster.metrics) over real HTTP, without Ray."""

from __future__ import annotations

import asyncio

import aiohttp

from cluster.metrics import GroupSample, serve
from tests.redis_server import free_port


def test_restarts_health_and_service_discovery() -> None:
    groups = [
        GroupSample("prefill-0", "prefill", 2, True, False, "http://10.1.0.5:41000/metrics"),
        GroupSample("decode-0", "decode", 0, False, False, "http://10.1.0.6:41001/metrics"),
        GroupSample("router", "router", 0, True, False, "http://10.1.0.7:8000/metrics"),
        GroupSample("redis", "redis", 1, True, False),
    ]

    async def body() -> None:
        port = free_port()
        runner = await serve(lambda: groups, "127.0.0.1", port)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    assert resp.status == 200
                    text = await resp.text()
                async with http.get(f"http://127.0.0.1:{port}/targets") as resp:
                    sd = await resp.json()
                groups[0] = GroupSample("prefill-0", "prefill", 3, True, False, "http://x:1/m")
                async with http.get(f"http://127.0.0.1:{port}/targets") as resp:
                    moved = await resp.json()
        finally:
            await runner.cleanup()
        assert 'pdserve:worker_restarts_total{group="prefill-0",role="prefill"} 2.0' in text
        assert 'pdserve:worker_restarts_total{group="redis",role="redis"} 1.0' in text
        assert 'pdserve:cluster_group_healthy{group="decode-0",role="decode"} 0.0' in text
        assert 'pdserve:cluster_group_draining{group="router",role="router"} 0.0' in text
        # Prometheus' http_sd format: the workers and the router, not Redis (no /metrics).
        assert sd == [
            {"targets": ["10.1.0.5:41000"],
             "labels": {"pdserve_group": "prefill-0", "pdserve_role": "prefill"}},
            {"targets": ["10.1.0.6:41001"],
             "labels": {"pdserve_group": "decode-0", "pdserve_role": "decode"}},
            {"targets": ["10.1.0.7:8000"],
             "labels": {"pdserve_group": "router", "pdserve_role": "router"}},
        ]  # fmt: skip
        # Read at every call: a restarted worker's new port, and a path other than /metrics.
        assert moved[0] == {
            "targets": ["x:1"],
            "labels": {"pdserve_group": "prefill-0", "pdserve_role": "prefill",
                       "__metrics_path__": "/m"},
        }  # fmt: skip

    asyncio.run(body())
