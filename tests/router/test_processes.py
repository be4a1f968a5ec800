"""``--processes N``: router processes sharing one port, with metrics summed over all of
them, admin changes reaching all of them, and a dead one started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp

from engine.tokenizer import Tokenizer
from tests.router.conftest import run
from tests.router.fake_worker import FakeWorker
from tests.router.test_server import fake

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key"


async def start_router(model_dir: Path, endpoint: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--model-path", str(model_dir), "--worker", endpoint,
        "--port", "0", "--processes", "2", "--admin-key", KEY, "--policy", "round_robin",
        "--startup-timeout", "10",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    ready = json.loads(line)
    assert ready["event"] == "ready" and ready["processes"] == 2, ready
    return proc, ready["url"]


async def children(pid: int) -> list[int]:
    out = await asyncio.create_subprocess_exec(
        "pgrep", "-P", str(pid), stdout=asyncio.subprocess.PIPE
    )
    text, _ = await out.communicate()
    return [int(p) for p in text.split()]


async def listed(url: str) -> set[str]:
    """The workers one router process lists (a new connection: any of them may answer)."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
        http.get(url + "/admin/workers") as resp,
    ):
        return {x["endpoint"] for x in (await resp.json())["workers"]}


async def completion(url: str) -> tuple[int, dict[str, object]]:
    # A new connection each time, so that the kernel spreads them over the processes.
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}) as resp,
    ):
        return resp.status, await resp.json()


def test_processes_share_port_metrics_and_admin(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer, text="Hello")
    extra = FakeWorker(reply=lambda p: [65])

    async def body() -> None:
        await w.start()
        await extra.start()
        proc, url = await start_router(model_dir, w.endpoint)
        try:
            replies = await asyncio.gather(*(completion(url) for _ in range(24)))
            assert all(status == 200 for status, _ in replies)
            assert {r["choices"][0]["text"] for _, r in replies} == {"Hello"}  # type: ignore[index]
            # Request ids carry their process's prefix: both processes served.
            prefixes = {r.request_id[:17] for r in w.requests}
            assert len(prefixes) == 2, prefixes
            auth = {"Authorization": f"Bearer {KEY}"}
            async with aiohttp.ClientSession() as http:
                # /metrics sums every process, whichever answers.
                for _ in range(4):
                    async with http.get(url + "/metrics") as resp:
                        text = await resp.text()
                    assert (
                        'pdserve:router_requests_total{endpoint="/v1/completions",'
                        'model_name="tiny",status="200"} '
                        "24.0" in text
                    )
                # An admin change made through one process is in every process.
                add = {"url": extra.endpoint, "role": "null"}
                async with http.post(url + "/admin/workers", json=add, headers=auth) as resp:
                    assert resp.status == 201, await resp.text()
            for _ in range(6):
                assert await listed(url) == {w.endpoint, extra.endpoint}

            # A process that dies is started again; requests keep being served meanwhile.
            kids = await children(proc.pid)
            assert len(kids) == 2
            os.kill(kids[0], signal.SIGKILL)
            for _ in range(50):
                await asyncio.sleep(0.2)
                now = await children(proc.pid)
                if len(now) == 2 and kids[0] not in now:
                    break
            else:
                raise AssertionError(f"no new router process: {now}")
            replies = await asyncio.gather(*(completion(url) for _ in range(8)))
            assert all(status == 200 for status, _ in replies)
            # The new process replayed the admin change: every process lists both workers.
            for _ in range(6):
                assert await listed(url) == {w.endpoint, extra.endpoint}
            # A drain with a body that is not UTF-8 (drains ignore their body) is journaled
            # and reaches every process too; an idle worker leaves at once.
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{url}/admin/workers/{extra.endpoint}/drain", data=b"\xff", headers=auth
                ) as resp,
            ):
                assert resp.status == 200, await resp.text()
            for _ in range(6):
                assert await listed(url) == {w.endpoint}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            await w.stop()
            await extra.stop()
        assert await children(proc.pid) == []

    run(body(), timeout_s=90)
