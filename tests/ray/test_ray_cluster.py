"""`pdserve up` on a real (local) Ray cluster: placement, recovery after kills, scaling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.redis_server import free_port

MODEL = "qwen3-moe"
MAX_NEW = 16
PDSERVE = [sys.executable, "-m", "cluster.cli"]
RAY = str(Path(sys.executable).parent / "ray")
CONTROLLER: dict[str, str] = {}  # "metrics": the controller's /metrics and /targets base URL


def run(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [*PDSERVE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def status() -> list[dict[str, str]]:
    lines = run("status").strip().splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split(), strict=False)) for line in lines[1:]]


def generate(url: str, prompt: list[int], timeout: float = 120) -> list[int]:
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0,
            "max_new_tokens": MAX_NEW, "ignore_eos": True}}  # fmt: skip
    req = urllib.request.Request(
        url + "/generate", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        ids: list[int] = json.loads(resp.read())["output_ids"]
        return ids


def prompts(n: int) -> list[list[int]]:
    return [[3 + (i * 7 + j) % 500 for j in range(5 + i % 9)] for i in range(n)]


@pytest.fixture(scope="module")
def cluster(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("ray")
    port, metrics_port = free_port(), free_port()
    CONTROLLER["metrics"] = f"http://127.0.0.1:{metrics_port}"
    spec = tmp / "spec.yaml"
    spec.write_text(
        f"""
model:
  path: {tiny_models[MODEL]}
  engine_args: {{max-total-tokens: 4096, transfer-timeout: 5}}
router:
  port: {port}
  args: {{retry-max: 8, retry-backoff-ms: 250, migration-limit: 4, health-check-interval: 0.5,
          registry-poll-interval: 0.5}}
