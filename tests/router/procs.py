"""Helpers of the router tests that run real processes: the router as a process, plain HTTP
calls (status and JSON, SSE events as they arrive), and the workers' own load reports."""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from cluster.local import Child, start_child, stop_child, wait_ready
from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc


@contextmanager
def router_process(model_dir: Path, *flags: str) -> Iterator[tuple[Child, str]]:
    """``python -m router --model-path DIR --port 0 FLAGS``, yielding (child, url)."""
    args = ["-m", "router", "--model-path", str(model_dir), "--port", "0", *flags]
    child = start_child("router", args, {**os.environ, "PYTHONUNBUFFERED": "1"}, None)
    try:
        yield child, str(wait_ready(child, timeout_s=60)["url"])
    finally:
        stop_child(child)


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30,
) -> tuple[int, Any]:
    """One HTTP request; returns (status, decoded JSON body or None)."""
    split = urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname or "", split.port, timeout=timeout_s)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(
            method,
            split.path or "/",
            body=data,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def sse_events(url: str, body: Any, timeout_s: float = 60) -> Iterator[Any]:
    """POST and yield the SSE events as they arrive (``"[DONE]"`` as a string)."""
    split = urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname or "", split.port, timeout=timeout_s)
    try:
        conn.request(
            "POST", split.path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise AssertionError(f"HTTP {resp.status}: {resp.read()!r}")
        for line in resp:
            text = line.decode().strip()
            if text.startswith("data: "):
                data = text.removeprefix("data: ")
                yield data if data == "[DONE]" else json.loads(data)
    finally:
        conn.close()


def load(endpoint: str, role: str) -> common_pb2.LoadReport:
    with grpc.insecure_channel(endpoint) as channel:
        request = common_pb2.LoadRequest()
        if role == "prefill":
            report: common_pb2.LoadReport = prefill_pb2_grpc.PrefillStub(channel).GetLoad(
                request, timeout=5
            )
        else:
            report = decode_pb2_grpc.DecodeStub(channel).GetLoad(request, timeout=5)
        return report


def wait_idle(endpoint: str, role: str, timeout_s: float = 10.0) -> None:
    """Pages balance: nothing running or waiting, every page free (or reclaimable cache)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = load(endpoint, role)
        if r.num_running == r.num_waiting == 0 and r.num_free_pages == r.num_total_pages:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{role} worker {endpoint} not idle: {r}")
        time.sleep(0.05)


def wait_until(condition: Any, timeout_s: float, what: str) -> float:
    """Poll ``condition()`` every 50 ms; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def metric(url: str, line_prefix: str) -> float:
    """The value of the first /metrics line starting with ``line_prefix`` (0 if none), read
    without the ``model_name`` label every router series carries."""
    split = urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname or "", split.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        line = re.sub(r'(?<=[{,])model_name="[^"]*",?', "", line)
        line = line.replace(",}", "}").replace("{} ", " ")
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
