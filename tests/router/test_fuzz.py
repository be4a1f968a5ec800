"""Property-based fuzzing of the router's HTTP API (hypothesis): bodies shaped like the OpenAI
and SGLang requests, with every field drawn from valid values, wrong types, extremes and
arbitrary JSON, and bodies that are not JSON at all. The router runs as a process in front of
an in-process fake worker. Whatever comes in: never a 5xx, an OpenAI-style error body for
every 4xx, the process alive, and its memory bounded."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.router.fake_worker import FakeWorker  # noqa: E402
from tests.router.procs import router_process  # noqa: E402

# Per endpoint: a few seconds in CI; PDSERVE_FUZZ_EXAMPLES=2000 for a longer run.
EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "100"))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
token_ids = st.lists(st.integers(min_value=-5, max_value=600), max_size=30)
small_ints = st.integers(min_value=-3, max_value=70) | st.integers(
    min_value=-(1 << 64), max_value=1 << 64
)
numbers = st.floats(min_value=-3, max_value=3, allow_nan=False) | st.integers(-2, 3)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: mostly plausible, sometimes anything at all."""
    return st.one_of(valid, valid, json_values)


messages = st.lists(
    st.fixed_dictionaries(
        {"role": field(st.sampled_from(["system", "user", "assistant", "tool", "developer"]))},
        optional={
            "content": field(
                st.text(max_size=60)
                | st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                    max_size=3,
                )
            ),
            "name": json_values,
            "tool_calls": json_values,
        },
    ),
    max_size=4,
)
sampling = {
    "max_tokens": field(small_ints),
    "temperature": field(numbers),
    "top_p": field(numbers),
    "top_k": field(small_ints),
    "min_p": field(numbers),
    "n": field(small_ints),
    "seed": field(small_ints),
    "stop": field(st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": field(st.booleans() | small_ints),
    "top_logprobs": field(small_ints),
    "presence_penalty": field(numbers),
    "frequency_penalty": field(numbers),
    "ignore_eos": field(st.booleans()),
    "stop_token_ids": field(token_ids),
    "echo": json_values,
    "best_of": json_values,
    "logit_bias": json_values,
    "response_format": json_values,
    "tools": json_values,
    "tool_choice": json_values,
    "user": json_values,
}
completion = st.fixed_dictionaries(
    {"model": field(st.just("tiny"))},
    optional={
        "prompt": field(
            st.text(max_size=80)
            | token_ids
            | st.lists(st.text(max_size=20), max_size=4)
            | st.lists(token_ids, max_size=3)
        ),
        **sampling,
    },
)
chat = st.fixed_dictionaries(
    {"model": field(st.just("tiny")), "messages": field(messages)},
    optional={**sampling, "chat_template_kwargs": json_values},
)
generate = st.fixed_dictionaries(
    {},
    optional={
        "text": field(st.text(max_size=80)),
        "input_ids": field(token_ids),
        "sampling_params": field(st.fixed_dictionaries({}, optional=sampling)),
        "stream": field(st.booleans()),
        "return_logprob": field(st.booleans()),
    },
)
raw_bodies = st.binary(max_size=200) | st.text(max_size=200).map(str.encode)


@pytest.fixture(scope="module")
def router(model_dir: Path) -> Iterator[tuple[str, int]]:
    """(router URL, router pid) in front of a fake worker served from a background loop."""
    loop = asyncio.new_event_loop()
    worker = FakeWorker()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(worker.start(), loop).result(10)
    try:
        with router_process(model_dir, "--worker", worker.endpoint) as (child, url):
            yield url, child.proc.pid
    finally:
        asyncio.run_coroutine_threadsafe(worker.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def post(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check(status: int, payload: bytes) -> None:
    assert status < 500, (status, payload[:300])
    if status >= 400:
        error = json.loads(payload)["error"]
        assert error["message"] and error["type"], payload[:300]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.mark.parametrize(
    ("path", "bodies"),
    [("/v1/completions", completion), ("/v1/chat/completions", chat), ("/generate", generate)],
)
def test_fuzzed_bodies_get_no_5xx(router: tuple[str, int], path: str, bodies: Any) -> None:
    url, pid = router
    before = rss_mb(pid)

    @FUZZ
    @given(body=bodies)
    def one(body: dict[str, Any]) -> None:
        check(*post(url, path, json.dumps(body).encode()))

    one()
    # Still serving, and its memory did not grow without bound.
    status, _ = post(url, "/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}')
    assert status == 200
    assert rss_mb(pid) - before < 64


def test_fuzzed_raw_bytes_get_4xx(router: tuple[str, int]) -> None:
    url, _ = router

    @FUZZ
    @given(body=raw_bodies)
    def one(body: bytes) -> None:
        status, payload = post(url, "/v1/completions", body)
        check(status, payload)

    one()
