"""``python -m router`` as a process: the ready line, serving under uvloop, and no torch."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from router.config import RouterConfig, build_parser, config_from_args
from tests.router.conftest import run
from tests.router.fake_worker import FakeWorker

REPO = Path(__file__).resolve().parents[2]


def test_router_never_imports_torch() -> None:
    code = (
        "import sys, router.app.server, router.__main__\n"
        "bad = sorted(m for m in ('torch', 'engine.engine', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_cli_serves_and_stops(model_dir: Path) -> None:
    worker = FakeWorker(model="tiny-cli")

    async def body() -> None:
        await worker.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "--model-path", str(model_dir),
            "--worker", worker.endpoint, "--port", "0", "--startup-timeout", "10",
            cwd=REPO, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            ready = json.loads(line)
            assert ready["event"] == "ready" and ready["url"].startswith("http://127.0.0.1:")
            async with aiohttp.ClientSession() as http:
                async with http.get(ready["url"] + "/v1/models") as resp:
                    assert (await resp.json())["data"][0]["id"] == "tiny-cli"
                async with http.post(
                    ready["url"] + "/v1/completions",
                    json={"model": "tiny-cli", "prompt": "x", "max_tokens": 2},
                ) as resp:
                    assert resp.status == 200
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await worker.stop()

    run(body(), timeout_s=40)


def test_cli_refuses_bad_flags(model_dir: Path) -> None:
    parser = build_parser()
    for argv, fragment in [
        (["--worker", "a:1", "--prefill", "b:2"], "either --worker"),
        (["--prefill", "b:2"], "at least one --prefill and one --decode"),
        (["--worker", "not a url"], "host:port"),
        (["--worker", "a:1", "--max-body-bytes", "10"], "--max-body-bytes"),
        (["--worker", "a:1", "--stream-interval", "0"], "--stream-interval must be >= 1"),
        (["--worker", "a:1", "--processes", "0"], "--processes must be >= 1"),
        (["--worker", "a:1", "--worker-keepalive", "0"], "--worker-keepalive must be > 0"),
    ]:
        args = parser.parse_args(["--model-path", str(model_dir), *argv])
        with pytest.raises(ValueError, match=re.escape(fragment)):
            config_from_args(args)
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        RouterConfig("/nonexistent", workers=("a:1",))
    args = parser.parse_args(["--model-path", str(model_dir), "--worker", "grpc://h:5", "h2:6"])
    assert config_from_args(args).workers == ("grpc://h:5", "h2:6")


def test_cli_resilience_flags(model_dir: Path) -> None:
    parser = build_parser()
    base = ["--model-path", str(model_dir)]
    config = config_from_args(parser.parse_args([*base, "--registry", "redis://127.0.0.1:1/0"]))
    assert config.registry.url == "redis://127.0.0.1:1/0" and not config.workers
    assert (config.registry.prefix, config.registry.poll_interval_s) == ("pdserve", 1.0)
    assert (config.health.check_interval_s, config.health.failure_threshold) == (2.0, 3)
    assert (config.health.open_timeout_s, config.health.success_threshold) == (10.0, 2)
    assert (config.retry.max_attempts, config.retry.backoff_ms) == (3, 50.0)
    assert config.retry.migration_limit == 3 and config.admin_key is None
    assert (config.admission.max_concurrent, config.admission.queue_size) == (256, 256)
    config = config_from_args(
        parser.parse_args(
            [*base, "--worker", "a:1", "--retry-max", "1", "--migration-limit", "0",
             "--max-concurrent-requests", "4", "--queue-size", "0", "--admin-key", "k",
             "--cb-open-timeout", "0.5", "--registry-poll-interval", "0.1"]
        )
    )  # fmt: skip
    assert (config.retry.max_attempts, config.retry.migration_limit) == (1, 0)
    assert (config.admission.max_concurrent, config.admission.queue_size) == (4, 0)
    assert config.admin_key == "k" and config.health.open_timeout_s == 0.5
    for argv, fragment in [
        ([], "(or --registry)"),
        (["--worker", "a:1", "--retry-max", "0"], "--retry-max"),
        (["--worker", "a:1", "--queue-timeout", "0"], "--queue-timeout"),
        (["--worker", "a:1", "--cb-success-threshold", "0"], "--cb-success-threshold"),
        (["--worker", "a:1", "--registry", "localhost:6379"], "redis:// URL"),
        (["--worker", "a:1", "--admin-key", " "], "--admin-key"),
    ]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            config_from_args(parser.parse_args([*base, *argv]))
