"""The Redis worker registry, with a real redis-server: records join and leave the pool,
incompatible ones are refused, draining records take no requests, and a Redis outage or
restart removes nobody until the workers had time to re-register.

First against in-process fake workers whose records the test writes itself, then against real
worker processes that register themselves (and are SIGKILLed)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from router.app.server import serve
from router.config import RouterConfig
from router.fleet.health import HealthConfig
from router.fleet.registry import RegistryConfig, RegistryRecord
from tests.e2e.procs import worker, workers
from tests.redis_server import RedisServer
from tests.router.conftest import RouterUnderTest, router_for, run
from tests.router.fake_worker import FakeWorker
from tests.router.procs import call, metric, router_process, wait_until
from worker.registry import WorkerRecord

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def record(w: FakeWorker, draining: bool = False) -> WorkerRecord:
    return WorkerRecord(
        endpoint=w.endpoint,
        role=w.role,
        model=w.model,
        fingerprint=w.fingerprint,
        context_length=w.context_length,
        total_pages=64,
        draining=draining,
    )


def test_record_parsing() -> None:
    w = FakeWorker(endpoint="h:1")
    parsed = RegistryRecord.parse(record(w).to_json())
    assert (parsed.endpoint, parsed.role, parsed.model) == ("h:1", "null", "tiny")
    assert RegistryRecord.parse('{"endpoint": "h:1", "role": "decode", "model": "m", '
                                '"fingerprint": "f", "context_length": 8, "total_pages": 1, '
                                '"new_field": 1}').role == "decode"  # fmt: skip
    for bad, fragment in (
        ("nope", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"endpoint": "h:1"}', "missing"),
        (record(FakeWorker(role="both", endpoint="h:1")).to_json(), "role must be one of"),
    ):
        with pytest.raises(ValueError, match=fragment):
            RegistryRecord.parse(bad)
    good = json.loads(record(w).to_json())
    for changes, fragment in (
        ({"endpoint": ["h:1"]}, "endpoint must be a string"),
        ({"endpoint": 12345}, "endpoint must be a string"),
        ({"endpoint": "no port"}, "host:port"),
        ({"draining": "false"}, "draining must be true or false"),
        ({"context_length": True}, "context_length must be an integer"),
        ({"model": None}, "model must be a string"),
        ({"model": ["m" * 5000]}, "model must be a string, got \\['mmm"),
    ):
        with pytest.raises(ValueError, match=fragment) as info:
            RegistryRecord.parse(json.dumps({**good, **changes}), "h:1")
        assert len(str(info.value)) < 200
    # The endpoint is normalised, and must be the one the key names.
    assert (
        RegistryRecord.parse(json.dumps({**good, "endpoint": "grpc://h:1"}), "h:1").endpoint
        == "h:1"
    )
    with pytest.raises(ValueError, match="its key names worker 'h:2', the record h:1"):
        RegistryRecord.parse(record(w).to_json(), "h:2")
    with pytest.raises(ValueError, match="--registry must be a redis:// URL"):
        RegistryConfig(url="http://x")


async def members(r: RouterUnderTest) -> dict[str, dict[str, Any]]:
    async with r.http.get(r.url + "/admin/workers", headers=AUTH) as resp:
        return {w["endpoint"]: w for w in (await resp.json())["workers"]}


async def until(r: RouterUnderTest, condition: Any, what: str, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(await members(r)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {await members(r)}")
        await asyncio.sleep(0.05)


def test_registry_membership_with_fakes(
    model_dir: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = FakeWorker(), FakeWorker()
    other = FakeWorker(model="other-model")
    db = redis_server.client()
    request = {"input_ids": [1], "sampling_params": {"max_new_tokens": 2}}

    def register(w: FakeWorker, draining: bool = False) -> None:
        rec = record(w, draining)
        db.set(rec.key("pdserve"), rec.to_json(), px=60_000)

    async def body() -> None:
        for w in (a, b, other):
            await w.start()
        register(a)
        try:
            async with router_for(
                model_dir,
                policy="round_robin",
                admin_key=KEY,
                health=HealthConfig(check_interval_s=0.1),
                registry=RegistryConfig(redis_server.url, poll_interval_s=0.05, resync_grace_s=1),
            ) as r:
                await scenario(r)
        finally:
            for w in (a, b, other):
                await w.stop()

    async def scenario(r: RouterUnderTest) -> None:
        # Started with no static worker: it waited for a's record.
        assert [(e, w["source"]) for e, w in (await members(r)).items()] == [
            (a.endpoint, "registry")
        ]
        # Another model is refused (logged once, naming both), a compatible worker joins.
        register(other)
        register(b)
        await until(r, lambda m: b.endpoint in m, "b to join")
        await asyncio.sleep(0.3)
        assert other.endpoint not in await members(r)
        refusals = [m for m in caplog.messages if "refusing registered worker" in m]
        assert len(refusals) == 1
        assert "'other-model'" in refusals[0] and "'tiny'" in refusals[0]
        for _ in range(4):
            assert (await r.post("/generate", request))[0] == 200
        assert len(a.requests) == len(b.requests) == 2
        # draining: true takes b out of rotation; false brings it back.
        register(b, draining=True)
        await until(r, lambda m: m[b.endpoint]["draining"], "b draining")
        for _ in range(2):
            assert (await r.post("/generate", request))[0] == 200
        assert len(b.requests) == 2
        register(b)
        await until(r, lambda m: not m[b.endpoint]["draining"], "b back")
        # A deleted (or expired) record: the worker leaves.
        db.delete(record(a).key("pdserve"))
        await until(r, lambda m: list(m) == [b.endpoint], "a to leave")
        register(a)
        await until(r, lambda m: a.endpoint in m, "a to come back")

        # Redis down: nothing is removed, requests go on.
        redis_server.stop()
        await asyncio.sleep(1.5)  # longer than the resync grace
        assert set(await members(r)) == {a.endpoint, b.endpoint}
        for _ in range(2):
            assert (await r.post("/generate", request))[0] == 200
        async with r.http.get(r.url + "/metrics") as resp:
            assert 'pdserve:router_registry_up{model_name="tiny"} 0.0' in await resp.text()
        # Redis back, empty: only b re-registers. a stays through the grace, then leaves.
        redis_server.start()
        start = time.monotonic()
        register(b)
        await asyncio.sleep(0.5)
        assert set(await members(r)) == {a.endpoint, b.endpoint}
        await until(r, lambda m: list(m) == [b.endpoint], "a to leave after the grace")
        assert time.monotonic() - start >= 1.0

    with caplog.at_level(logging.INFO, logger="router"):
        run(body(), timeout_s=30)


def test_registry_refuses_another_kv_layout(
    model_dir: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefill = FakeWorker(role="prefill", fingerprint="bf16-ps16-aaaa")
    alien = FakeWorker(role="decode", fingerprint="bf16-ps32-bbbb")
    decode = FakeWorker(role="decode", fingerprint="bf16-ps16-aaaa")
    db = redis_server.client()

    async def body() -> None:
        for w in (alien, decode):
            await w.start()
            rec = record(w)
            db.set(rec.key("pdserve"), rec.to_json(), px=60_000)
        try:
            async with router_for(
                model_dir,
                prefill=(prefill,),
                admin_key=KEY,
                registry=RegistryConfig(redis_server.url, poll_interval_s=0.05),
            ) as r:
                assert set(await members(r)) == {prefill.endpoint, decode.endpoint}
                status, _ = await r.post("/generate", {"input_ids": [1]})
                assert status == 200 and len(decode.requests) == 1
        finally:
            for w in (alien, decode):
                await w.stop()
        (refusal,) = [m for m in caplog.messages if "refusing registered worker" in m]
        assert "'bf16-ps32-bbbb'" in refusal and "'bf16-ps16-aaaa'" in refusal
        assert alien.endpoint in refusal and prefill.endpoint in refusal

    with caplog.at_level(logging.INFO, logger="router"):
        run(body())


def test_bad_registry_keys_are_skipped_and_logged_once(
    model_dir: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Records a worker would never write: each is ignored, logged once however many polls
    see it, and none stops the registry from following the good ones."""
    a, b = FakeWorker(), FakeWorker()
    db = redis_server.client()
    request = {"input_ids": [1], "sampling_params": {"max_new_tokens": 2}}

    async def body() -> None:
        for w in (a, b):
            await w.start()
        good = json.loads(record(a).to_json())
        db.set(record(a).key("pdserve"), record(a).to_json())
        bad = {
            b"pdserve:worker:json": b"{not json",
            b"pdserve:worker:big": json.dumps(list(range(200_000))).encode(),
            b"pdserve:worker:\xff\xfe": record(a).to_json().encode(),
            b"pdserve:worker:list": json.dumps({**good, "endpoint": ["a"]}).encode(),
            b"pdserve:worker:evil": json.dumps({**good, "draining": True}).encode(),
            record(b).key("pdserve").encode(): json.dumps({**good, "endpoint": b.endpoint,
                                                           "draining": "false"}).encode(),
        }  # fmt: skip
        for key, value in bad.items():
            db.set(key, value)
        db.hset("pdserve:worker:hash", "a", "b")
        try:
            async with router_for(
                model_dir,
                policy="round_robin",
                admin_key=KEY,
                registry=RegistryConfig(redis_server.url, poll_interval_s=0.05, resync_grace_s=0),
            ) as r:
                await asyncio.sleep(0.5)  # about ten polls
                assert {e: w["draining"] for e, w in (await members(r)).items()} == {
                    a.endpoint: False
                }
                assert (await r.post("/generate", request))[0] == 200
                # The registry still follows: b's fixed record joins, a's deleted one leaves.
                db.set(record(b).key("pdserve"), record(b).to_json())
                await until(r, lambda m: b.endpoint in m, "b to join")
                # A member's record that changes its role: logged once, the member stays as it is.
                db.set(record(a).key("pdserve"), json.dumps({**good, "role": "decode"}))
                await asyncio.sleep(0.3)
                assert (await members(r))[a.endpoint]["role"] == "null"
                db.delete(record(a).key("pdserve"))
                await until(r, lambda m: list(m) == [b.endpoint], "a to leave")
                async with r.http.get(r.url + "/metrics") as resp:
                    assert resp.status == 200
        finally:
            for w in (a, b):
                await w.stop()
        ignored = [m for m in caplog.messages if m.startswith("ignoring registry key")]
        assert len(ignored) == len(bad), ignored
        assert all(len(m) < 300 for m in ignored)
        assert not [m for m in caplog.messages if "registry poll failed" in m]
        (conflict,) = [m for m in caplog.messages if "its registry record says decode" in m]
        assert f"worker {a.endpoint} is in the pool as null" in conflict

    with caplog.at_level(logging.INFO, logger="router"):
        run(body(), timeout_s=30)


