"""A chaos soak: steady mixed load on the embedded default while faults are injected.

    make soak                                   # 5 minutes
    .venv/bin/python -m bench.soak --duration 40 --json soak.json

Runs a real Redis, 2 prefill and 2 decode workers registering in it (prefill workers with KV
writes delayed and dropped at the transfer layer, ``kv_transfer.faults``) and a router
watching it, all as processes on loopback. A baseline pass records every prompt's greedy
output with no faults. Then ``--concurrency`` clients send mixed requests (completions and
chat, streamed and not, n of 1 or 2; a few disconnect mid-way) while the faults come in turn
every ``--fault-interval`` seconds: SIGKILL of a prefill worker and of a decode worker (each
started again), SIGSTOP of a prefill worker and of a decode worker (SIGCONT after
``--stop-s``), and a Redis kill (started again after ``--stop-s``).

It counts, against the baseline: requests **lost** (a status other than 200, disconnects
apart), within a fault's window (from the fault until ``--window-s`` after it ended) and
outside any; **hung** requests (no answer within ``--request-timeout-s``); greedy **token
mismatches**; **leaked pages** (a worker whose pages are not all free once the load stops);
and the router's memory growth. For each fault it reports how long until a request that
started after it succeeded. Exit code 0 when nothing hung, mismatched or leaked and nothing
was lost outside the fault windows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from cluster.actors import redis_argv, wait_redis
from cluster.local import Child, start_child, stop_child, wait_ready
from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

PROMPTS = [
    "The KV cache holds",
    "Disaggregated serving splits",
    "A page pool allocates",
    "Prefill computes the prompt and",
    "Continuous batching lets",
    "The router picks a worker by",
    "Expert parallelism spreads",
    "Mooncake moves pages over",
    "Greedy decoding always takes",
    "A circuit breaker opens when",
    "Redis keeps the worker registry",
    "Retries before the first token",
]
MAX_TOKENS = 12
FAULTS = ("kill_prefill", "stop_prefill", "kill_decode", "stop_decode", "kill_redis")


@dataclass
class Outcome:
    start: float
    end: float
    status: int  # HTTP status; 0: hung; -1: client disconnected on purpose
    mismatch: bool = False
    # What was asked, and what came instead of the baseline (mismatches), or the error body
    # (lost requests).
    detail: str = ""


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0  # when the fault was lifted (the process back, or SIGCONT)
    recovered_s: float | None = None  # until a request started after `start` succeeded


@dataclass
class Report:
    duration_s: float
    requests: int = 0
    ok: int = 0
    disconnected: int = 0
    lost_in_windows: int = 0
    lost_outside_windows: int = 0
    lost_by_status: dict[str, int] = field(default_factory=dict)
    lost_examples: list[dict[str, Any]] = field(default_factory=list)  # the first few
    hung: int = 0
    mismatched: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # the first few, in detail
    leaked_workers: list[str] = field(default_factory=list)
    router_rss_mb: tuple[float, float] = (0.0, 0.0)
    faults: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not (
            self.hung or self.mismatched or self.leaked_workers or self.lost_outside_windows
        )


class Cluster:
    """Redis, the workers and the router, each a child process that can be killed, stopped
    and started again."""

    def __init__(self, model: Path, workdir: Path, transfer_faults: str) -> None:
        self.model = model
        self.workdir = workdir
        self.transfer_faults = transfer_faults
        self.redis_port = _free_port()
        self.redis_argv = redis_argv("127.0.0.1", self.redis_port, str(workdir), "soak")
        self.redis: Any = None
        self.redis_url = ""
        self.workers: dict[str, Child] = {}
        self.router: Child | None = None
        self.url = ""

    def start_redis(self) -> None:
        import subprocess

        self.redis = subprocess.Popen(
            self.redis_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
        )
        self.redis_url = wait_redis(self.redis_argv, self.redis, 10)

    def start_worker(self, name: str) -> None:
        role = name.split("-")[0]
        module = "prefill_worker" if role == "prefill" else "decode_worker"
        args = ["-m", module, "--disaggregation-mode", role, "--model-path", str(self.model),
                "--host", "127.0.0.1", "--port", "0", "--max-total-tokens", "4096",
                "--transfer-timeout", "5", "--registry", self.redis_url,
                "--registry-ttl", "2", "--drain-timeout", "5"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if role == "prefill" and self.transfer_faults:
            env["PDSERVE_TRANSFER_FAULTS"] = self.transfer_faults
        child = start_child(name, args, env, self.workdir)
        wait_ready(child, 120)
        self.workers[name] = child

    def start_router(self) -> None:
        args = ["-m", "router", "--model-path", str(self.model), "--port", "0",
                "--registry", self.redis_url, "--registry-poll-interval", "0.5",
                "--health-check-interval", "0.5", "--cb-open-timeout", "2",
                "--worker-keepalive", "2", "--retry-max", "6",
                "--startup-timeout", "60"]  # fmt: skip
        self.router = start_child(
            "router", args, {**os.environ, "PYTHONUNBUFFERED": "1"}, self.workdir
        )
        self.url = str(wait_ready(self.router, 120)["url"])

    def endpoint(self, name: str) -> str:
        return str(self.workers[name].ready["endpoint"])

    def stop(self) -> None:
        if self.router is not None:
            stop_child(self.router)
        for child in self.workers.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGCONT)
            stop_child(child)
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _body(kind: str, prompt: str, stream: bool, n: int) -> dict[str, Any]:
    common = {"model": "qwen3-moe", "max_tokens": MAX_TOKENS, "temperature": 0, "n": n,
              "stream": stream}  # fmt: skip
    if kind == "chat":
        return {**common, "messages": [{"role": "user", "content": prompt}]}
    return {**common, "prompt": prompt}


async def _request(
    http: aiohttp.ClientSession, url: str, kind: str, prompt: str, stream: bool, n: int,
    disconnect: bool, timeout_s: float,
) -> tuple[int, list[str]]:  # fmt: skip
    """(status, each choice's text); status -1 when this client left on purpose."""
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    texts = [""] * n

    async def go() -> tuple[int, list[str]]:
        async with http.post(url + path, json=_body(kind, prompt, stream, n)) as resp:
            if resp.status != 200:
                texts[:] = [(await resp.read()).decode(errors="replace")[:300]]
                return resp.status, texts
            if not stream:
                reply = await resp.json()
                for c in reply["choices"]:
                    texts[c["index"]] = c["message"]["content"] if kind == "chat" else c["text"]
                return 200, texts
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    texts[:] = [json.dumps(event["error"])[:300]]
                    return 500, texts
                for c in event["choices"]:
                    piece = c["delta"].get("content") if kind == "chat" else c.get("text")
                    texts[c["index"]] += piece or ""
                if disconnect:
                    return -1, texts  # leaving the context closes the connection mid-stream
            return 200, texts

    try:
        return await asyncio.wait_for(go(), timeout_s)
    except asyncio.TimeoutError:
        return 0, texts
    except aiohttp.ClientError:
        return 599, texts


async def _baseline(url: str) -> dict[tuple[str, str], str]:
    async with aiohttp.ClientSession() as http:
        out = {}
        for kind in ("completion", "chat"):
            for prompt in PROMPTS:
                status, texts = await _request(http, url, kind, prompt, False, 1, False, 60)
                if status != 200:
                    raise RuntimeError(f"baseline request failed with {status}")
                out[(kind, prompt)] = texts[0]
        return out


async def _load(
    url: str, baseline: dict[tuple[str, str], str], until: float, concurrency: int,
    timeout_s: float, rng: random.Random, outcomes: list[Outcome],
) -> None:  # fmt: skip
    async def client() -> None:
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < until:
                kind = rng.choice(("completion", "chat"))
                prompt = rng.choice(PROMPTS)
                stream, n = rng.random() < 0.5, rng.choice((1, 1, 2))
                disconnect = stream and rng.random() < 0.05
                start = time.monotonic()
                status, texts = await _request(
                    http, url, kind, prompt, stream, n, disconnect, timeout_s
                )
                want = baseline[(kind, prompt)]
                mismatch = status == 200 and any(t != want for t in texts)
                detail = ""
                asked = f"{kind} stream={stream} n={n} prompt={prompt!r}"
                if mismatch:
                    detail = f"{asked}: got {texts!r}, baseline {want!r}"
                elif status not in (200, -1, 0):
                    detail = f"{asked}: {texts[0] if texts else ''}"
                outcomes.append(Outcome(start, time.monotonic(), status, mismatch, detail))

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def _faults(
    cluster: Cluster, until: float, interval_s: float, stop_s: float, faults: list[Fault],
    kinds: tuple[str, ...],
) -> None:  # fmt: skip
    i = 0
    while time.monotonic() + interval_s < until:
        await asyncio.sleep(interval_s)
        kind = kinds[i % len(kinds)]
        i += 1
        fault = Fault(kind, time.monotonic())
        faults.append(fault)
        if kind == "kill_redis":
            cluster.redis.kill()
            cluster.redis.wait()
            await asyncio.sleep(stop_s)
            await asyncio.to_thread(cluster.start_redis)
        else:
            action, role = kind.split("_")
            name = f"{role}-{rng_pick(i)}"
            child = cluster.workers[name]
            if action == "kill":
                child.proc.kill()
                child.proc.wait()
                await asyncio.to_thread(cluster.start_worker, name)
            else:
                child.proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(stop_s)
                child.proc.send_signal(signal.SIGCONT)
        fault.end = time.monotonic()


def rng_pick(i: int) -> int:
    return i % 2  # alternate between the two workers of a role


def _load_report(endpoint: str, role: str) -> common_pb2.LoadReport:
    async def get() -> common_pb2.LoadReport:
        async with grpc.aio.insecure_channel(endpoint) as ch:
            stub: Any = (
                prefill_pb2_grpc.PrefillStub(ch)
                if role == "prefill"
                else decode_pb2_grpc.DecodeStub(ch)
            )
            return await stub.GetLoad(common_pb2.LoadRequest(), timeout=5)

    return asyncio.run(get())


def _leaked(cluster: Cluster, timeout_s: float = 30) -> list[str]:
    """Workers whose pages are not all free (or that are busy) after ``timeout_s`` of quiet."""
    deadline = time.monotonic() + timeout_s
    pending = dict(cluster.workers)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            r = _load_report(cluster.endpoint(name), name.split("-")[0])
            idle = r.num_running == r.num_waiting == r.num_transferring == 0
            if idle and r.num_free_pages == r.num_total_pages:
                del pending[name]
        time.sleep(0.5)
    return sorted(pending)


def run(
    duration_s: float = 60, concurrency: int = 6, fault_interval_s: float = 8,
    stop_s: float = 3, window_s: float = 15, request_timeout_s: float = 60, seed: int = 1,
    transfer_faults: str = "delay_ms=30,drop=0.02", kinds: tuple[str, ...] = FAULTS,
    log_dir: str | None = None,
) -> Report:  # fmt: skip
    """`log_dir`: keep every process's log (and Redis's files) there; default: a temporary
    directory, removed at the end."""
    from engine.cli import default_model_dir

    rng = random.Random(seed)
    with (
        contextlib.nullcontext(log_dir)
        if log_dir
        else tempfile.TemporaryDirectory(prefix="pdserve-soak-") as tmp,
        _cluster(default_model_dir(), Path(tmp), transfer_faults) as cluster,
    ):
        baseline = asyncio.run(_baseline(cluster.url))
        assert cluster.router is not None
        rss_start = _rss_mb(cluster.router.proc.pid)
        outcomes: list[Outcome] = []
        faults: list[Fault] = []

        async def main() -> None:
            until = time.monotonic() + duration_s
            await asyncio.gather(
                _load(cluster.url, baseline, until, concurrency, request_timeout_s, rng,
                      outcomes),
                _faults(cluster, until, fault_interval_s, stop_s, faults, kinds),
            )  # fmt: skip

        start = time.monotonic()
        asyncio.run(main())
        report = Report(duration_s=round(time.monotonic() - start, 1))
        report.leaked_workers = _leaked(cluster)
        report.router_rss_mb = (round(rss_start, 1), round(_rss_mb(cluster.router.proc.pid), 1))
    windows = [(f.start, (f.end or f.start) + window_s) for f in faults]
    for o in outcomes:
        report.requests += 1
        if o.status == 200:
            report.ok += 1
            report.mismatched += o.mismatch
            if o.mismatch and len(report.mismatches) < 10:
                in_window = any(a <= o.end and o.start <= b for a, b in windows)
                report.mismatches.append(
                    {"start": round(o.start - start, 1), "end": round(o.end - start, 1),
                     "in_fault_window": in_window, "detail": o.detail}
                )  # fmt: skip
        elif o.status == -1:
            report.disconnected += 1
        elif o.status == 0:
            report.hung += 1
        else:
            hit = [f.kind for f, (a, b) in zip(faults, windows, strict=True)
                   if a <= o.end and o.start <= b]  # fmt: skip
            if hit:
                report.lost_in_windows += 1
            else:
                report.lost_outside_windows += 1
            key = str(o.status)
            report.lost_by_status[key] = report.lost_by_status.get(key, 0) + 1
            if len(report.lost_examples) < 10:
                report.lost_examples.append(
                    {"start": round(o.start - start, 1), "end": round(o.end - start, 1),
                     "status": o.status, "faults": hit, "detail": o.detail}
                )  # fmt: skip
    lost = [o for o in outcomes if o.status not in (200, -1, 0)]
    for f, (a, b) in zip(faults, windows, strict=True):
        after = [o.end for o in outcomes if o.status == 200 and o.start >= f.start]
        f.recovered_s = round(min(after) - f.start, 2) if after else None
        report.faults.append({**asdict(f), "start": round(f.start - start, 1),
                              "end": round(f.end - start, 1),
                              "lost": sum(a <= o.end and o.start <= b for o in lost)})  # fmt: skip
    return report


@contextmanager
def _cluster(model: Path, workdir: Path, transfer_faults: str) -> Iterator[Cluster]:
    cluster = Cluster(model, workdir, transfer_faults)
    try:
        cluster.start_redis()
        for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
            cluster.start_worker(name)
        cluster.start_router()
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--fault-interval", type=float, default=8.0, help="seconds between faults")
    p.add_argument("--stop-s", type=float, default=3.0, help="SIGSTOP and Redis outage length")
    p.add_argument("--window-s", type=float, default=15.0, help="a fault's window after it ends")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="beyond: hung")
    p.add_argument("--transfer-faults", default="delay_ms=30,drop=0.02")
    p.add_argument("--seed", type=int, default=secrets.randbelow(1000))
    p.add_argument("--json", help="write the report here too")
    p.add_argument("--log-dir", help="keep the processes' logs here (default: not kept)")
    args = p.parse_args(argv)
    report = run(
        args.duration, args.concurrency, args.fault_interval, args.stop_s, args.window_s,
        args.request_timeout_s, args.seed, args.transfer_faults, log_dir=args.log_dir,
    )  # fmt: skip
    text = json.dumps({**asdict(report), "passed": report.passed, "seed": args.seed}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
