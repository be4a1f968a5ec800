"""Retries, migration, health checks and circuit breaking: the pure pieces alone, then the
router in front of in-process fake workers (fast, scripted failures). The same paths against
real worker processes killed mid-request are in test_failover.py."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos import common_pb2
from router.client.dispatch import (
    MAX_BACKOFF_S,
    RetryConfig,
    backoff_delay,
    generate,
)
from router.client.errors import NoUsableWorker, WorkerError
from router.client.session import Finished, TokenChunk, WorkerEvent, WorkerRequest
from router.fleet.breaker import CircuitBreaker, CircuitState
from router.fleet.health import HealthConfig
from tests.router.conftest import router_for, run
from tests.router.fake_worker import EOS, Failure, FakeWorker

FAST_HEALTH = HealthConfig(check_interval_s=0.1, check_timeout_s=0.5, open_timeout_s=0.5)

# ---- the circuit breaker --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_state_machine() -> None:
    clock = Clock()
    config = HealthConfig(failure_threshold=3, open_timeout_s=10, success_threshold=2)
    cb = CircuitBreaker(config, clock)
    assert cb.state is CircuitState.CLOSED and cb.allows()
    # Failures must be consecutive: a success in between starts the count again.
    cb.record_failure()
    cb.record_failure()
    cb.record_success()
    cb.record_failure()
    cb.record_success(probe=True)  # a health check passing does not hide request failures
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED
    cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.allows()
    # Open: successes of requests that started before are ignored; the timeout rules.
    cb.record_success()
    clock.now += 9.9
    assert cb.state is CircuitState.OPEN
    clock.now += 0.1
    assert cb.state is CircuitState.HALF_OPEN and cb.allows()
    # Half-open: one failure reopens (and restarts the timeout).
    cb.record_failure()
    assert cb.state is CircuitState.OPEN
    clock.now += 10
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_success(probe=True)
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_success()
    assert cb.state is CircuitState.CLOSED
    # Closed again with a fresh count.
    cb.record_failure()
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED
    assert [s.gauge for s in CircuitState] == [0, 2, 1]


def test_health_config_validates() -> None:
    with pytest.raises(ValueError, match="--cb-failure-threshold"):
        HealthConfig(failure_threshold=0)
    with pytest.raises(ValueError, match="--health-check-interval"):
        HealthConfig(check_interval_s=0)
    with pytest.raises(ValueError, match="--retry-max"):
        RetryConfig(max_attempts=0)
    with pytest.raises(ValueError, match="--migration-limit"):
        RetryConfig(migration_limit=-1)


# ---- backoff and the retry loop, with scripted routes ----------------------------------------


def test_backoff_schedule() -> None:
    rng = random.Random(7)
    for retry in range(1, 8):
        nominal = min(0.05 * 2 ** (retry - 1), MAX_BACKOFF_S)
        delays = [backoff_delay(retry, 50, rng) for _ in range(200)]
        assert all(nominal / 2 <= d <= nominal for d in delays), retry
        assert max(delays) - min(delays) > nominal / 4  # jittered, not constant
    assert backoff_delay(30, 50, rng) <= MAX_BACKOFF_S
    assert backoff_delay(1, 0, rng) == 0
    with pytest.raises(ValueError, match="start at 1"):
        backoff_delay(0, 50)


@dataclass
class ScriptedRoute:
    """Yields ``tokens`` then fails with ``fail`` (or finishes)."""

    endpoint: str
    tokens: list[int]
    fail: grpc.StatusCode | None = None
    seen: list[WorkerRequest] = field(default_factory=list)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.endpoint,)

    async def stream(self, request: WorkerRequest) -> AsyncGenerator[WorkerEvent, None]:
        self.seen.append(request)
        for t in self.tokens:
            yield TokenChunk((t,), ())
        if self.fail is not None:
            raise WorkerError(self.fail, "scripted", self.endpoint)
        yield Finished("length", len(request.token_ids), len(self.tokens), 0)


@dataclass
class ScriptedRoutes:
    routes: list[ScriptedRoute]
    avoided: list[frozenset[str]] = field(default_factory=list)
    reports: list[tuple[str, grpc.StatusCode | None]] = field(default_factory=list)

    def route(self, token_ids: tuple[int, ...], avoid: Set[str]) -> ScriptedRoute:
        self.avoided.append(frozenset(avoid))
        if not self.routes:
            raise NoUsableWorker("script exhausted")
        return self.routes.pop(0)

    def report(self, route: Any, error: WorkerError | None) -> None:
        self.reports.append((route.endpoint, error.grpc_code if error else None))


async def collect(
    routes: ScriptedRoutes, max_tokens: int = 10, **kw: Any
) -> tuple[list[int], Finished, list[float]]:
    delays: list[float] = []

    async def sleep(s: float) -> None:
        delays.append(s)

    request = WorkerRequest(
        "r", (1, 2), common_pb2.SamplingParams(temperature=0, max_new_tokens=max_tokens)
    )
    tokens: list[int] = []
    finished = None
    async for event in generate(
        routes, request, kw.pop("config", RetryConfig()), sleep=sleep, rng=random.Random(1), **kw
    ):
        if isinstance(event, TokenChunk):
            tokens.extend(event.token_ids)
        else:
            finished = event
    assert finished is not None
    return tokens, finished, delays


def test_retry_then_migrate_counts_and_requests() -> None:
    unavailable = grpc.StatusCode.UNAVAILABLE
    a = ScriptedRoute("a", [], unavailable)  # fails before any token: a retry
    b = ScriptedRoute("b", [10, 11], unavailable)  # fails mid-stream: a migration
    c = ScriptedRoute("c", [12, 13, 14])
    routes = ScriptedRoutes([a, b, c])
    tokens, finished, delays = asyncio.run(collect(routes, max_tokens=5))
    assert tokens == [10, 11, 12, 13, 14]
    assert (finished.prompt_tokens, finished.completion_tokens) == (2, 5)
    # The migrated attempt carries the tokens so far and a reduced budget, under a new id.
    (seen,) = c.seen
    assert seen.token_ids == (1, 2, 10, 11) and seen.sampling.max_new_tokens == 3
    # A constraint replays the tokens delivered so far (the earlier attempts' carry none).
    assert seen.sampling.resumed_output_tokens == 2
    assert [r.sampling.resumed_output_tokens for r in (*a.seen, *b.seen)] == [0, 0]
    assert [r.request_id for r in (*a.seen, *b.seen, *c.seen)] == ["r", "r.1", "r.2"]
    assert routes.avoided == [frozenset(), {"a"}, {"a", "b"}]
    assert routes.reports == [("a", unavailable), ("b", unavailable), ("c", None)]
    assert len(delays) == 2 and 0.025 <= delays[0] <= 0.05 and 0.025 <= delays[1] <= 0.05


def test_retry_budget_and_what_is_not_retried() -> None:
    def failing(n: int, code: grpc.StatusCode) -> ScriptedRoutes:
        return ScriptedRoutes([ScriptedRoute(f"w{i}", [], code) for i in range(n)])

    routes = failing(5, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(WorkerError) as info:
        asyncio.run(collect(routes, config=RetryConfig(max_attempts=3)))
    assert info.value.grpc_code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(routes.routes) == 2  # three attempts in all
    routes = failing(2, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(WorkerError) as info:
        asyncio.run(collect(routes))
    assert info.value.bad_input and len(routes.routes) == 1  # never retried
    # No usable worker left: the last worker error is what the client sees.
    routes = failing(1, grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(WorkerError) as info:
        asyncio.run(collect(routes))
    assert info.value.grpc_code is grpc.StatusCode.UNAVAILABLE
    # Migrations are bounded too.
    mid = [ScriptedRoute(f"m{i}", [i], grpc.StatusCode.UNAVAILABLE) for i in range(5)]
    with pytest.raises(WorkerError):
        asyncio.run(collect(ScriptedRoutes(list(mid)), config=RetryConfig(migration_limit=2)))
    assert [len(r.seen) for r in mid] == [1, 1, 1, 0, 0]


def test_lost_finish_is_not_a_new_attempt() -> None:
    """Every token arrived and only the closing message was lost: no migration."""
    routes = ScriptedRoutes([ScriptedRoute("a", [7, 8, 9], grpc.StatusCode.UNAVAILABLE)])
    tokens, finished, _ = asyncio.run(collect(routes, max_tokens=3))
    assert tokens == [7, 8, 9] and finished.reason == "length"
    routes = ScriptedRoutes([ScriptedRoute("a", [7, EOS], grpc.StatusCode.UNAVAILABLE)])
    tokens, finished, _ = asyncio.run(collect(routes, eos_token_ids=frozenset({EOS})))
    assert tokens == [7, EOS] and finished.reason == "stop"
    assert finished.completion_tokens == 2


# ---- the router over fake workers ------------------------------------------------------------

TOTAL = 40  # the fake model's sequences end at this length


def positional(prompt: list[int]) -> list[int]:
    """A deterministic fake model: the token at position i is 100 + i, up to TOTAL tokens.
    A migrated request (prompt + tokens so far) continues exactly where the first stopped."""
    return [100 + i for i in range(len(prompt), TOTAL)]


async def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def native(max_new: int = 50) -> dict[str, Any]:
    return {
        "input_ids": [1, 2, 3],
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new},
    }


EXPECTED = [*range(103, TOTAL + 100), EOS]


def test_colocated_migration_mid_stream(model_dir: Path) -> None:
    dying = FakeWorker(reply=positional, fail=Failure(grpc.StatusCode.UNAVAILABLE, after_tokens=3))
    healthy = FakeWorker(reply=positional)

    async def body() -> None:
        async with router_for(model_dir, workers=(dying, healthy), policy="round_robin") as r:
            status, events = await r.sse("/generate", {**native(), "stream": True})
            assert status == 200 and events[-1] == "[DONE]"
            last = events[-2]
            assert last["output_ids"] == EXPECTED
            assert last["meta_info"]["prompt_tokens"] == 3
            assert last["meta_info"]["completion_tokens"] == len(EXPECTED)
            (moved,) = healthy.requests
            assert list(moved.token_ids) == [1, 2, 3, 103, 104, 105]
            assert moved.sampling.max_new_tokens == 47
            # The worker's error ended the request there: nothing is left running, and no
            # abort was needed.
            await wait_for(lambda: dying.running == 0)
            assert dying.aborts == []
            async with r.http.get(r.url + "/metrics") as resp:
                text = await resp.text()
            assert (
                'pdserve:router_migrations_total{code="UNAVAILABLE",model_name="tiny"} 1.0' in text
            )

    run(body())


def test_disaggregated_retry_and_migration(model_dir: Path) -> None:
    bad_prefill = FakeWorker(
        role="prefill", fail=Failure(grpc.StatusCode.UNAVAILABLE, "prefill lost")
    )
    prefill = FakeWorker(role="prefill")
    dying = FakeWorker(
        role="decode",
        reply=positional,
        fail=Failure(grpc.StatusCode.UNAVAILABLE, "decode lost", after_tokens=5),
    )
    decode = FakeWorker(role="decode", reply=positional)

    async def body() -> None:
        async with router_for(
            model_dir,
            prefill=(bad_prefill, prefill),
            decode=(decode, dying),
            policy="round_robin",
        ) as r:
            status, reply = await r.post("/generate", native())
            assert status == 200 and reply["output_ids"] == EXPECTED
        # Attempt 1: bad prefill + decode: the prefill fails, so it is retried on the other
        # prefill (round robin gives the dying decode), which dies after 5 tokens: migrated
        # to the other decode with prompt + 5 tokens. Each attempt has its own transfer id.
        assert len(bad_prefill.requests) == 1 and len(prefill.requests) == 2
        assert len(decode.requests) == 2 and len(dying.requests) == 1
        tids = [*decode.transfer_ids, *dying.transfer_ids]
        assert len(set(tids)) == 3 and 0 not in tids
        assert list(decode.requests[1].token_ids) == [1, 2, 3, *range(103, 108)]
        assert decode.requests[1].sampling.max_new_tokens == 45
        # The failed prefill ended the first attempt there; its decode side was aborted.
        first = bad_prefill.requests[0].request_id
        await wait_for(lambda: first in decode.aborts and decode.running == 0)
        assert bad_prefill.aborts == []

    run(body())


def test_bad_input_is_not_retried(model_dir: Path) -> None:
    bad = FakeWorker(fail=Failure(grpc.StatusCode.INVALID_ARGUMENT, "token 7 is bad"))
    other = FakeWorker()

    async def body() -> None:
        async with router_for(model_dir, workers=(bad, other), policy="round_robin") as r:
            status, reply = await r.post("/generate", native())
            assert status == 400 and "token 7 is bad" in reply["error"]["message"]
        assert len(bad.requests) == 1 and not other.requests

    run(body())


def test_circuit_opens_excludes_and_recovers(model_dir: Path) -> None:
    flaky = FakeWorker(fail=Failure(grpc.StatusCode.UNAVAILABLE, after_tokens=-1))
    steady = FakeWorker()

    async def body() -> None:
        async with router_for(
            model_dir,
            workers=(flaky, steady),
            policy="round_robin",
            health=HealthConfig(check_interval_s=0.1, open_timeout_s=1.5),
            admin_key="k",
        ) as r:
            for _ in range(8):
                status, _ = await r.post("/generate", native(3))
                assert status == 200  # each failure was retried on the steady worker
            # Three consecutive failures opened the circuit; then the flaky one got nothing.
            assert len(flaky.requests) == 3
            workers = await admin_workers(r)
            assert workers[flaky.endpoint]["circuit"] == "open"
            assert not workers[flaky.endpoint]["usable"]
            assert workers[steady.endpoint]["circuit"] == "closed"
            # Fixed: after --cb-open-timeout it half-opens, health checks close it.
            flaky.fail = None
            await until(r, flaky.endpoint, "circuit", "closed")
            for _ in range(4):
                await r.post("/generate", native(3))
            assert len(flaky.requests) > 3
            async with r.http.get(r.url + "/metrics") as resp:
                text = await resp.text()
            assert (
                'pdserve:router_worker_healthy{model_name="tiny",role="null",'
                f'worker="{flaky.endpoint}"}} 1.0' in text
            )
            assert "pdserve:router_retries_total" in text

    run(body())


def test_health_is_unavailable_while_no_circuit_is_closed(model_dir: Path) -> None:
    """/health said ok while the only worker's circuit was open and every request got 503."""
    flaky = FakeWorker(fail=Failure(grpc.StatusCode.UNAVAILABLE, after_tokens=-1))

    async def body() -> None:
        async with router_for(
            model_dir, workers=(flaky,), health=HealthConfig(check_interval_s=0.1)
        ) as r:
            for _ in range(3):
                assert (await r.post("/generate", native(3)))[0] == 503
            async with r.http.get(r.url + "/health") as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "unavailable"

    run(body())