# ---- real workers registering themselves -----------------------------------------------------

MODEL = "qwen3-moe"
REQUEST = {"text": "Hello", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}


def admin_workers(url: str) -> dict[str, dict[str, Any]]:
    status, body = call(url + "/admin/workers", headers=AUTH)
    assert status == 200, body
    return {w["endpoint"]: w for w in body["workers"]}


def test_registered_workers_join_serve_and_leave(
    tiny_models: dict[str, Path], redis_server: RedisServer
) -> None:
    model_dir = tiny_models[MODEL]
    registry = ("--registry", redis_server.url, "--registry-ttl", "2")
    with ExitStack() as stack:
        _, w1 = stack.enter_context(worker("null", model_dir, *registry))
        _, url = stack.enter_context(
            router_process(model_dir, "--registry", redis_server.url, "--admin-key", KEY,
                           "--registry-poll-interval", "0.2", "--policy", "round_robin")
        )  # fmt: skip
        assert [(e, w["source"]) for e, w in admin_workers(url).items()] == [(w1, "registry")]
        assert call(url + "/generate", "POST", REQUEST)[0] == 200
        child2, w2 = stack.enter_context(worker("null", model_dir, *registry))
        wait_until(lambda: w2 in admin_workers(url), 3, "the second worker to join")
        for _ in range(4):
            assert call(url + "/generate", "POST", REQUEST)[0] == 200
        decisions = f'pdserve:router_policy_decisions_total{{policy="round_robin",role="null",worker="{w2}"}}'  # noqa: E501
        assert metric(url, decisions) >= 2  # requests reach the new worker
        child2.proc.kill()  # no chance to deregister: its record expires after the TTL
        took = wait_until(lambda: w2 not in admin_workers(url), 6, "the dead worker to leave")
        assert took <= 2 + 0.2 + 1.5  # TTL + poll interval + slack
        for _ in range(3):
            assert call(url + "/generate", "POST", REQUEST)[0] == 200


