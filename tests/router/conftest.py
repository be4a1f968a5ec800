"""Fixtures of the router tests: the tiny tokenizer, and a router in front of fake workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from engine.testing.tiny_models import write_tokenizer
from engine.tokenizer import Tokenizer
from router.app.server import RouterServer, serve
from router.config import RouterConfig
from tests.router.fake_worker import FakeWorker

T = TypeVar("T")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory with only the tiny tokenizer (the router never loads weights)."""
    return write_tokenizer(tmp_path_factory.mktemp("router-tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    """Run an async test body with a hard time limit."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


@dataclass
class RouterUnderTest:
    url: str
    http: aiohttp.ClientSession
    server: RouterServer

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    async def sse(self, path: str, body: Any) -> tuple[int, list[Any]]:
        """POST and read the whole SSE stream: the decoded events, ``"[DONE]"`` kept as is."""
        events: list[Any] = []
        async with self.http.post(self.url + path, json=body) as resp:
            if resp.content_type != "text/event-stream":
                return resp.status, [await resp.json(content_type=None)]
            raw = (await resp.read()).decode()
        for block in raw.split("\n\n"):
            if not block:
                continue
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
        return resp.status, events


@contextlib.asynccontextmanager
async def router_for(
    model_dir: Path,
    workers: tuple[FakeWorker, ...] = (),
    prefill: tuple[FakeWorker, ...] = (),
    decode: tuple[FakeWorker, ...] = (),
    **config: Any,
) -> AsyncIterator[RouterUnderTest]:
    """Start the fake workers and a router in front of them; stop everything afterwards."""
    fakes = (*workers, *prefill, *decode)
    for fake in fakes:
        await fake.start()
    try:
        server, url = await serve(
            RouterConfig(
                model_path=str(model_dir),
                workers=tuple(w.endpoint for w in workers),
                prefill=tuple(w.endpoint for w in prefill),
                decode=tuple(w.endpoint for w in decode),
                port=0,
                startup_timeout_s=5.0,
                **config,
            )
        )
        try:
            async with aiohttp.ClientSession() as http:
                yield RouterUnderTest(url, http, server)
        finally:
            await server.close()
    finally:
        for fake in fakes:
            await fake.stop()