def test_a_hung_prefill_worker_is_blamed_not_its_decode_worker(model_dir: Path) -> None:
    """Issue 20, bug 2: the decode worker reports that the KV never came, naming the prefill
    worker; the router charges that worker. The one decode worker's circuit stays closed, so
    no request gets a 503."""
    hung = FakeWorker(role="prefill", token_delay_s=60)
    good = FakeWorker(role="prefill")
    decode = FakeWorker(role="decode", transfer_timeout_s=0.2)

    async def body() -> None:
        async with router_for(
            model_dir,
            prefill=(hung, good),
            decode=(decode,),
            policy="round_robin",
            health=HealthConfig(check_interval_s=0.1, open_timeout_s=30),
            admin_key="k",
        ) as r:
            for _ in range(8):
                status, _ = await r.post("/generate", native(3))
                assert status == 200  # retried on the good prefill worker
            workers = await admin_workers(r)
            assert workers[decode.endpoint]["circuit"] == "closed"
            assert workers[hung.endpoint]["circuit"] == "open"
            assert workers[good.endpoint]["circuit"] == "closed"

    run(body())


def test_a_worker_restarted_as_something_else_is_kept_out(model_dir: Path) -> None:
    """Issue 20, bug 5: a static worker restarted on its address is re-read before it gets
    anything: with a smaller context or other weights it stays out (with the reason on
    the admin API's view and in the log); back as it was, it serves again."""
    steady = FakeWorker(reply=positional)
    changing = FakeWorker(reply=positional)

    async def restart(**identity: Any) -> FakeWorker:
        port = int(changing.endpoint.rpartition(":")[2])
        await changing.stop()
        fresh = FakeWorker(reply=positional, port=port, **identity)
        await fresh.start()
        return fresh

    async def body() -> None:
        nonlocal changing
        async with router_for(
            model_dir,
            workers=(steady, changing),
            policy="round_robin",
            # Restarts leave health checks unanswered; the breaker is not what is tested.
            health=HealthConfig(check_interval_s=0.1, failure_threshold=1000),
            admin_key="k",
        ) as r:
            for _ in range(4):
                assert (await r.post("/generate", native(3)))[0] == 200
            assert len(changing.requests) > 0
            for identity in ({"context_length": 32}, {"weights": "w-2"}):
                changing = await restart(instance_id=f"fake-{identity}", **identity)
                await asyncio.sleep(0.5)  # a few health rounds: it answers, it is re-read
                for _ in range(6):
                    assert (await r.post("/generate", native(3)))[0] == 200
                reached = [r.request_id for r in changing.requests]
                assert not reached, f"{identity}: requests reached the restarted worker"
                view = (await admin_workers(r))[changing.endpoint]
                assert view["verified"] is False and not view["usable"]
            changing = await restart(instance_id="fake-3")  # as it was
            await until(r, changing.endpoint, "usable", True)  # verified and healthy again
            for _ in range(4):
                assert (await r.post("/generate", native(3)))[0] == 200
            assert len(changing.requests) > 0, "the worker back as it was got nothing"
        await changing.stop()

    run(body())


