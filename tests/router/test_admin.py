"""The admin API against in-process fake workers: keys, listing, add, drain, remove."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from router.fleet.health import HealthConfig
from tests.router.conftest import RouterUnderTest, router_for, run
from tests.router.fake_worker import FakeWorker

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST_HEALTH = HealthConfig(check_interval_s=0.1, check_timeout_s=0.5)


async def call(
    r: RouterUnderTest,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with r.http.request(
        method, r.url + path, json=body, headers=AUTH if headers is None else headers
    ) as resp:
        return resp.status, await resp.json(content_type=None)


def error_of(body: Any, type_: str, code: str) -> str:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == (type_, code), err
    message: str = err["message"]
    return message


def test_admin_api_needs_a_key(model_dir: Path) -> None:
    w = FakeWorker()

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            status, reply = await call(r, "GET", "/admin/workers")
            assert status == 403
            assert "--admin-key" in error_of(reply, "permission_error", "admin_disabled")
        # 12 failures here: more than the default cap per address (test_auth tests the cap).
        async with router_for(
            model_dir, workers=(w,), admin_key=KEY, auth_failures_per_minute=20
        ) as r:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
                for method, path in (
                    ("GET", "/admin/workers"),
                    ("POST", "/admin/workers"),
                    ("DELETE", f"/admin/workers/{w.endpoint}"),
                    ("POST", f"/admin/workers/{w.endpoint}/drain"),
                ):
                    status, reply = await call(r, method, path, {}, headers)
                    assert status == 401, (method, path, headers)
                    error_of(reply, "authentication_error", "invalid_api_key")
            status, reply = await call(r, "GET", "/admin/workers")
            assert status == 200 and [x["endpoint"] for x in reply["workers"]] == [w.endpoint]

    run(body())


def test_add_drain_remove(model_dir: Path) -> None:
    static = FakeWorker()
    added = FakeWorker(reply=lambda prompt: [70] * 20, token_delay_s=0.03)
    other_model = FakeWorker(model="not-tiny")

    async def body() -> None:
        await added.start()
        await other_model.start()
        try:
            async with router_for(
                model_dir, workers=(static,), admin_key=KEY, health=FAST_HEALTH
            ) as r:
                await exercise(r, static, added, other_model)
        finally:
            await added.stop()
            await other_model.stop()

    run(body(), timeout_s=30)


async def exercise(
    r: RouterUnderTest, static: FakeWorker, added: FakeWorker, other_model: FakeWorker
) -> None:
    request = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 30}}
    # The static worker, as listed (its last load comes from the health checks' GetLoad).
    await asyncio.sleep(0.3)
    _, reply = await call(r, "GET", "/admin/workers")
    (listed,) = reply["workers"]
    assert listed["endpoint"] == static.endpoint and listed["source"] == "static"
    assert listed["role"] == "null" and listed["model"] == "tiny"
    assert (listed["health"], listed["circuit"], listed["draining"]) == ("healthy", "closed", False)
    assert listed["in_flight"] == 0 and listed["last_load"]["num_total_pages"] == 64

    # Add: checked with GetInfo. Bad bodies, duplicates and other models are refused.
    status, reply = await call(r, "POST", "/admin/workers", {"url": added.endpoint, "role": "x"})
    assert status == 400 and "'role'" in reply["error"]["message"]
    status, reply = await call(r, "POST", "/admin/workers", {"role": "null"})
    assert status == 400 and "'url'" in reply["error"]["message"]
    status, reply = await call(
        r, "POST", "/admin/workers", {"url": static.endpoint, "role": "null"}
    )
    assert status == 409
    status, reply = await call(
        r, "POST", "/admin/workers", {"url": other_model.endpoint, "role": "null"}
    )
    assert status == 400
    message = error_of(reply, "invalid_request_error", "worker_incompatible")
    assert "'not-tiny'" in message and "'tiny'" in message and other_model.endpoint in message
    status, reply = await call(
        r, "POST", "/admin/workers", {"url": f"grpc://{added.endpoint}", "role": "null"}
    )
    assert status == 201 and reply["endpoint"] == added.endpoint and reply["source"] == "admin"
    _, reply = await call(r, "GET", "/admin/workers")
    assert {w["endpoint"] for w in reply["workers"]} == {static.endpoint, added.endpoint}

    # Remove the static one: everything goes to the added worker now.
    status, reply = await call(r, "DELETE", f"/admin/workers/{static.endpoint}")
    assert status == 200 and reply["removed"]["endpoint"] == static.endpoint
    status, reply = await call(r, "DELETE", f"/admin/workers/{static.endpoint}")
    assert status == 404 and reply["error"]["code"] == "worker_not_found"

    # Drain it with a request in flight: no new requests, the running one finishes, and
    # the worker leaves the pool when it ends.
    slow = asyncio.create_task(r.post("/generate", request))
    while not added.running:
        await asyncio.sleep(0.01)
    status, reply = await call(r, "POST", f"/admin/workers/{added.endpoint}/drain")
    assert status == 200 and reply["draining"] and reply["in_flight"] == 1
    status, reply = await r.post("/generate", request)
    assert status == 503 and reply["error"]["code"] == "no_worker_available"
    status, reply = await slow
    assert status == 200 and reply["output_ids"] == [70] * 20 + [2]
    _, reply = await call(r, "GET", "/admin/workers")
    assert reply["workers"] == []
    # And back: the admin may add a removed worker again.
    status, _ = await call(r, "POST", "/admin/workers", {"url": static.endpoint, "role": "null"})
    assert status == 201
    status, reply = await r.post("/generate", request)
    assert status == 200
    assert len(static.requests) == 1 and len(added.requests) == 1
