"""The whole path through the launcher: HTTP router, gRPC workers, Mooncake KV transfer."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cluster.local import LocalCluster, LocalClusterSpec
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.e2e.procs import WORKER_FLAGS
from tests.e2e.test_workers import load, wait_pages_free

MODEL = "qwen3-moe"
MAX_NEW = 12
SHARED = "The decode worker reserves pages for the prompt and "
PROMPTS = [
    "Hi",
    "A prefill worker computes the KV cache of a long prompt, page by page, and then",
    SHARED + "waits",
    SHARED + "tells the prefill worker where to write them, and then it",
    SHARED + "streams tokens",
    "Radix trees share prefixes",
]


def post(url: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sse_text(raw: bytes) -> str:
    """Concatenated text deltas of a /v1/completions SSE stream."""
    text = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


@pytest.fixture(scope="module")
def offline(tiny_models: dict[str, Path]) -> list[tuple[list[int], str]]:
    engine = Engine(EngineConfig(model_path=str(tiny_models[MODEL]), max_total_tokens=2048))
    results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW))
    return [(r.output_ids, r.text or "") for r in results]


def start_cluster(model_dir: Path, colocated: bool, log_dir: Path) -> LocalCluster:
    spec = LocalClusterSpec(
        model_path=str(model_dir),
        colocated=colocated,
        port=0,  # the router picks a free one (a port chosen here can be taken by a worker)
        engine_args=WORKER_FLAGS,
        log_dir=str(log_dir),
    )
    return LocalCluster(spec).start()


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def cluster(
    request: pytest.FixtureRequest,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalCluster]:
    c = start_cluster(
        tiny_models[MODEL], request.param == "colocated", tmp_path_factory.mktemp("logs")
    )
    yield c
    c.stop()


def test_concurrent_requests_match_offline(
    cluster: LocalCluster, offline: list[tuple[list[int], str]]
) -> None:
    def native(prompt: str) -> list[int]:
        status, body = post(
            cluster.url + "/generate",
            {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW}},
        )
        assert status == 200, body
        ids: list[int] = json.loads(body)["output_ids"]
        return ids

    def streamed(prompt: str) -> str:
        status, body = post(
            cluster.url + "/v1/completions",
            {"model": MODEL, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0,
             "stream": True},
        )  # fmt: skip
        assert status == 200, body
        return sse_text(body)

    with ThreadPoolExecutor(max_workers=2 * len(PROMPTS)) as pool:
        ids = list(pool.map(native, PROMPTS))
        texts = list(pool.map(streamed, PROMPTS))
    assert ids == [o[0] for o in offline]
    assert texts == [o[1] for o in offline]

    async def balance() -> None:
        for kind, endpoints in cluster.workers.items():
            for endpoint in endpoints:
                await wait_pages_free(endpoint, prefill=kind == "prefill")

    asyncio.run(balance())


def test_prefill_worker_killed(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """With its prefill worker dead, a request ends in a clear 503; the decode worker stays
    up and holds no pages. (Retrying on another pair is the router issue's job.)"""
    cluster = start_cluster(tiny_models[MODEL], colocated=False, log_dir=tmp_path)
    try:
        prefill = cluster.child("prefill-0")
        prefill.proc.kill()
        prefill.proc.wait(timeout=10)
        status, body = post(
            cluster.url + "/v1/completions",
            {"model": MODEL, "prompt": "Hello there", "max_tokens": 8},
        )
        assert status == 503, body
        error = json.loads(body)["error"]
        assert error["message"] and error["type"]
        decode = cluster.workers["decode"][0]
        asyncio.run(wait_pages_free(decode))
        report = asyncio.run(load(decode))
        assert report.num_transferring == 0
        assert "decode-1" not in cluster.dead_children()
    finally:
        cluster.stop()