def test_one_unanswered_health_check_does_not_take_a_worker_out(model_dir: Path) -> None:
    """A check that times out once (a pause, here or there) leaves the worker in the pool:
    the router would otherwise turn every worker away at once after a stall of its own.
    Silent `failure_threshold` checks in a row, it is out; answering again, it is back."""
    a = FakeWorker()

    async def body() -> None:
        async with router_for(model_dir, workers=(a,), health=FAST_HEALTH, admin_key="k") as r:
            # Two late checks in a row, one fewer than the threshold: never out meanwhile.
            a.late_health_checks = 2
            deadline = time.monotonic() + 3 * FAST_HEALTH.check_timeout_s + 0.5
            while time.monotonic() < deadline:
                view = (await admin_workers(r))[a.endpoint]
                assert view["health"] == "healthy" and view["usable"], view
                assert (await r.post("/generate", native(3)))[0] == 200
                await asyncio.sleep(0.02)
            assert a.late_health_checks == 0
            a.late_health_checks = 1000
            await until(r, a.endpoint, "health", "unhealthy")
            status, reply = await r.post("/generate", native(3))
            assert status == 503 and reply["error"]["code"] == "no_worker_available"
            a.late_health_checks = 0
            await until(r, a.endpoint, "usable", True)
            assert (await r.post("/generate", native(3)))[0] == 200

    run(body())


