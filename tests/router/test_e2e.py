"""End to end: a real colocated worker process, the router as a process, HTTP clients.

Greedy outputs through the router equal the offline engine's tokens; the official ``openai``
client works unchanged; bad input gets a 4xx and leaves the worker healthy with every KV page
free again.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import openai
import pytest

from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
MODEL = "qwen3-moe"
PROMPTS = ["The KV cache stores", "héllo wörld 🚀"]


class Process:
    """``python -m <args>`` with its output pumped: stdout lines queued, stderr's tail kept."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: collections.deque[str] = collections.deque(maxlen=100)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, sink in (
            (self.proc.stdout, self.lines.put),
            (self.proc.stderr, self.stderr.append),
        ):
            threading.Thread(target=_pump, args=(stream, sink), daemon=True).start()
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout_s: float = 60.0) -> Process:
        """Wait for the JSON ready line on stdout (RuntimeError with stderr's tail if none)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                self.ready = json.loads(line)
                return self
        self.stop()
        raise RuntimeError(f"{self.args[0]} did not become ready: {''.join(self.stderr)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _pump(stream: IO[str], sink: Callable[[str], None]) -> None:
    for line in stream:
        sink(line)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.testing.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("e2e-models"), [MODEL])[MODEL]


@contextlib.contextmanager
def colocated_worker(model_path: Path, max_total_tokens: int = 8192) -> Iterator[Process]:
    """A colocated worker process, ready."""
    proc = Process(
        ["decode_worker", "--disaggregation-mode", "null", "--model-path", str(model_path),
         "--host", "127.0.0.1", "--port", "0", "--max-total-tokens", str(max_total_tokens)]
    )  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@contextlib.contextmanager
def router_of(model_path: Path, worker: Process, *flags: str) -> Iterator[str]:
    """A router process in front of ``worker``, started with ``flags``; yields its URL."""
    proc = Process(
        ["router", "--model-path", str(model_path), "--worker", worker.ready["endpoint"],
         "--port", "0", *flags]
    )  # fmt: skip
    try:
        yield proc.wait_ready().ready["url"]
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def worker(model_path: Path) -> Iterator[Process]:
    with colocated_worker(model_path) as proc:
        yield proc


@pytest.fixture(scope="module")
def router_url(model_path: Path, worker: Process) -> Iterator[str]:
    with router_of(model_path, worker) as url:
        yield url


@pytest.fixture(scope="module")
def client(router_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=router_url + "/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def disaggregated(model_path: Path) -> Iterator[tuple[Process, Process, str]]:
    """A prefill worker, a decode worker (started together), and a router pairing them."""
    common = ["--model-path", str(model_path), "--port", "0", "--max-total-tokens", "8192"]
    prefill = Process(["prefill_worker", *common])
    decode = Process(["decode_worker", *common])
    try:
        p, d = prefill.wait_ready(), decode.wait_ready()
        router = Process(
            ["router", "--model-path", str(model_path), "--prefill", p.ready["endpoint"],
             "--decode", d.ready["endpoint"], "--port", "0"]
        )  # fmt: skip
        try:
            yield p, d, router.wait_ready().ready["url"]
        finally:
            router.stop()
    finally:
        prefill.stop()
        decode.stop()


@pytest.fixture(scope="module")
def offline(model_path: Path) -> list[Any]:
    """The offline engine's greedy results for PROMPTS (the reference every path must match)."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling import SamplingParams

    engine = Engine(EngineConfig(model_path=str(model_path), max_total_tokens=2048))
    return engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))


def load(worker: Process) -> common_pb2.LoadReport:
    with grpc.insecure_channel(worker.ready["endpoint"]) as channel:
        request = common_pb2.LoadRequest()
        if worker.ready["role"] == "prefill":
            report: common_pb2.LoadReport = prefill_pb2_grpc.PrefillStub(channel).GetLoad(
                request, timeout=5
            )
        else:
            report = decode_pb2_grpc.DecodeStub(channel).GetLoad(request, timeout=5)
        return report


def wait_idle(worker: Process, timeout_s: float = 10.0) -> None:
    """No request running or waiting, and every page free or reclaimable."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = load(worker)
        if r.num_running == r.num_waiting == 0 and r.num_free_pages == r.num_total_pages:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker not idle: {r}")
        time.sleep(0.05)


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def test_greedy_tokens_equal_offline_engine(
    client: openai.OpenAI, router_url: str, offline: list[Any]
) -> None:
    check_greedy(client, router_url, offline)


def check_greedy(client: openai.OpenAI, router_url: str, offline: list[Any]) -> None:
    for prompt, expected in zip(PROMPTS, offline, strict=True):
        native = post(
            router_url + "/generate",
            {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 12}},
        )
        assert native["output_ids"] == expected.output_ids
        assert native["text"] == expected.text
        done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert done.choices[0].text == expected.text
        assert done.usage is not None and done.usage.completion_tokens == len(expected.output_ids)
        # Token ids in, same tokens out; and streaming gives the same text.
        by_ids = client.completions.create(
            model=MODEL, prompt=expected.prompt_ids, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in by_ids) == expected.text


def test_disaggregated_greedy_and_pages_balance(
    disaggregated: tuple[Process, Process, str], offline: list[Any]
) -> None:
    prefill, decode, url = disaggregated
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        check_greedy(client, url, offline)
        stream = client.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=200,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))
        stream.close()
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=MODEL, prompt=[1] * 2047, max_tokens=2)
    wait_idle(prefill)
    wait_idle(decode)


def test_openai_chat(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a KV cache?"},
    ]
    whole = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(parts) == choice.message.content
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_bad_input_is_4xx_and_worker_stays_healthy(
    client: openai.OpenAI, worker: Process, router_url: str
) -> None:
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 10**6], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=[1] * 2048, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    # A stream the client abandons, and a stop string, end their worker requests.
    stream = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()
    wait_idle(worker)
    stopped = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=50,
        temperature=0,
        stop=["e", "a", "o", "i"],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    wait_idle(worker)
    done = client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=0)
    assert done.choices[0].text
    with urllib.request.urlopen(router_url + "/health", timeout=5) as resp:
        assert resp.status == 200
