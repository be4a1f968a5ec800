"""Load shedding: --max-concurrent-requests, the bounded queue, 429 with Retry-After."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from router.app.admission import Admission, AdmissionConfig, Overloaded
from tests.router.conftest import router_for, run
from tests.router.fake_worker import FakeWorker


def test_admission_slots_and_queue() -> None:
    async def body() -> None:
        adm = Admission(AdmissionConfig(max_concurrent=1, queue_size=1, queue_timeout_s=5))
        order: list[str] = []
        first = adm.slot()
        await first.__aenter__()

        async def queued(name: str) -> None:
            async with adm.slot():
                order.append(name)

        second = asyncio.create_task(queued("second"))
        await asyncio.sleep(0.01)
        assert adm.waiting == 1
        with pytest.raises(Overloaded) as info:  # the queue is full
            await queued("third")
        err = info.value
        assert err.status == 429 and err.type == "requests" and err.code == "rate_limit_exceeded"
        await first.__aexit__(None, None, None)  # the slot goes to the queued request
        await second
        assert order == ["second"] and adm.running == 0 and adm.waiting == 0

        # A queued request whose client leaves gives its place up.
        first = adm.slot()
        await first.__aenter__()
        leaving = asyncio.create_task(queued("leaving"))
        await asyncio.sleep(0.01)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert adm.waiting == 0
        await first.__aexit__(None, None, None)
        assert adm.running == 0

        # Waiting too long is a 429 too.
        adm = Admission(AdmissionConfig(max_concurrent=1, queue_size=4, queue_timeout_s=0.05))
        async with adm.slot():
            with pytest.raises(Overloaded, match="no capacity within"):
                await queued("late")
        assert adm.running == 0 and adm.waiting == 0

    run(body())


def test_admission_config_validates() -> None:
    with pytest.raises(ValueError, match="--max-concurrent-requests"):
        AdmissionConfig(max_concurrent=0)
    with pytest.raises(ValueError, match="--queue-size"):
        AdmissionConfig(queue_size=-1)


def test_overload_is_a_429_with_retry_after(model_dir: Path) -> None:
    slow = FakeWorker(reply=lambda prompt: [70] * 30, token_delay_s=0.02)
    body_json = {"model": "tiny", "prompt": "x", "max_tokens": 40}

    async def body() -> None:
        async with router_for(
            model_dir,
            workers=(slow,),
            admission=AdmissionConfig(max_concurrent=1, queue_size=0),
        ) as r:
            running = asyncio.create_task(r.sse("/v1/completions", {**body_json, "stream": True}))
            while not slow.running:
                await asyncio.sleep(0.01)
            async with r.http.post(r.url + "/v1/completions", json=body_json) as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "1"
                err = (await resp.json())["error"]
            assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
            assert err["message"]
            client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await client.completions.create(model="tiny", prompt="x", max_tokens=2)
            await client.close()
            status, events = await running
            assert status == 200 and events[-1] == "[DONE]"
            status, _ = await r.post("/v1/completions", body_json)  # capacity is back
            assert status == 200
            async with r.http.get(r.url + "/metrics") as resp:
                text = await resp.text()
        assert (
            'pdserve:router_rejected_requests_total{model_name="tiny",reason="queue_full"} 2.0'
            in text
        )
        assert 'endpoint="/v1/completions",model_name="tiny",status="429"} 2.0' in text
        assert 'pdserve:router_queue_depth{model_name="tiny"} 0.0' in text

    run(body())


def test_queued_request_waits_then_runs_or_times_out(model_dir: Path) -> None:
    slow = FakeWorker(reply=lambda prompt: [70] * 10, token_delay_s=0.03)
    request = {"input_ids": [1], "sampling_params": {"max_new_tokens": 20}}

    async def body() -> None:
        config = AdmissionConfig(max_concurrent=1, queue_size=1, queue_timeout_s=5)
        async with router_for(model_dir, workers=(slow,), admission=config) as r:
            first = asyncio.create_task(r.post("/generate", request))
            while not slow.running:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(r.post("/generate", request))  # queued
            await asyncio.sleep(0.05)
            status, _ = await r.post("/generate", request)  # the queue is full
            assert status == 429
            assert (await first)[0] == 200 and (await second)[0] == 200
        config = AdmissionConfig(max_concurrent=1, queue_size=1, queue_timeout_s=0.1)
        async with router_for(model_dir, workers=(slow,), admission=config) as r:
            first = asyncio.create_task(r.post("/generate", request))
            while not slow.running:
                await asyncio.sleep(0.01)
            status, reply = await r.post("/generate", request)
            assert status == 429 and "0.1s" in reply["error"]["message"]
            assert (await first)[0] == 200

    run(body())