def test_unhealthy_workers_are_excluded_and_none_left_is_a_quick_503(model_dir: Path) -> None:
    a, b = FakeWorker(), FakeWorker()

    async def body() -> None:
        async with router_for(
            model_dir, workers=(a, b), policy="round_robin", health=FAST_HEALTH, admin_key="k"
        ) as r:
            await a.set_serving(False)
            await until(r, a.endpoint, "health", "unhealthy")
            for _ in range(4):
                assert (await r.post("/generate", native(3)))[0] == 200
            assert not a.requests and len(b.requests) == 4
            await b.set_serving(False)
            await until(r, b.endpoint, "health", "unhealthy")
            started = time.monotonic()
            status, reply = await r.post("/generate", native(3))
            assert status == 503 and reply["error"]["code"] == "no_worker_available"
            assert a.endpoint in reply["error"]["message"]
            assert time.monotonic() - started < 1.0
            await a.set_serving(True)
            await until(r, a.endpoint, "health", "healthy")
            assert (await r.post("/generate", native(3)))[0] == 200

    run(body())


async def admin_workers(r: Any) -> dict[str, dict[str, Any]]:
    async with r.http.get(r.url + "/admin/workers", headers={"Authorization": "Bearer k"}) as resp:
        assert resp.status == 200
        return {w["endpoint"]: w for w in (await resp.json())["workers"]}


async def until(r: Any, endpoint: str, key: str, value: Any, timeout_s: float = 5.0) -> None:
    """Wait until the admin API shows ``key == value`` for the worker ``endpoint``."""
    deadline = time.monotonic() + timeout_s
    while (await admin_workers(r))[endpoint][key] != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{endpoint}: {key} never became {value!r}")
        await asyncio.sleep(0.05)