prefill: {{replicas: 2, device: CPU}}
decode: {{instances: 2, ep_size: 2, device: CPU}}
redis: {{address: embedded}}
metrics: {{port: {metrics_port}}}
"""
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [RAY, "start", "--head", "--num-cpus", "16", "--include-dashboard", "false",
         "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    try:
        start = time.monotonic()
        out = run("up", str(spec), "--log-dir", str(tmp / "logs"))
        print(f"\npdserve up: {time.monotonic() - start:.1f} s\n{out}")
        url = f"http://127.0.0.1:{port}"
        yield url
        run("down")
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def expected(tiny_models: dict[str, Path]) -> dict[tuple[int, ...], list[int]]:
    engine = Engine(EngineConfig(model_path=str(tiny_models[MODEL]), max_total_tokens=4096))
    ps = prompts(24)
    results = engine.generate(ps, SamplingParams(temperature=0, max_new_tokens=MAX_NEW,
                                                 ignore_eos=True))  # fmt: skip
    return {tuple(p): r.output_ids for p, r in zip(ps, results, strict=True)}


def test_up_places_and_serves(cluster: str, expected: dict[tuple[int, ...], list[int]]) -> None:
    rows = status()
    roles = sorted(r["role"] for r in rows)
    assert roles == ["decode", "decode", "prefill", "prefill", "redis", "router"], rows
    assert all(r["health"] == "ok" for r in rows), rows
    assert next(r for r in rows if r["name"] == "decode-0")["ranks"] == "2"
    for prompt, tokens in list(expected.items())[:4]:
        assert generate(cluster, list(prompt)) == tokens


def kill(pattern: str, sig: str = "-9") -> int:
    """Signal one process of this cluster (its workers' command lines name its Redis)."""
    redis = next(r["endpoint"] for r in status() if r["role"] == "redis")
    pattern = f"{pattern}.*--registry {redis}"
    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert pids, f"no process matches {pattern!r}"
    subprocess.run(["kill", sig, pids[0]], check=True)
    return int(pids[0])


def wait_all_healthy(
    timeout_s: float = 120, restarted_roles: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    """Every worker healthy, and (the requests may all be served before the supervisor has
    seen a kill) a restart recorded for each of ``restarted_roles``."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = status()
        restarted = {r["role"] for r in rows if int(r["restarts"]) > 0}
        if all(r["health"] == "ok" for r in rows) and restarted.issuperset(restarted_roles):
            return rows
        assert time.monotonic() < deadline, f"not healthy again: {rows}"
        time.sleep(1)


def under_load(url: str, expected: dict[tuple[int, ...], list[int]], during: Any) -> None:
    """Run every prompt (4 at a time) while `during()` runs; all must match `expected`."""
    results: dict[tuple[int, ...], list[int] | BaseException] = {}

    def one(prompt: tuple[int, ...]) -> None:
        try:
            results[prompt] = generate(url, list(prompt))
        except (urllib.error.URLError, OSError) as exc:
            results[prompt] = exc

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(one, p) for p in expected]
        thread = threading.Thread(target=during)
        thread.start()
        for f in futures:
            f.result(timeout=300)
        thread.join(timeout=300)
    failed = {p: r for p, r in results.items() if isinstance(r, BaseException)}
    assert not failed, failed
    assert results == expected


def test_kills_lose_no_request(cluster: str, expected: dict[tuple[int, ...], list[int]]) -> None:
    def kill_prefill_then_rank() -> None:
        time.sleep(0.5)
        kill("prefill_worker --disaggregation-mode prefill")
        time.sleep(1.0)
        kill("decode_worker.ranks --rank 1")

    under_load(cluster, expected, kill_prefill_then_rank)
    rows = wait_all_healthy(restarted_roles=("prefill", "decode"))
    restarted = {r["name"]: r for r in rows if int(r["restarts"]) > 0}
    print("\nrecovery:", {n: r.get("last_recovery_s") for n, r in restarted.items()})
    assert any(r["role"] == "prefill" for r in restarted.values()), rows
    assert any(r["role"] == "decode" for r in restarted.values()), rows
    # The controller exports the restarts, and where every worker's /metrics now is.
    with urllib.request.urlopen(CONTROLLER["metrics"] + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for name, row in restarted.items():
        line = f'pdserve:worker_restarts_total{{group="{name}",role="{row["role"]}"}}'
        assert f"{line} {float(row['restarts'])}" in text, text
    with urllib.request.urlopen(CONTROLLER["metrics"] + "/targets", timeout=10) as resp:
        targets = json.loads(resp.read())
    roles = sorted(t["labels"]["pdserve_role"] for t in targets)
    assert roles == ["decode", "decode", "prefill", "prefill", "router"], targets
    for target in targets:  # each one answers with its metrics
        [address] = target["targets"]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            assert b"pdserve:" in resp.read()
    # The restarted workers serve again.
    for prompt, tokens in list(expected.items())[:4]:
        assert generate(cluster, list(prompt)) == tokens


def test_hung_worker_is_restarted(cluster: str, expected: dict[tuple[int, ...], list[int]]) -> None:
    """A prefill worker that stops answering (SIGSTOP) fails its health checks; the supervisor
    kills its actor, Ray restarts it, and requests keep their greedy output."""
    before = {r["name"]: int(r["restarts"]) for r in status()}
    kill("prefill_worker --disaggregation-mode prefill", sig="-STOP")
    deadline = time.monotonic() + 90
    while True:
        rows = status()
        if any(
            r["role"] == "prefill" and int(r["restarts"]) > before[r["name"]] for r in rows
        ) and all(r["health"] == "ok" for r in rows):
            break
        assert time.monotonic() < deadline, f"the hung worker was not restarted: {rows}"
        time.sleep(1)
    for prompt, tokens in list(expected.items())[:4]:
        assert generate(cluster, list(prompt)) == tokens


def test_scale_under_load(cluster: str, expected: dict[tuple[int, ...], list[int]]) -> None:
    def scale() -> None:
        run("scale", "--prefill", "3")
        run("scale", "--prefill", "1", "--decode", "1")

    under_load(cluster, expected, scale)
    rows = wait_all_healthy()
    assert sorted(r["role"] for r in rows).count("prefill") == 1
    assert sorted(r["role"] for r in rows).count("decode") == 1