def test_redis_restart_under_load(tiny_models: dict[str, Path], redis_server: RedisServer) -> None:
    """Requests keep succeeding while Redis is down and restarts (empty); a worker killed
    during the outage leaves after it, the live one re-registers and stays."""
    model_dir = tiny_models[MODEL]
    registry = ("--registry", redis_server.url, "--registry-ttl", "3")  # refresh every 1 s
    with ExitStack() as stack:
        [(_, w1), (child2, w2)] = stack.enter_context(
            workers(model_dir, ("null", *registry), ("null", *registry))
        )
        _, url = stack.enter_context(
            router_process(model_dir, "--registry", redis_server.url, "--admin-key", KEY,
                           "--registry-poll-interval", "0.2", "--registry-resync-grace", "2",
                           "--health-check-interval", "0.5", "--policy", "round_robin")
        )  # fmt: skip
        wait_until(lambda: set(admin_workers(url)) == {w1, w2}, 5, "both workers")
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set() and len(statuses) < 1000:
                statuses.append(call(url + "/generate", "POST", REQUEST)[0])

        loader = threading.Thread(target=load)
        loader.start()
        try:
            time.sleep(0.5)
            redis_server.stop()
            time.sleep(0.5)
            child2.proc.kill()  # during the outage: its record cannot expire now
            time.sleep(1.5)
            assert set(admin_workers(url)) == {w1, w2}  # no removals while Redis is down
            redis_server.start()
            db = redis_server.client()
            wait_until(lambda: db.exists(f"pdserve:worker:{w1}"), 2, "w1 to re-register")
            wait_until(lambda: set(admin_workers(url)) == {w1}, 5, "the dead worker to leave")
            time.sleep(0.5)
        finally:
            stop.set()
            loader.join(timeout=30)
        assert len(statuses) >= 10 and set(statuses) == {200}, statuses
        assert set(admin_workers(url)) == {w1}


def test_no_registered_worker_refuses_to_start(model_dir: Path, redis_server: RedisServer) -> None:
    async def body() -> None:
        config = RouterConfig(
            str(model_dir),
            port=0,
            startup_timeout_s=0.5,
            registry=RegistryConfig(redis_server.url, poll_interval_s=0.1),
        )
        with pytest.raises(RuntimeError, match="no usable worker registered in redis://"):
            await serve(config)

    run(body())
