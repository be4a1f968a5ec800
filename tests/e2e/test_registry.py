"""Workers register themselves in a real Redis server and keep their entry alive."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.procs import worker
from tests.redis_server import RedisServer
from worker.registry import WorkerRecord


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_worker_registers_refreshes_and_leaves(
    tiny_models: dict[str, Path], redis_server: RedisServer
) -> None:
    flags = ("--registry", redis_server.url, "--registry-ttl", "2")
    client = redis_server.client()
    with worker("decode", tiny_models["qwen3-moe"], *flags) as (child, endpoint):
        key = f"pdserve:worker:{endpoint}"
        record = WorkerRecord.from_json(client.get(key) or b"{}")
        assert record.role == "decode" and record.endpoint == endpoint
        assert record.model == "qwen3-moe" and len(record.fingerprint) == 16
        assert record.total_pages > 0 and not record.draining
        # The entry outlives its TTL because the worker refreshes it...
        time.sleep(2.5)
        assert client.exists(key)
        # ...and comes back after Redis restarts with an empty database.
        redis_server.restart()
        client = redis_server.client()
        wait_for(lambda: bool(client.exists(key)), 5, "re-registration after Redis restart")
        child.proc.send_signal(signal.SIGTERM)
        child.proc.wait(timeout=15)
        assert not client.exists(key)


def test_dead_worker_entry_expires(tiny_models: dict[str, Path], redis_server: RedisServer) -> None:
    flags = ("--registry", redis_server.url, "--registry-ttl", "1")
    client = redis_server.client()
    with worker("prefill", tiny_models["qwen3-moe"], *flags) as (child, endpoint):
        key = f"pdserve:worker:{endpoint}"
        assert json.loads(client.get(key) or b"{}")["role"] == "prefill"
        child.proc.kill()  # no chance to deregister
        wait_for(lambda: not client.exists(key), 5, "the entry to expire")


def test_worker_starts_while_redis_is_down(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Issue 20, bug 6: with --registry and no Redis, the worker serves anyway and registers
    once Redis is back."""
    server = RedisServer(tmp_path)  # its port, nothing listening yet
    flags = ("--registry", server.url, "--registry-ttl", "1")
    with worker("decode", tiny_models["qwen3-moe"], *flags) as (child, endpoint):
        assert child.proc.poll() is None
        server.start()
        try:
            client = server.client()
            key = f"pdserve:worker:{endpoint}"
            wait_for(lambda: bool(client.exists(key)), 5, "registration once Redis is up")
            assert WorkerRecord.from_json(client.get(key) or b"{}").endpoint == endpoint
        finally:
            server.stop()


def _network_address() -> str | None:
    """This machine's first non-loopback IPv4 address, if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_embedded_redis_serves_on_a_network_address(tmp_path: Path) -> None:
    """Operator's first hour (issue 20): bound to the node's address, the embedded Redis of
    `pdserve up` refused every client (protected mode); with its random password it serves."""
    import secrets
    import subprocess

    import redis

    from cluster.actors import redis_argv, wait_redis
    from tests.redis_server import free_port

    address = _network_address()
    if address is None:
        pytest.skip("this machine has no network address (a loopback-only namespace)")
    argv = redis_argv(address, free_port(), str(tmp_path), secrets.token_hex(16))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        url = wait_redis(argv, proc, timeout_s=10)
        client = redis.Redis.from_url(url, socket_timeout=2)
        client.set("k", "v")
        assert client.get("k") == b"v"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=address, port=int(argv[2]), socket_timeout=2).get("k")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
